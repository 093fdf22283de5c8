"""The miniature study end to end at toy sizes (miniature.py --preset smoke): every stage's files exist and agree with
each other, the trace filter agrees with a recomputation by the grader, the tables agree with the runs' own files,
and a second invocation skips every stage."""

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import load_script

from utils.drgrpo_grader import r1_zero_reward_fn

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run of the whole pipeline; (module, args, work dir, report dir, console output of a re-run)."""
    mini = load_script("play-scripts/eval-scripts/miniature.py")
    root = tmp_path_factory.mktemp("mini")
    argv = ["--preset", "smoke", "--work-dir", str(root / "work"), "--report-dir", str(root / "report"),
            "--eval-engine", "hf"]  # fmt: skip
    args = mini.parse_args(argv)
    mini.main(args)
    return mini, args, root / "work", root / "report", argv


def test_data_splits_are_disjoint_and_keep_out_the_demo(smoke):
    _, args, work, _, _ = smoke
    splits = {name: _jsonl(work / "data" / f"{name}.jsonl") for name in ("problems", "val", "test")}
    assert {k: len(v) for k, v in splits.items()} == {"problems": args.num_problems, "val": args.num_val,
                                                      "test": args.num_test}  # fmt: skip
    problems = [r["problem"] for rows in splits.values() for r in rows]
    demo = {r["problem"] for f in ("train", "val") for r in _jsonl(Path("data/demo") / f"{f}.jsonl")}
    assert len(set(problems)) == len(problems) and not set(problems) & demo


def test_trace_filter_matches_the_grader(smoke):
    _, args, work, _, _ = smoke
    traces = _jsonl(work / "traces" / "traces.jsonl")
    assert len(traces) == args.num_problems and all(t["finish_reason"] in ("stop", "length") for t in traces)
    # The teacher's raw text starts inside <think> (r1_zero prompt), so the grader reads it as is.
    correct = {(t["problem_id"], t["sample_index"]) for t in traces
               if t["finish_reason"] == "stop" and r1_zero_reward_fn(t["text"], t["expected_answer"])["reward"] == 1}
    full, kept = _jsonl(work / "traces" / "sft_all.jsonl"), _jsonl(work / "traces" / "sft_filtered.jsonl")
    stats = json.loads((work / "traces" / "sft_filtered.stats.json").read_text())
    assert {(r["problem_id"], r["sample_index"]) for r in kept} == correct
    assert stats["kept_filtered"] == len(kept) == len(correct)
    assert stats["kept_full"] == len(full) and stats["samples"] == len(full) + sum(stats["dropped"].values())
    wrong = [r for r in full if r1_zero_reward_fn(r["reasoning_trace"], r["expected_answer"])["reward"] != 1]
    assert stats["dropped_from_filtered"].get("incorrect", 0) == len(wrong) == len(full) - len(kept)
    assert 0 < len(kept) < len(full), "the smoke teacher should be right sometimes and wrong sometimes"


def test_every_student_trained_on_its_set_and_size(smoke):
    mini, args, work, _, _ = smoke
    runs = work / "runs"
    counts = {"all": len(_jsonl(work / "traces" / "sft_all.jsonl")),
              "filtered": len(_jsonl(work / "traces" / "sft_filtered.jsonl"))}  # fmt: skip
    expected = {(s, size) for s in mini.SETS for size in args.sizes} | {(mini.SUMMED, -1)}
    seen = set()
    for seed in args.seeds:
        for label, size in expected:
            run = runs / f"seed{seed}_{label}_{'full' if size < 0 else size}"
            config = json.loads((run / "config.json").read_text())
            train_set = "filtered" if label == mini.SUMMED else label
            assert config["train_file"].endswith(f"sft_{train_set}.jsonl") and config["seed"] == seed
            assert config["train_examples"] == (counts[train_set] if size < 0 else size)
            assert config["loss_normalization"] == ("constant" if label == mini.SUMMED else "per_example")
            rows = _jsonl(run / "metrics.jsonl")
            assert [r["step"] for r in rows if "eval/math/accuracy" in r] == [0, args.student_steps]
            summary = json.loads((run / "eval_full" / "summary.json").read_text())
            assert summary["metrics"]["num_examples"] == args.num_test
            assert Path(summary["model"]).parts[-3:] == (run.name, "checkpoints", f"step_{args.student_steps:06d}")
            seen.add((label, size))
    assert seen == expected
    # reason_sweep.py's own table: one row per size and set, equal to the runs' final in-loop evals
    table = (runs / f"seed{args.seeds[0]}_summary.md").read_text().splitlines()[2:]
    assert len(table) == len(mini.SETS) * len(args.sizes)
    for line in table:
        label, n, steps, acc, _ = [c.strip() for c in line.strip("|").split("|")]
        size = next(s for s in args.sizes if (s < 0 and int(n) == counts[label]) or s == int(n))
        run = runs / f"seed{args.seeds[0]}_{label}_{'full' if size < 0 else size}"
        last = [r for r in _jsonl(run / "metrics.jsonl") if "eval/math/accuracy" in r][-1]
        assert int(steps) == args.student_steps and float(acc) == pytest.approx(last["eval/math/accuracy"], abs=5e-5)


def test_report_tables_match_the_eval_files(smoke):
    mini, args, work, report, _ = smoke
    runs = work / "runs"
    for name in ("reason_accuracy.png", "reason_train.png", "miniature_findings.png"):
        assert (report / name).stat().st_size > 10_000
    # make_results_readme.py's sweep table: a row per student run, scored by its held-out eval
    readme = (report / "README.md").read_text()
    sweep = readme[readme.index("## Reasoning SFT: dataset-size sweep"):]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in sweep.splitlines() if line.startswith("| ")][1:]
    n_runs = len(args.seeds) * (len(mini.SETS) * len(args.sizes) + 1)
    assert len(rows) == n_runs
    for group, _, run, acc, fmt, source in rows:
        metrics = json.loads((runs / run / "eval_full" / "summary.json").read_text())["metrics"]
        assert float(acc) == pytest.approx(metrics["accuracy"], abs=5e-5)
        assert float(fmt) == pytest.approx(metrics["format_accuracy"], abs=5e-5)
        assert source == f"full val (n={args.num_test})"
    # plot_miniature.py's findings: every point's mean equals the mean of its runs' held-out accuracies
    findings = json.loads((report / "findings.json").read_text())
    by_point = Counter()
    for p in findings["points"]:
        label = "full" if p["full"] else str(p["num_examples"])
        accs = [json.loads((runs / f"seed{s}_{p['set']}_{label}" / "eval_full" / "summary.json").read_text())
                ["metrics"]["accuracy"] for s in p["seeds"]]  # fmt: skip
        assert p["accuracy"]["mean"] == pytest.approx(sum(accs) / len(accs))
        by_point[p["set"]] += 1
    assert by_point == {"all": len(args.sizes), "filtered": len(args.sizes), "summed": 1}
    # base and teacher: their own evals of the demo run's checkpoints, named by step (not the demo run's final eval)
    evals = {role: json.loads((work / "evals" / f"{role}_step_{step:06d}" / "summary.json").read_text())
             for role, step in (("base", args.base_step), ("teacher", args.teacher_step))}  # fmt: skip
    for role, step in (("base", args.base_step), ("teacher", args.teacher_step)):
        assert Path(evals[role]["model"]).name == f"step_{step:06d}"
        assert findings[role]["demo_step"] == step
        assert findings[role]["accuracy"] == evals[role]["metrics"]["accuracy"]
    assert not (runs / "demo" / "eval_full").exists()
    base = evals["base"]["metrics"]["accuracy"]
    filtered_full = [p for p in findings["points"] if p["set"] == "filtered" and p["full"]][0]
    assert findings["findings"]["sft_vs_base"]["mean"] == pytest.approx(filtered_full["accuracy"]["mean"] - base)
    row = next(line for line in (report / "findings.md").read_text().splitlines()
               if line.startswith("| student | correct traces |") and "(whole set)" in line)
    accs = [json.loads((runs / f"seed{s}_filtered_full" / "eval_full" / "summary.json").read_text())["metrics"]
            ["accuracy"] for s in args.seeds]  # fmt: skip
    assert float(row.split("|")[4].split()[0]) == pytest.approx(sum(accs) / len(accs), abs=5e-4)


def test_rerun_skips_every_stage(smoke, capsys):
    mini, _, work, _, argv = smoke
    capsys.readouterr()
    mtimes = {p: p.stat().st_mtime for p in work.rglob("*.json*")}
    mini.main(mini.parse_args(argv))
    out = capsys.readouterr().out
    stages = re.findall(r"^\[(.+?)\] (complete, skipped|running)", out, flags=re.M)
    assert stages and all(state == "complete, skipped" for _, state in stages), stages
    assert {p: p.stat().st_mtime for p in work.rglob("*.json*")} == mtimes
