"""Run-folder integrity: names, refusing to mix runs, --overwrite moves aside, the lock, resume config checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import snapshot_files

from utils.run_dir import RunLock, config_changes, prepare_run_dir, record_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["../x", "../../x", "a/b", "/abs", "..", ".", "", "~user", " pad", "a\\b"])
def test_unsafe_run_names_are_refused(tmp_path, name):
    with pytest.raises(SystemExit, match="--run-name"):
        prepare_run_dir(tmp_path / "out", name, resume=False, overwrite=False)
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()


def _old_run(tmp_path) -> Path:
    run = tmp_path / "out" / "r1"
    (run / "checkpoints" / "step_000005").mkdir(parents=True)
    (run / "config.json").write_text('{"lr": 0.1}')
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n')
    (run / "checkpoints" / "step_000005" / "model.safetensors").write_bytes(b"weights")
    return run


def test_existing_run_is_refused_without_resume_and_untouched(tmp_path):
    run = _old_run(tmp_path)
    before = snapshot_files(run)
    with pytest.raises(SystemExit) as e:
        prepare_run_dir(tmp_path / "out", "r1", resume=False, overwrite=False)
    message = str(e.value)
    assert str(run) in message and "--resume" in message and "--overwrite" in message and "--run-name" in message
    assert snapshot_files(run) == before


def test_overwrite_moves_the_old_run_aside_byte_for_byte(tmp_path, capsys):
    run = _old_run(tmp_path)
    before = snapshot_files(run)
    out = prepare_run_dir(tmp_path / "out", "r1", resume=False, overwrite=True)
    assert out == run and out.is_dir() and not any(out.iterdir())
    aside = [p for p in (tmp_path / "out").iterdir() if p.name.startswith("r1.replaced-")]
    assert len(aside) == 1 and snapshot_files(aside[0]) == before
    assert str(aside[0]) in capsys.readouterr().out


def test_resume_needs_a_run_and_contradicts_overwrite(tmp_path):
    with pytest.raises(SystemExit, match="holds no run"):
        prepare_run_dir(tmp_path / "out", "new", resume=True, overwrite=False)
    _old_run(tmp_path)
    with pytest.raises(SystemExit, match="contradict"):
        prepare_run_dir(tmp_path / "out", "r1", resume=True, overwrite=True)
    assert prepare_run_dir(tmp_path / "out", "r1", resume=True, overwrite=False) == tmp_path / "out" / "r1"


def _hold_lock_in_child(run: Path, marker: Path) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from utils.run_dir import RunLock
        lock = RunLock({str(run)!r}).acquire()
        open({str(marker)!r}, "w").write("held")
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(200):
        if marker.exists():
            return child
        import time

        time.sleep(0.05)
    child.kill()
    raise AssertionError("child never took the lock")


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    child = _hold_lock_in_child(run, tmp_path / "held")
    try:
        with pytest.raises(SystemExit, match=rf"in use by another process \(pid {child.pid} "):
            RunLock(run).acquire()
    finally:
        child.kill()  # like kill -9: no cleanup, the lock file stays
        child.wait()
    assert (run / ".lock").exists()
    with RunLock(run):
        note = capsys.readouterr().out
        assert f"pid {child.pid}" in note and "has ended" in note and "taking it over" in note
        assert f"pid {os.getpid()}" in (run / ".lock").read_text()
    assert not (run / ".lock").exists()  # a clean end leaves no lock


def test_resume_refuses_trajectory_changes_and_never_rewrites_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    first = {"lr": 1e-4, "micro_batch_size": 2, "betas": (0.9, 0.95), "eval_every": 10, "model": "m"}
    assert record_config(run, first, resume=False) == {}
    original = (run / "config.json").read_bytes()
    ignore = ["eval_every", "resume"]
    same = dict(first, eval_every=50, resume=True)  # only settings that cannot change the trajectory
    assert record_config(run, same, resume=True, ignore=ignore) == {"eval_every": (10, 50), "resume": (None, True)}
    changed = dict(first, lr=3e-4, micro_batch_size=4, resume=True)
    with pytest.raises(SystemExit) as e:
        record_config(run, changed, resume=True, ignore=ignore)
    message = str(e.value)
    assert "lr: 0.0001 -> 0.0003" in message and "micro_batch_size: 2 -> 4" in message
    assert "--allow-config-change lr,micro_batch_size" in message
    with pytest.raises(SystemExit, match="micro_batch_size"):  # allowing one change does not allow the other
        record_config(run, changed, resume=True, ignore=ignore, allowed_changes=["lr"])
    assert record_config(run, changed, resume=True, ignore=ignore, allowed_changes=["lr", "micro_batch_size"]) == {
        "lr": (1e-4, 3e-4), "micro_batch_size": (2, 4), "resume": (None, True)}
    assert (run / "config.json").read_bytes() == original
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and history[-1]["changes"] == {"lr": [1e-4, 3e-4], "micro_batch_size": [2, 4],
                                                            "resume": [None, True]}


def test_config_changes_sees_added_and_removed_keys():
    assert config_changes({"a": 1, "b": [1, 2]}, {"a": 1, "b": (1, 2)}, []) == {}
    assert config_changes({"a": 1}, {"a": 1, "c": 0}, []) == {"c": (None, 0)}
    assert config_changes({"a": 1, "d": 2}, {"a": 1}, ["d"]) == {}
