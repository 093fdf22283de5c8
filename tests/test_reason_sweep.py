"""The dataset-size sweep driver: runs, summary table equal to the runs' own final evals, resume."""

import json
from pathlib import Path

import pytest
from conftest import load_script



def _load():
    return load_script("play-scripts/eval-scripts/reason_sweep.py")


def test_sweep_runs_summarizes_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the training runs are subprocesses: one thread on a shared 2-core box
    sweep = _load()
    argv = ["--train-files", "data/demo/train.jsonl", "--labels", "demo", "--sizes", "16", "-1",
            "--output-dir", str(tmp_path), "--", "--preset", "demo", "--max-steps", "2", "--eval-every", "2",
            "--val-size", "6", "--max-tokens", "8", "--engine", "hf", "--micro-batch-size", "4"]
    rows = sweep.main(argv)
    assert [(r["label"], r["num_examples"]) for r in rows] == [("demo", 16), ("demo", 3000)]
    for r in rows:
        metrics = [json.loads(x) for x in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        last = [m for m in metrics if "eval/math/accuracy" in m][-1]
        assert last["step"] == 2 and r["accuracy"] == last["eval/math/accuracy"]
    table = (tmp_path / "sweep_summary.md").read_text().splitlines()
    assert len(table) == 4 and "| demo | 16 | 2 |" in table[2]

    def no_runs(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sweep.subprocess, "run", no_runs)
    assert sweep.main(argv) == rows


def test_sweep_rejects_mismatched_labels(tmp_path):
    with pytest.raises(SystemExit, match="--labels has 2 entries"):
        _load().main(["--train-files", "data/demo/train.jsonl", "--labels", "a", "b"])
