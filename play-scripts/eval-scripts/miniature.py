"""The published reasoning-SFT findings in miniature, on CPU: base model -> teacher -> traces -> filter -> sweep -> eval
-> figures, every stage the project's real script at a smaller size, driven through its flags.

The miniature (about 20 min on 2 idle cores; results/miniature/ is what the README shows):
    python play-scripts/eval-scripts/miniature.py
Smoke run of every stage at toy sizes (what tests/test_miniature.py runs):
    python play-scripts/eval-scripts/miniature.py --preset smoke --work-dir /tmp/mini --report-dir /tmp/mini/report

Stages, each a subprocess of a real script, each skipped when its outputs exist and are complete (re-running the
command resumes; delete a stage's folder to redo it):
  data     make_chain_data.py: two-digit additions explained column by column, the CPU demo's task, in problems /
           val / test splits disjoint from the demo's own train and val problems
  demo     train_sft_reason.py --preset demo: the CPU demo run itself (tiny Qwen2 from scratch on the bundled gold
           solutions), saving a checkpoint every --checkpoint-every steps. An early checkpoint (--base-step) is the
           students' "pretrained" base: it writes the response format but rarely the right sum. An intermediate one
           (--teacher-step) is the teacher: right often, not always, wrong the way a half-trained model is
  traces   generate_traces.py --backend vllm: one teacher sample per problem at temperature 1, r1_zero format
  build    build_sft_dataset.py: all traces vs the traces the grader calls correct
  sweep + eval
           reason_sweep.py per seed: students from the base on --sizes examples of each set, validated in the loop
           with vLLM and the grader; train_sft_reason.py with the summed loss (--loss-normalization constant) on the
           whole correct set; evaluate_reason.py on the held-out test split for the base and the teacher
           (<work-dir>/evals/<role>_step_N/) and for every student's final checkpoint (<run>/eval_full/, each
           eval starting as soon as its run is done)
  report   plot_reason.py, make_results_readme.py and plot_miniature.py write the figures and tables to --report-dir

Subprocesses run --jobs at a time, each with one thread (OMP_NUM_THREADS=1: two threads on a busy 2-core machine run
far slower than one). Logs: <work-dir>/logs/<job>.log; the console gets one line per job.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
SCRIPTS = {
    "data": "play-scripts/data-scripts/make_chain_data.py", "train": "train_sft_reason.py",
    "traces": "play-scripts/data-scripts/generate_traces.py", "build": "play-scripts/data-scripts/build_sft_dataset.py",
    "sweep": "play-scripts/eval-scripts/reason_sweep.py", "eval": "evaluate_reason.py",
    "plot": "play-scripts/plot-scripts/plot_reason.py", "readme": "play-scripts/plot-scripts/make_results_readme.py",
    "findings": "play-scripts/plot-scripts/plot_miniature.py",
}  # fmt: skip
DEMO_DATA = ("data/demo/train.jsonl", "data/demo/val.jsonl")  # the CPU demo's bundled problems, kept out of ours
PROMPT = "data/demo/demo.prompt"  # the demo's short r1_zero-shaped prompt (the full preamble is ~7x slower on CPU)
# Subprocess environment (utils/vllm_engine.py also turns vLLM's AOT compile off on CPU).
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                  "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                  "VLLM_CPU_OMP_THREADS_BIND": "nobind", "WANDB_MODE": "disabled"}  # fmt: skip
SETS = ("all", "filtered")  # build_sft_dataset.py's full and correct-only outputs
SUMMED = "summed"  # the correct-only set trained with the summed loss

PRESETS = {
    "smoke": dict(seeds=[1], sizes=[8, -1], num_problems=64, num_val=16, num_test=24, demo_steps=250,
                  checkpoint_every=50, base_step=50, teacher_step=250, student_steps=3, micro_batch_size=8,
                  temperature=0.0, eval_engine="hf", jobs=2),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="named smaller sizes; flags still override")
    p.add_argument("--work-dir", default="results/miniature-work", help="data, runs and logs (not committed)")
    p.add_argument("--report-dir", default="results/miniature", help="figures and tables (committed)")
    p.add_argument("--jobs", type=int, default=2, help="subprocesses at once, one thread each")
    g = p.add_argument_group("task")
    g.add_argument("--terms", type=int, default=2, help="two-digit numbers per problem (2 = the CPU demo's task)")
    g.add_argument("--num-problems", type=int, default=3000, help="problems the teacher answers (one trace each)")
    g.add_argument("--num-val", type=int, default=200, help="in-loop validation problems")
    g.add_argument("--num-test", type=int, default=500, help="held-out test problems (evaluate_reason.py)")
    g = p.add_argument_group("models")
    g.add_argument("--demo-steps", type=int, default=500, help="steps of the CPU demo run (its preset: 500)")
    g.add_argument("--checkpoint-every", type=int, default=50,
                   help="the demo run saves (and keeps) a checkpoint every N steps")
    g.add_argument("--base-step", type=int, default=300, help="the demo checkpoint that is the students' base")
    g.add_argument("--teacher-step", type=int, default=400, help="the demo checkpoint that is the teacher")
    g.add_argument("--student-steps", type=int, default=60, help="steps of every student, whatever its data size")
    g.add_argument("--student-lr", type=float, default=1e-3)
    g.add_argument("--micro-batch-size", type=int, default=32, help="examples per step (no accumulation)")
    g.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one student per seed at every point")
    g.add_argument("--sizes", type=int, nargs="+", default=[128, 512, -1],
                   help="unique examples per student (-1 = the whole set; the published grid is 128 256 512 1024 -1, "
                        "~8 min more on 2 cores); a size above the smaller set's count is left out, and said")
    g = p.add_argument_group("sampling and evaluation")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="teacher sampling and all evals (the published protocol)")
    g.add_argument("--max-tokens", type=int, default=96, help="generated tokens per answer")
    g.add_argument("--eval-engine", choices=["vllm", "hf"], default="hf",
                   help="evaluate_reason.py's engine (hf: the same greedy tokens, no vLLM start-up: "
                        "~20 s less a run on CPU)")
    pre, _ = p.parse_known_args(argv)
    if pre.preset:
        p.set_defaults(**PRESETS[pre.preset])
    args = p.parse_args(argv)
    steps = (args.base_step, args.teacher_step)
    if args.jobs < 1 or args.student_steps < 1 or not 0 < args.base_step < args.teacher_step <= args.demo_steps:
        p.error("--jobs and --student-steps must be >= 1 and 0 < --base-step < --teacher-step <= --demo-steps")
    if any(s % args.checkpoint_every for s in steps):
        p.error(f"--base-step and --teacher-step {steps} must be multiples of --checkpoint-every "
                f"{args.checkpoint_every}")
    return args


# ---- running subprocesses


def run_jobs(jobs: dict[str, list[list[str]]], workers: int, log_dir: Path, needs: dict[str, set[str]] = {}) -> None:
    """Run each job's commands in order, up to `workers` jobs at once, a job only after the jobs it `needs`; the
    first failure stops everything (re-running the miniature resumes)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **SUBPROCESS_ENV}
    waiting, running, done = list(jobs), {}, set()
    while waiting or running:
        ready = [n for n in waiting if needs.get(n, set()) <= done]
        while ready and len(running) < workers:
            name = ready.pop(0)
            waiting.remove(name)
            running[name] = {"cmds": jobs[name], "i": 0, "proc": None, "t0": time.time(),
                             "log": open(log_dir / f"{name}.log", "a")}  # fmt: skip
        for name, job in list(running.items()):
            if job["proc"] is None:
                cmd = job["cmds"][job["i"]]
                print(f"  start {name}: {' '.join(cmd[1:])[:150]}", flush=True)
                job["log"].write(f"\n$ {' '.join(cmd)}\n")
                job["log"].flush()
                job["proc"] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=job["log"], stderr=subprocess.STDOUT)
                continue
            rc = job["proc"].poll()
            if rc is None:
                continue
            if rc != 0:
                for other in running.values():
                    if other["proc"] is not None and other["proc"].poll() is None:
                        other["proc"].terminate()
                raise SystemExit(f"{name} failed (exit {rc}); see {job['log'].name}. Re-run the command to resume.")
            job["i"], job["proc"] = job["i"] + 1, None
            if job["i"] == len(job["cmds"]):
                job["log"].close()
                del running[name]
                done.add(name)
                print(f"  done  {name} ({time.time() - job['t0']:.0f} s)", flush=True)
        time.sleep(0.2)


def count_lines(path: Path) -> int:
    return sum(1 for line in path.open() if line.strip()) if path.exists() else -1


def finished_run(run_dir: Path) -> bool:
    """A training run whose metrics end with the eval of its last step and whose final checkpoint exists."""
    config, metrics = run_dir / "config.json", run_dir / "metrics.jsonl"
    if not config.exists() or not metrics.exists():
        return False
    total = json.loads(config.read_text())["total_steps"]
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    evaluated = any(r.get("step") == total and "eval/math/accuracy" in r for r in rows)
    return evaluated and (run_dir / "checkpoints" / f"step_{total:06d}" / "config.json").exists()


def final_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"step_{json.loads((run_dir / 'config.json').read_text())['total_steps']:06d}"


def finished_eval(out: Path, num_test: int) -> bool:
    summary = out / "summary.json"
    return summary.exists() and json.loads(summary.read_text())["metrics"]["num_examples"] == num_test


# ---- stages


def stage(name: str, done: bool, jobs: dict[str, list[list[str]]], args, run_dirs: list[Path] = (),
          needs: dict[str, set[str]] = {}) -> None:
    """Print the stage's state; run its jobs unless its outputs are complete. Unfinished training runs among
    `run_dirs` are removed first: a run folder belongs to one run, and the trainer refuses to write into a used one."""
    if done:
        print(f"[{name}] complete, skipped", flush=True)
        return
    for run_dir in run_dirs:
        if run_dir.exists() and not finished_run(run_dir):
            print(f"[{name}] removing the unfinished run {run_dir} (interrupted; it is trained again)")
            shutil.rmtree(run_dir)
    t0 = time.time()
    print(f"[{name}] running {len(jobs)} job(s)", flush=True)
    run_jobs(jobs, args.jobs, Path(args.work_dir) / "logs", needs)
    print(f"[{name}] finished in {time.time() - t0:.0f} s", flush=True)


def train_cmd(args, run_name: str, model: str, train_file: str, steps: int, lr: float, seed: int) -> list[str]:
    """A train_sft_reason.py command at the miniature's size: the demo's batch and prompt, evals at step 0 and the
    end."""
    d = Path(args.work_dir) / "data"
    return [PY, SCRIPTS["train"], *train_flags(args, steps, lr, seed), "--model", model, "--train-file", train_file,
            "--val-file", str(d / "val.jsonl"), "--output-dir", str(Path(args.work_dir) / "runs"),
            "--run-name", run_name]


def train_flags(args, steps: int, lr: float, seed: int) -> list[str]:
    return ["--prompt-template", PROMPT, "--micro-batch-size", str(args.micro_batch_size),
            "--gradient-accumulation-steps", "1", "--lr", f"{lr:g}", "--lr-schedule", "cosine",
            "--warmup-ratio", "0.05",
            "--max-steps", str(steps), "--eval-every", str(steps), "--val-size", "-1", "--temperature",
            f"{args.temperature:g}", "--max-tokens", str(args.max_tokens), "--max-seq-len", "160", "--engine", "vllm",
            "--seed", str(seed)]  # fmt: skip


def eval_cmd(args, model: Path, out: Path) -> list[str]:
    return [PY, SCRIPTS["eval"], "--model", str(model), "--data", str(Path(args.work_dir) / "data" / "test.jsonl"),
            "--prompt", PROMPT, "--temperature", f"{args.temperature:g}", "--max-tokens", str(args.max_tokens),
            "--engine", args.eval_engine, "--grader-workers", "1", "--no-progress", "--output", str(out)]  # fmt: skip


def base_teacher_evals(args) -> tuple[Path, Path]:
    """evaluate_reason.py output folders of the base and the teacher (plot_miniature.py reads them)."""
    evals = Path(args.work_dir) / "evals"
    return evals / f"base_step_{args.base_step:06d}", evals / f"teacher_step_{args.teacher_step:06d}"


def student_runs(args, set_sizes: dict[str, int]) -> dict[str, list[tuple[int, str]]]:
    """{set label: [(size, run name)]} over seeds. A size above the smaller set's count is left out of both sets
    (a comparison needs both; printed), -1 = each whole set; the summed-loss students train on the whole correct set."""
    n = min(set_sizes.values())
    sizes = [s for s in args.sizes if s <= n]
    if len(sizes) < len(args.sizes):
        print(f"sweep: the smaller set has {n} traces; sizes {[s for s in args.sizes if s > n]} left out")
    out = {label: [(s, f"seed{seed}_{label}_{'full' if s < 0 else s}") for seed in args.seeds for s in sizes]
           for label in SETS}
    out[SUMMED] = [(-1, f"seed{seed}_{SUMMED}_full") for seed in args.seeds]
    return out


def main(args: argparse.Namespace) -> None:
    t_start = time.time()
    work, report = Path(args.work_dir), Path(args.report_dir)
    data, runs, traces = work / "data", work / "runs", work / "traces"
    print(f"miniature: {work} (runs, logs) -> {report} (figures, tables); {args.jobs} jobs x 1 thread")

    sizes = {"problems": args.num_problems, "val": args.num_val, "test": args.num_test}
    stage("data", all(count_lines(data / f"{k}.jsonl") == v for k, v in sizes.items()), {"data": [[
        PY, SCRIPTS["data"], "--out-dir", str(data), "--terms", str(args.terms), "--num-gold", "0",
        *[x for k, v in sizes.items() for x in (f"--num-{k}", str(v))], "--exclude", *DEMO_DATA]]}, args)

    # One CPU demo run (the README's, plus checkpoints) gives both models.
    demo_run = runs / "demo"
    base, teacher = (demo_run / "checkpoints" / f"step_{s:06d}" for s in (args.base_step, args.teacher_step))
    stage("demo", finished_run(demo_run) and (base / "config.json").exists() and (teacher / "config.json").exists(),
          {"demo": [[PY, SCRIPTS["train"], "--preset", "demo", "--max-steps", str(args.demo_steps), "--save-every",
                     str(args.checkpoint_every), "--keep-last", str(args.demo_steps // args.checkpoint_every + 1),
                     "--output-dir", str(runs), "--run-name", "demo"]]}, args, [demo_run])  # fmt: skip

    trace_file = traces / "traces.jsonl"
    stage("traces", count_lines(trace_file) == args.num_problems, {"traces": [[
        PY, SCRIPTS["traces"], "--backend", "vllm", "--model", str(teacher), "--problems", str(data / "problems.jsonl"),
        # raw: the prompt file is the whole prompt (the teacher checkpoint also carries it as its chat template;
        # auto would see that and choose raw too, raw says it)
        "--output", str(trace_file), "--prompt-file", PROMPT, "--prompt-format", "raw",
        "--temperature", f"{args.temperature:g}",
        "--max-tokens", str(args.max_tokens), "--stop", "</answer>", "--seed", "0"]]}, args)

    set_files = {"all": traces / "sft_all.jsonl", "filtered": traces / "sft_filtered.jsonl"}
    stats_file = traces / "sft_filtered.stats.json"
    built = stats_file.exists() and json.loads(stats_file.read_text())["samples"] == count_lines(trace_file)
    stage("build", built, {"build": [[
        PY, SCRIPTS["build"], "--traces", str(trace_file), "--output-full", str(set_files["all"]),
        "--output-filtered", str(set_files["filtered"]), "--stats", str(stats_file), "--workers", "1"]]}, args)
    set_sizes = {k: count_lines(v) for k, v in set_files.items()}
    print(f"sets: all {set_sizes['all']} traces, filtered (correct) {set_sizes['filtered']}")
    if min(set_sizes.values()) < 1:
        raise SystemExit(f"build: a set is empty ({set_sizes}); choose a later --teacher-step")

    # Students: one reason_sweep.py per seed (both sets, so its summary table has a row per size and set), the
    # summed-loss student per seed, and each run's held-out eval as soon as the run exists.
    students = student_runs(args, set_sizes)
    jobs, needs, evals = {}, {}, {}
    for seed in args.seeds:
        mine = {label: [(s, n) for s, n in entries if n.startswith(f"seed{seed}_")]
                for label, entries in students.items()}
        swept = [n for label in SETS for _, n in mine[label]]
        if not all(finished_run(runs / n) for n in swept):
            jobs[f"sweep_seed{seed}"] = [[
                PY, SCRIPTS["sweep"], "--train-files", *[str(set_files[s]) for s in SETS], "--labels", *SETS,
                "--sizes", *[str(s) for s, _ in mine[SETS[0]]],
                "--output-dir", str(runs), "--prefix", f"seed{seed}", "--", "--model", str(base),
                "--val-file", str(data / "val.jsonl"), *train_flags(args, args.student_steps, args.student_lr, seed)]]
        for _, n in mine[SUMMED]:
            if not finished_run(runs / n):
                jobs[n] = [train_cmd(args, n, str(base), str(set_files["filtered"]), args.student_steps,
                                     args.student_lr, seed) + ["--loss-normalization", "constant"]]  # fmt: skip
        for n in swept + [n for _, n in mine[SUMMED]]:
            evals[n] = (runs / n / "eval_full", f"sweep_seed{seed}" if n in swept else n)
    # The base's and the teacher's test scores live outside the demo run's folder: they score two of its checkpoints,
    # not the run's final model, and the plot scripts read a run's own eval_full/ (or any <run>/*/) as its final score.
    for name, model, out in zip(("base", "teacher"), (base, teacher), base_teacher_evals(args)):
        if not finished_eval(out, args.num_test):
            jobs[f"eval_{name}"] = [eval_cmd(args, model, out)]
    for n, (out, after) in evals.items():
        if not finished_eval(out, args.num_test):
            jobs[f"eval_{n}"] = [eval_cmd(args, runs / n / "checkpoints" / f"step_{args.student_steps:06d}", out)]
            needs[f"eval_{n}"] = {after} & set(jobs)
    stage("sweep + eval", not jobs, jobs, args, [runs / n for n in evals], needs)

    groups = {"all": "all", "filtered": "filtered", SUMMED: "filtered, summed loss"}
    demo_label = f"CPU demo run (gold solutions; base = step {args.base_step}, teacher = step {args.teacher_step})"
    curves = [("demo", demo_label),
              ("seed1_all_full", "all traces"),
              ("seed1_filtered_full", "correct traces"), (f"seed1_{SUMMED}_full", "correct traces, summed loss")]
    curves = [(n, label) for n, label in curves if (runs / n).exists()]
    # The demo run has no test-split eval of its final model (its checkpoints' evals are under evals/): no star.
    final_evals = ["none" if n == "demo" else "auto" for n, _ in curves]
    sweep_patterns = [str(runs / f"seed*_{label}_*") for label in groups]
    jobs = {"report": [
        [PY, SCRIPTS["plot"], "--runs", *[str(runs / n) for n, _ in curves], "--labels", *[l for _, l in curves],
         "--final-evals", *final_evals, "--base", "none", "--output-dir", str(report)],
        [PY, SCRIPTS["readme"], "--reason-runs", *[str(runs / n) for n, _ in curves],
         "--reason-labels", *[l for _, l in curves], "--final-evals", *final_evals, "--sweep-runs", *sweep_patterns,
         "--sweep-groups", *groups.values(), "--figures-dir", str(report), "--output", str(report / "README.md")],
        [PY, SCRIPTS["findings"], "--work-dir", str(work), "--output-dir", str(report), "--base-step",
         str(args.base_step), "--teacher-step", str(args.teacher_step)]]}  # fmt: skip
    summaries = [p.stat().st_mtime for p in [*runs.glob("*/eval*/summary.json"),
                                             *(work / "evals").glob("*/summary.json")]]
    findings = report / "findings.json"
    stage("report", findings.exists() and findings.stat().st_mtime > max(summaries, default=0), jobs, args)
    print(f"miniature: done in {time.time() - t_start:.0f} s this invocation -> {report}")


if __name__ == "__main__":
    main(parse_args())
