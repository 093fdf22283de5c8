"""MetricsLogger: JSONL rows, resume truncation, the console line, and the wandb mirror (offline)."""

import json
import math

import pytest
import torch

from utils.metrics_logger import MetricsLogger, format_step_line


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_rows_config_and_resume_truncation(tmp_path):
    log = MetricsLogger(tmp_path, {"lr": 1e-4})
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 1e-4}
    log.log({"train/loss": torch.tensor(0.5), "train/lr": 1e-4}, step=1)
    log.log({"eval/math/accuracy": 0.25}, step=1)
    log.log({"train/loss": float("nan")}, step=2)
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 1, 2]
    assert rows[0]["train/loss"] == 0.5 and isinstance(rows[0]["train/loss"], float)
    assert math.isnan(rows[2]["train/loss"])
    # a resumed run from the step-1 checkpoint drops the later rows and appends after them
    resumed = MetricsLogger(tmp_path, {"lr": 1e-4}, resume=True)
    assert resumed.truncate_after(1) == 1
    resumed.log({"train/loss": 0.4}, step=2)
    assert ([(r["step"], r.get("train/loss")) for r in _rows(tmp_path / "metrics.jsonl")]
            == [(1, 0.5), (1, None), (2, 0.4)])
    # a fresh (non-resumed) logger refuses a folder that holds another run's rows, and leaves them as they were
    before = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="holds another run"):
        MetricsLogger(tmp_path, {"lr": 3.0})
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 1e-4}  # never rewritten


def test_resume_drops_a_torn_last_line_and_refuses_other_bad_lines(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 0.5}\n{"step": 2, "train/loss": 0.4}\n{"step": 3, "tra')
    log = MetricsLogger(tmp_path, {}, resume=True)
    assert log.truncate_after(2) == 1
    assert "metrics.jsonl:3: dropping a partial last line" in capsys.readouterr().out
    assert [r["step"] for r in _rows(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"step": \n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: malformed JSON"):
        log.truncate_after(5)


def test_console_line():
    line = format_step_line(10, {"train/loss": 0.4123, "train/lr": 1e-4, "train/grad_norm": 1.5,
                                 "train/step_time_s": 0.812, "train/tokens_per_s": 31234.0})
    assert line == "step 00010 | loss 0.4123 | lr 1.0e-04 | gnorm 1.50 | 812 ms | 31.2k tok/s"


def test_wandb_mirror_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLogger(tmp_path, {"seed": 1}, wandb_project="sft-test", wandb_run_name="t")
    log.log({"train/loss": 1.0}, step=1)
    log.log({"eval/math/accuracy": 0.5}, step=1)
    log.log_table("eval/samples", ["prompt", "response"], [["p", "r"]], step=1)
    log.close()
    assert len(_rows(tmp_path / "metrics.jsonl")) == 2
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(f"-{run_id}")
    # a resume continues the same wandb run: same id, a second offline segment of it
    log = MetricsLogger(tmp_path, {"seed": 1}, wandb_project="sft-test", resume=True)
    log.log({"train/loss": 0.9}, step=2)
    log.close()
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    assert all(p.name.endswith(f"-{run_id}") for p in (tmp_path / "wandb").glob("offline-run-*"))
