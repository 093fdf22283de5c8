"""Small generic helpers: seeding, JSON Lines I/O, prompt files, device choice."""

from __future__ import annotations

import contextlib
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
    """Open a text file, gzip-compressed when its name ends in .gz; "rb" opens it as bytes."""
    encoding = None if "b" in mode else "utf-8"
    return (gzip.open(path, mode, encoding=encoding) if str(path).endswith(".gz")
            else open(path, mode, encoding=encoding))


def _decode_line(raw: bytes, path: Path, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                         f"re-encode the file as UTF-8") from None  # fmt: skip


def _read_text(path: Path) -> str:
    """The whole file as UTF-8 text; a bad byte is reported with its line and column."""
    with _open_text(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw.count(b"\n", 0, e.start) + 1
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                         f"{e.start - line_start + 1}); re-encode the file as UTF-8") from None  # fmt: skip


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, record)` for each non-empty line of a JSON Lines file (optionally .gz).

    Raises:
        ValueError: naming the file and 1-based line when a line is not a JSON object.
    """
    path = Path(path)
    with _open_text(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, line_no)
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
    with _open_text(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        try:
            items = json.loads(_read_text(path))
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


@contextlib.contextmanager
def data_errors_exit():
    """Inside the block, a ValueError from reading a data file (the readers name `file:line` and what is wrong) ends
    the script with that message alone: a bad record is the user's to fix, not a traceback to read."""
    try:
        yield
    except ValueError as e:
        raise SystemExit(f"data error: {e}") from None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read 1 MiB at a time."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
