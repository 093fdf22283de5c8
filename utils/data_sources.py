"""Where records come from: a local JSON / JSON Lines / Parquet file, or a dataset on the Hugging Face hub.

Every loader in the repo takes `(location, record)` pairs, `location` naming the record in errors. Local JSON and
JSON Lines files keep their own reader (`utils.helper_fns.load_records`: `file:line`, `.gz`, JSON arrays sniffed);
Parquet files and hub datasets go through the `datasets` library, located as `file[row i]` and
`owner/name[config/split][row i]`, null cells dropped (`_present`). `import datasets` happens only for those.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from utils.helper_fns import load_records as load_json_records

JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
FILE_SUFFIXES = JSON_SUFFIXES + (".parquet", ".csv", ".txt", ".gz")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def is_hub_id(source: str | os.PathLike) -> bool:
    """True when `source` names a hub dataset (`owner/name` or `name`): no such local path and no file suffix."""
    text = str(source)
    if Path(text).exists() or not _HUB_ID.match(text):
        return False
    return not text.lower().endswith(FILE_SUFFIXES)


def check_source(source: str | os.PathLike, flag: str) -> None:
    """Refuse, before any model loads, a local path that does not exist (a hub id is checked when loaded)."""
    if not is_hub_id(source) and not Path(source).exists():
        raise SystemExit(f"{flag} {source}: file not found (a local JSON, JSONL or Parquet file, or a hub dataset id)")


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE",
                                                                                    "HF_DATASETS_OFFLINE"))


def load_records(source: str | os.PathLike, split: str = "train", config: str | None = None) -> list[tuple[str, dict]]:
    """All records of `source` as `(location, record)` pairs, in file / dataset order.

    Args:
        source: a local `.json`/`.jsonl` (optionally `.gz`) or `.parquet` file, or a hub dataset id.
        split: the hub dataset's split (ignored for local files, which are one split).
        config: the hub dataset's configuration name (None = its default).

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: a malformed local file (naming `file:line`), or a hub dataset that cannot be loaded (offline,
            unknown id, split or config), with what to do.
    """
    text = str(source)
    if not is_hub_id(text):
        path = Path(text)
        if path.suffix.lower() != ".parquet":
            return load_json_records(path)  # unchanged local path: the reader every script used before
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        import datasets

        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        return [(f"{path}[row {i}]", _present(rec)) for i, rec in enumerate(ds)]
    import datasets

    where = f"{text}[{config + '/' if config else ''}{split}]"
    try:
        ds = datasets.load_dataset(text, config, split=split)
    except (ConnectionError, OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        hint = (" HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set: only datasets already in the local `datasets` cache "
                "load; pass a local JSON, JSONL or Parquet file instead." if _hub_offline() else "")
        raise ValueError(f"{where}: cannot load this hub dataset ({type(e).__name__}: {str(e)[:300]}).{hint}") from None
    return [(f"{where}[row {i}]", _present(rec)) for i, rec in enumerate(ds)]


def _present(rec: dict) -> dict:
    """A columnar row as a record: a null cell is a key the record does not have (a column exists for every row as
    soon as one row has it, so `{"answer": ...}` rows beside `{"expected_answer": ...}` rows get nulls)."""
    return {k: v for k, v in rec.items() if v is not None}


def source_name(source: str | os.PathLike) -> str:
    """A short name of a source for run names and log lines: the file's stem or the hub id's last part."""
    return Path(str(source)).name.split(".")[0] if not is_hub_id(source) else str(source).split("/")[-1]
