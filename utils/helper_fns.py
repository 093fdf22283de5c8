"""Small generic helpers: seeding, JSON Lines I/O, prompt files, device choice."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"


def seed_everything(seed: int) -> None:
    """Seed python, numpy (if present) and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    import torch

    torch.manual_seed(seed)


def _open_text(path: Path, mode: str = "rt"):
    return gzip.open(path, mode, encoding="utf-8") if str(path).endswith(".gz") else open(path, mode, encoding="utf-8")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, record)` for each non-empty line of a JSON Lines file (optionally .gz).

    Raises:
        ValueError: naming the file and 1-based line when a line is not a JSON object.
    """
    path = Path(path)
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record


def load_records(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """Load a JSON Lines file or a JSON array file into `(location, record)` pairs.

    The published MATH files are JSON arrays despite their `.jsonl` suffix, so the format is sniffed
    from the first non-space character, not taken from the name. `location` is `"file:line"` for JSON
    Lines and `"file[index]"` for arrays, for error messages.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with _open_text(path) as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        with _open_text(path) as f:
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: malformed JSON array ({e.msg})") from None
        out = []
        for i, rec in enumerate(items):
            if not isinstance(rec, dict):
                raise ValueError(f"{path}[{i}]: expected a JSON object, got {type(rec).__name__}")
            out.append((f"{path}[{i}]", rec))
        return out
    return [(f"{path}:{line_no}", rec) for line_no, rec in iter_jsonl(path)]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSON Lines file (or JSON array), without locations."""
    return [rec for _, rec in load_records(path)]


def append_jsonl(path: str | os.PathLike, records: list[dict] | dict) -> None:
    """Append one or more records to a JSON Lines file and flush, so an interrupted run keeps them."""
    if isinstance(records, dict):
        records = [records]
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def load_prompt(name_or_path: str | os.PathLike) -> str:
    """Read a prompt template byte-exact (no newline stripping).

    `name_or_path` is a path, or a bare name like `r1_zero` resolved to `data/r1_zero.prompt`.
    """
    p = Path(name_or_path)
    if not p.exists() and p.suffix == "" and (DATA_DIR / f"{name_or_path}.prompt").exists():
        p = DATA_DIR / f"{name_or_path}.prompt"
    if not p.exists():
        raise FileNotFoundError(f"prompt file not found: {name_or_path}")
    with open(p, "r", encoding="utf-8", newline="") as f:
        return f.read()


def check_writable_dir(path: str | os.PathLike, flag: str = "--output-dir") -> Path:
    """Create `path` if needed and check that it is writable, before any model is loaded."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"{flag} {p}: not writable ({e.strerror})") from None
    return p


def pick_device(requested: str = "auto") -> str:
    """`auto` -> `cuda` when available else `cpu`; anything else is returned unchanged."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
