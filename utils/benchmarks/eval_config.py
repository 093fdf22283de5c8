"""What both evaluate scripts share about their inputs: the YAML config files in data/eval_configs/ and the model slug
used in default output folder names."""

from __future__ import annotations

import os
import re
from pathlib import Path


def load_eval_config(path: str | os.PathLike, known: set[str], extra_keys: tuple[str, ...] = ("benchmark",)) -> dict:
    """The settings of one `data/eval_configs/*.yaml` file, keys with dashes turned into underscores.

    Args:
        path: the YAML file (a mapping whose keys are the evaluate script's flags, plus `extra_keys`).
        known: the script's flag destinations.
        extra_keys: keys that are not flags but may appear (e.g. `benchmark`, `sample_data`).

    Raises:
        ValueError: the file is missing, is not a mapping, or has a key that is neither a flag nor an extra key.
    """
    import yaml

    if not Path(path).exists():
        raise ValueError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of flag names to values, got {type(raw).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - set(known) - set(extra_keys))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; keys are this script's flags")
    return values


def model_slug(model: str) -> str:
    """A hub id or a model folder as one safe path component: its last part, other characters -> "-"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or model)
