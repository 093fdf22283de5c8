#!/usr/bin/env bash
# The one command a GPU session runs for the training-throughput issue: install the carried wheels, check on the GPU
# that packing does not change our step's loss (bf16), then print the full table (our configs and TRL's SFTTrainer)
# on the Qwen2.5-1.5B shape and write it as JSON. About 4 minutes on an H100; every stage has a time limit, so the
# whole script ends within ~9 minutes even when a stage hangs.
#
# Prepare the wheels on the CPU machine, from the repo root (the GPU machine has no network; its image already has
# torch 2.11, transformers 5.17, accelerate 1.15, triton, pyarrow, pandas, xxhash, fsspec, huggingface-hub):
#   echo /.wheels/ >> .git/info/exclude     # never commit wheels
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .wheels trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5
#   (all five are pure-Python wheels, 2.7 MB together; trl's other needs are on the image)
#
# Run it (device tool), then copy the JSON it returns under results/bench/ and delete .wheels/:
#   run(command="bash play-scripts/bench-scripts/gpu_bench.sh", carry=[".wheels"], timeout_s=560)
#
# Environment: WHEELS (default .wheels), OUT (the device tool's output folder; JSON and log are copied there).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WHEELS=${WHEELS:-.wheels}
BENCH=play-scripts/bench-scripts/bench_train_throughput.py
status=0

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no wheels in $WHEELS: TRL rows will be skipped (see the comments at the top of this script)"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'EOF'
import importlib.metadata as md
names = ["torch", "transformers", "accelerate", "trl", "datasets", "liger-kernel", "pyarrow", "fsspec", "huggingface-hub"]
for name in names:
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} missing")
EOF

card=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))") || exit 1
day=$(date -u +%F)
mkdir -p results/bench
log=results/bench/train-throughput-$card-$day.log

# 1. correctness on the GPU: packed and packed+chunked vs padded, loss after step 1 within bf16 tolerance
#    (the script exits non-zero otherwise), 4 of the 28 layers to keep it short
for precision in mixed bf16; do
    echo "== check: packed vs padded loss, qwen2.5-1.5b x 4 layers, precision $precision"
    timeout 90 python3 "$BENCH" --shape qwen2.5-1.5b --num-layers 4 --configs padded,packed,packed+chunked \
        --steps 2 --warmup-steps 1 --examples-per-step 16 --precision "$precision" --device cuda \
        --output "results/bench/check-$precision-$card-$day.json" 2>&1 | tee -a "$log" || status=1
done

# 2. the table: our configs and TRL's, full shape (JSON written after every row, so a timeout keeps what was measured)
echo "== table: qwen2.5-1.5b, ours vs TRL"
json=results/bench/train-throughput-$card-$day.json
timeout 360 python3 "$BENCH" --shape qwen2.5-1.5b --device cuda --output "$json" 2>&1 | tee -a "$log" || status=1

if [ -n "${OUT:-}" ]; then
    cp results/bench/*"$card-$day"* "$OUT"/
fi
echo "gpu_bench.sh: exit $status ($json)"
exit $status
