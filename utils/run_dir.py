"""A run folder belongs to one run: its name, its lock, and the config it was started with.

Rules (each a refusal with a message that names the folder and the ways on, never a silent repair):
- A run name is one path component: no separators, no `..`, not absolute, so a run never writes outside
  `--output-dir`.
- A folder that already holds a run is continued only with `--resume`; `--overwrite` moves it aside to
  `<name>.replaced-<UTC time>` (nothing is deleted); anything else is refused.
- One process writes a run at a time: `RunLock` holds an exclusive `flock` on `<run>/.lock` for the run's lifetime.
  The kernel drops it when the process dies, so a lock left by a killed run is detected (the file names its pid) and
  reported when the next run takes it over; a lock held by a live process is refused.
- `config.json` is written once, when the run starts, and never rewritten. A resume compares the new settings with
  it; a change that alters the training trajectory is refused, naming each setting, unless it is allowed by name
  (`--allow-config-change`); every resume appends its settings and the allowed changes to `config_history.jsonl`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from pathlib import Path
from typing import Iterable

from utils.helper_fns import append_jsonl, check_writable_dir, write_json

RUN_MARKERS = ("config.json", "metrics.jsonl", "checkpoints")  # any of these means the folder holds a run


def check_run_name(name: str, flag: str = "--run-name") -> str:
    """Return `name` if it is a single safe path component; SystemExit naming `flag` otherwise."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name or name.startswith("~"):
        raise SystemExit(f"{flag} {name!r}: must be a plain folder name (no '/', '\\', '..', '~'); the run is "
                         f"written under --output-dir")  # fmt: skip
    if (os.altsep and os.altsep in name) or Path(name).is_absolute() or name.strip() != name:
        raise SystemExit(f"{flag} {name!r}: must be a plain folder name without leading/trailing spaces")
    return name


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / m).exists() for m in RUN_MARKERS)


def utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def prepare_run_dir(output_dir: str | os.PathLike, run_name: str, resume: bool, overwrite: bool) -> Path:
    """The run folder `output_dir/run_name`, created and checked writable; refuses to mix two runs.

    Args:
        resume: continue the run already in the folder (it must hold one).
        overwrite: the folder holds another run that the caller wants replaced: it is renamed to
            `<run_name>.replaced-<UTC time>` beside it, never deleted.

    Raises:
        SystemExit: naming the folder and the ways on.
    """
    check_run_name(run_name)
    if resume and overwrite:
        raise SystemExit("--resume and --overwrite contradict each other: continue the run, or move it aside")
    run_dir = Path(output_dir) / run_name
    if run_dir.exists() and not run_dir.is_dir():
        raise SystemExit(f"--run-name {run_name}: {run_dir} exists and is not a folder")
    if resume and not holds_run(run_dir):
        raise SystemExit(f"--resume: {run_dir} holds no run to continue (no config.json, metrics.jsonl or "
                         f"checkpoints/)")  # fmt: skip
    if not resume and holds_run(run_dir):
        if not overwrite:
            raise SystemExit(
                f"{run_dir} already holds a run. Continue it with --resume, pick a new --run-name, or pass "
                f"--overwrite to move the old run aside (renamed, not deleted)"
            )
        aside = run_dir.with_name(f"{run_name}.replaced-{utc_stamp()}")
        lock = RunLock(run_dir)
        lock.acquire()  # never move a folder another process is writing
        lock.release()
        run_dir.rename(aside)
        print(f"--overwrite: moved the earlier run {run_dir} to {aside}", flush=True)
    return check_writable_dir(run_dir, "--output-dir")


@contextlib.contextmanager
def claimed_run(output_dir: str | os.PathLike, run_name: str, settings: dict, resume: bool, overwrite: bool,
                allowed_changes: Iterable[str] = ()):  # fmt: skip
    """The trainers' way into a run folder: `prepare_run_dir`, the `RunLock` held for the block, and on resume
    `check_resume_config` of `settings` (the script's flags; "device" is saved resolved, so it is compared later by
    `record_config`). Yields the run folder."""
    run_dir = prepare_run_dir(output_dir, run_name, resume, overwrite)
    with RunLock(run_dir):
        if resume:
            flags = {k: v for k, v in settings.items() if k != "device"}
            check_resume_config(run_dir, flags, allowed_changes=allowed_changes)
        yield run_dir


class RunLock:
    """An exclusive lock on a run folder for the lifetime of the process that writes it (`fcntl.flock`).

    `acquire` refuses (SystemExit) while another live process holds it. A lock file whose holder died (kill -9, a
    crash) is not locked any more: it is taken over with a printed note naming the dead holder. Use as a context
    manager or call `acquire` / `release`. Local file systems only (flock over NFS depends on the mount).
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._read_holder(fd)
            os.close(fd)
            raise SystemExit(f"{self.path.parent} is in use by another process ({holder}); wait for it to end or "
                             f"use another --run-name") from None  # fmt: skip
        previous = self._read_holder(fd)
        if previous:
            print(f"run lock: {self.path} was left by a process that has ended ({previous}); taking it over",
                  flush=True)  # fmt: skip
        info = f"pid {os.getpid()} on {socket.gethostname()} since {utc_stamp()}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _read_holder(fd: int) -> str:
        try:
            return os.pread(fd, 4096, 0).decode(errors="replace").strip()
        except OSError:
            return ""

    def release(self) -> None:
        """Unlock and remove the lock file (a clean end leaves no lock behind)."""
        if self._fd is None:
            return
        import fcntl

        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _normalized(value):
    """JSON round trip, so a saved config (lists, floats) compares equal to the same live settings (tuples)."""
    return json.loads(json.dumps(value, default=str))


def config_changes(saved: dict, current: dict, ignore: Iterable[str]) -> dict[str, tuple]:
    """Settings whose value differs between a run's saved config and a resume's: {key: (saved, current)}.

    `ignore` lists the keys that cannot change the training trajectory (where logs go, how often to save, ...).
    A key present on one side only counts as changed.
    """
    skip = set(ignore)
    keys = (set(saved) | set(current)) - skip
    missing = object()
    out = {}
    for key in sorted(keys):
        a, b = saved.get(key, missing), _normalized(current.get(key, missing)) if key in current else missing
        if a != b:
            out[key] = (None if a is missing else a, None if b is missing else b)
    return out


# Settings a resume may change without changing what is trained or how it is evaluated: where the run folder is (a
# copied run resumes under its new name; `resolved_model` is a path, the model itself is `model`), where logs go,
# how often checkpoints are kept, how fast the grader or engine runs. Everything else must match config.json.
RESUME_SAFE_KEYS = ("run_name", "run_dir", "output_dir", "resolved_model", "resume", "overwrite",
                    "allow_config_change", "eval_every", "save_every", "keep_last", "wandb_project", "wandb_entity",
                    "wandb_tags", "grader_workers", "gpu_memory_utilization", "vllm_device", "peak_tflops", "cache_dir",
                    "plan_only", "gpu_memory_gib", "vllm_sleep")  # fmt: skip


def check_resume_config(run_dir: Path, settings: dict, ignore: Iterable[str] = RESUME_SAFE_KEYS,
                        allowed_changes: Iterable[str] = ()) -> dict[str, tuple]:  # fmt: skip
    """Before anything loads: compare a resume's flags with the run's config.json (only the keys in `settings`; the
    derived ones are compared by `record_config` once known). SystemExit naming each refused change."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return {}
    saved = _read_config(path)
    saved = {k: v for k, v in saved.items() if k in settings}
    return _refuse_changes(run_dir, saved, settings, ignore, allowed_changes)


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"{path}: not readable as JSON ({e}); cannot check the resume's settings") from None


def _refuse_changes(run_dir, saved, current, ignore, allowed_changes) -> dict[str, tuple]:
    """Every changed setting (the resume-safe ones too, for the record); SystemExit on the others not allowed."""
    changes = config_changes(saved, current, ())
    refused = {k: v for k, v in changes.items() if k not in set(ignore) and k not in set(allowed_changes)}
    if refused:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise SystemExit(
            f"--resume with settings that change the training trajectory of {run_dir}:\n{lines}\nRun with the saved "
            f"settings ({Path(run_dir) / 'config.json'}), or allow the change explicitly: --allow-config-change "
            f"{','.join(refused)}"
        )
    return changes


def record_config(run_dir: Path, config: dict, resume: bool, ignore: Iterable[str] = RESUME_SAFE_KEYS,
                  allowed_changes: Iterable[str] = ()) -> dict[str, tuple]:  # fmt: skip
    """Write `config.json` for a new run; on resume, refuse trajectory changes and append to `config_history.jsonl`.

    Args:
        config: this invocation's settings (JSON-serializable).
        resume: the folder holds this run's `config.json` already; it is compared, never rewritten.
        ignore: keys that may change on resume without altering the trajectory.
        allowed_changes: keys the user allows to change (`--allow-config-change`); recorded in the history.

    Returns:
        Every changed setting {key: (saved, new)}, resume-safe ones included (all allowed, or the call raised).

    Raises:
        SystemExit: naming every changed setting that is not allowed.
    """
    path = Path(run_dir) / "config.json"
    if not resume or not path.exists():
        write_json(path, config)
        return {}
    changes = _refuse_changes(run_dir, _read_config(path), config, ignore, allowed_changes)
    append_jsonl(Path(run_dir) / "config_history.jsonl",
                 {"resumed_at": utc_stamp(), "changes": {k: list(v) for k, v in changes.items()}, "config": config})
    return changes
