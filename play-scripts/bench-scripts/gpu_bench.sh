#!/usr/bin/env bash
# The one command a GPU session runs for the training-throughput issue: install the carried wheels, check on the GPU
# that no packing / attention / kernel option changes our step's loss (bf16), then time our configs and TRL's
# SFTTrainer on the Qwen2.5-1.5B shape, one JSON file per stage. Every stage has a time limit: the whole script ends
# within about 8 minutes (plus the wheel install) even when a stage hangs.
#
# Prepare the wheels on the CPU machine, from the repo root (the GPU machine has no network; its image already has
# torch 2.11, transformers 5.17, accelerate 1.15, triton, pyarrow, pandas, xxhash, fsspec, huggingface-hub):
#   echo /.wheels/ >> .git/info/exclude     # never commit wheels
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .wheels trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5
#   (all five are pure-Python wheels, 2.7 MB together; trl's other needs are on the image). They install with
#   --no-deps, so the script then checks every requirement of each carried wheel against what is installed and
#   prints one line per unmet one (datasets 5.2 needs huggingface-hub>=1.31, the image had 1.33 in 2026-11, and
#   pyarrow>=24): carry a fitting version of the named package, or an older wheel whose needs the image meets
#   (datasets 4.4.1: pyarrow>=21, dill<0.4.1, multiprocess<0.70.19, fsspec<=2025.10.0).
#
# Run it (device tool), then copy the JSON it returns under results/bench/ and delete .wheels/:
#   run(command="bash play-scripts/bench-scripts/gpu_bench.sh", carry=[".wheels"], timeout_s=540)
# The stages' limits add up to 490 s, which leaves a 15-minute device budget room to rerun one stage.
#
# Environment: WHEELS (default .wheels), OUT (the device tool's output folder; JSON and log are copied there),
# RESULTS (default results/bench), PYTHON (default python3), DRY_RUN=1 (every stage on the CPU with the tiny shape,
# in about 30 s: checks this script before it spends GPU time; flex and Liger rows are skipped there).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WHEELS=${WHEELS:-.wheels}
RESULTS=${RESULTS:-results/bench}
PYTHON=${PYTHON:-python3}
BENCH=play-scripts/bench-scripts/bench_train_throughput.py
status=0
dry=()
if [ "${DRY_RUN:-0}" = 1 ]; then  # later flags win in argparse: these replace the GPU shape and device
    dry=(--device cpu --shape tiny --num-layers 2 --length-scale 0.1 --max-len 256 --pack-tokens 512
         --examples-per-step 8 --steps 2 --warmup-steps 1 --trl-micro-batch-size 2 --trl-grad-accum 2)
fi

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    # --no-deps installed the wheels blind: one line per requirement of a carried wheel that nothing installed meets
    "$PYTHON" - "$WHEELS" <<'CHECK' || echo "WARNING: unmet requirements above; the rows that import them will fail or skip"
import importlib.metadata as md, pathlib, sys, zipfile
from packaging.requirements import Requirement
bad = 0
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            have = None
        if have is None or not req.specifier.contains(have, prereleases=True):
            bad += 1
            print(f"unmet: {wheel.name} needs {req}; installed: {have or 'nothing'}")
print(f"carried wheels: {bad} unmet requirement(s)")
sys.exit(1 if bad else 0)
CHECK
else
    echo "no wheels in $WHEELS: TRL rows will be skipped (see the comments at the top of this script)"
fi
[ ${#dry[@]} -gt 0 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" - <<'EOF'
import importlib.metadata as md
names = ["torch", "transformers", "accelerate", "trl", "datasets", "liger-kernel", "pyarrow", "fsspec", "huggingface-hub"]
for name in names:
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} missing")
EOF

if [ ${#dry[@]} -gt 0 ]; then
    card=cpu-dry-run
else
    card=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))") || exit 1
fi
day=$(date -u +%F)
mkdir -p "$RESULTS"
log=$RESULTS/train-throughput-$card-$day.log

# Each stage is its own process with a time limit and writes its JSON after every row, so a stage cut off keeps
# what it measured and the next stage still runs. Liger patches transformers' modules for the whole process, hence
# its rows get a process of their own.
stage() {  # stage NAME SECONDS ARGS...: one bench process, output appended to the log
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$PYTHON" "$BENCH" --device cuda --output "$RESULTS/train-throughput-$name-$card-$day.json" \
        "$@" ${dry[@]+"${dry[@]}"} 2>&1 | tee -a "$log" || status=1  # (empty-array form safe under set -u)
}

# 1. correctness on the GPU, 4 of the 28 layers: every attention backend and kernel option against the padded
#    reference, loss after step 1 within bf16 tolerance (the bench exits non-zero otherwise)
stage check 80 --shape qwen2.5-1.5b --num-layers 4 --steps 2 --warmup-steps 1 --examples-per-step 16 \
    --configs padded,packed-mask,packed,packed+chunked,packed+fused,packed-flex+fused,packed+fused+liger

# 1b. the loss head alone (plain / chunked / fused), Qwen2.5-1.5B's head on an 8,192-token row: time and memory
if [ ${#dry[@]} -gt 0 ]; then lm_head_args=(--device cpu --tokens 64 --vocab 512 --hidden 64 --chunk-size 16 --repeats 1)
else lm_head_args=(--device cuda); fi
echo "== lm-head"
timeout 40 "$PYTHON" play-scripts/bench-scripts/bench_lm_head.py "${lm_head_args[@]}" \
    --out "$RESULTS/lm-head-$card-$day.json" 2>&1 | tee -a "$log" || status=1

# 2. the comparison the issue asks for, most important rows first: our step vs TRL with packing (no Liger) ...
stage core 130 --shape qwen2.5-1.5b --configs padded,packed+fused,packed+chunked,trl-packing,trl-packing-nogc
# 3. ... Liger on both sides (TRL's best configuration) ...
stage liger 120 --shape qwen2.5-1.5b \
    --configs packed+fused+liger,trl-packing-liger,packed+chunked+liger,packed+fused+liger+compile
# 4. ... and the rest: full logits, FlexAttention, the O(T^2) mask, TRL's padded defaults, compile without Liger
stage extra 120 --shape qwen2.5-1.5b --configs packed,packed-flex+fused,packed-mask,trl-default,packed+fused+compile

if [ -n "${OUT:-}" ]; then
    cp "$RESULTS"/*"$card-$day"* "$OUT"/
fi
echo "gpu_bench.sh: exit $status ($RESULTS/train-throughput-*-$card-$day.json)"
exit $status
