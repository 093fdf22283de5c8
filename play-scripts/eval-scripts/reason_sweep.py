"""Dataset-size sweep for reasoning SFT: train on {128, 256, 512, 1024, full} unique examples of each training file
(all traces vs correct-only traces) and write one summary table.

    python play-scripts/eval-scripts/reason_sweep.py \\
        --train-files data/sft-reason/sft_gpt-oss-120b.jsonl data/sft-reason/sft_gpt-oss-120b_filtered.jsonl \\
        --labels all filtered --sizes 128 256 512 1024 -1 -- --epochs 3
Smoke run on the demo data:
    python play-scripts/eval-scripts/reason_sweep.py --train-files data/demo/train.jsonl --labels demo \\
        --sizes 64 128 -- --preset demo --max-steps 20 --eval-every 20

Everything after `--` goes to every train_sft_reason.py run unchanged. Each run is a subprocess writing
`<output-dir>/<prefix>_<label>_<size>/`; a run whose folder already has a final eval row is skipped (re-running the
sweep resumes it). The score of a run is its last in-loop eval (`eval/math/accuracy` at the final step, on the fixed
val subset); evaluate the final checkpoints on the full val set with evaluate_reason.py for publication numbers.
Writes `<output-dir>/<prefix>_summary.md` and `.json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from utils.helper_fns import write_json  # noqa: E402


def final_eval(run_dir: Path) -> dict | None:
    """The last eval row of a finished run (its step equals config total_steps), else None."""
    metrics, config = run_dir / "metrics.jsonl", run_dir / "config.json"
    if not metrics.exists() or not config.exists():
        return None
    total = json.loads(config.read_text())["total_steps"]
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval/math/accuracy" in r and r["step"] == total]
    return evals[-1] if evals else None


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-files", nargs="+", required=True, help="one training file per group")
    p.add_argument("--labels", nargs="+", required=True, help="one label per training file (e.g. all filtered)")
    p.add_argument("--sizes", nargs="+", type=int, default=[128, 256, 512, 1024, -1], help="unique examples; -1 = full")
    p.add_argument("--output-dir", default="results", help="runs and the summary go here")
    p.add_argument("--prefix", default="sweep", help="run folder / summary name prefix")
    args = p.parse_args(own)
    if len(args.labels) != len(args.train_files):
        raise SystemExit(f"--labels has {len(args.labels)} entries but --train-files has {len(args.train_files)}")
    for f in args.train_files:
        if not Path(f).exists():
            raise SystemExit(f"--train-files {f}: file not found (python play-scripts/data-scripts/download_data.py)")
    rows = []
    for label, train_file in zip(args.labels, args.train_files):
        for size in args.sizes:
            name = f"{args.prefix}_{label}_{'full' if size < 0 else size}"
            run_dir = Path(args.output_dir) / name
            if final_eval(run_dir) is None:
                cmd = [sys.executable, str(REPO / "train_sft_reason.py"), *train_args, "--train-file", train_file,
                       "--num-examples", str(size), "--output-dir", args.output_dir, "--run-name", name]
                print(f"sweep: {' '.join(cmd[1:])}", flush=True)
                proc = subprocess.run(cmd, cwd=REPO)
                if proc.returncode != 0:
                    raise SystemExit(f"sweep: run {name} failed (exit {proc.returncode}); re-run the sweep to resume")
            else:
                print(f"sweep: {name} already finished, reusing its final eval")
            ev = final_eval(run_dir)
            if ev is None:
                raise SystemExit(f"sweep: {run_dir} finished without a final eval row; "
                                 "pass --eval-every > 0 to the runs")
            config = json.loads((run_dir / "config.json").read_text())
            rows.append({"label": label, "num_examples": config["train_examples"], "requested": size,
                         "steps": config["total_steps"], "accuracy": ev["eval/math/accuracy"],
                         "format_accuracy": ev["eval/math/format_accuracy"], "run_dir": str(run_dir)})
    lines = ["| traces | unique examples | steps | accuracy | format accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['num_examples']} | {r['steps']} | {r['accuracy']:.4f} "
              f"| {r['format_accuracy']:.4f} |" for r in rows]
    out = Path(args.output_dir)
    (out / f"{args.prefix}_summary.md").write_text("\n".join(lines) + "\n")
    write_json(out / f"{args.prefix}_summary.json", rows)
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
