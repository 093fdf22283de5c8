"""One metrics logger: a JSON row per call appended to `<run_dir>/metrics.jsonl`, mirrored to wandb when asked."""

from __future__ import annotations

import math
import secrets
import time
from pathlib import Path
from typing import Any

from utils.helper_fns import append_jsonl, write_json


def _plain(v: Any) -> Any:
    """Tensors and numpy scalars -> python numbers; NaN/inf kept as floats (json writes NaN/Infinity)."""
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except (ValueError, RuntimeError):
            return v
    return v


class MetricsLogger:
    """Append-only metrics log for one run.

    Rows look like `{"step": 10, "time": ..., "train/loss": 0.41, ...}`: `train/*` keys are logged on the train-step
    axis and `eval/*` keys on the eval-step axis, which in wandb is the same `step` value with its own x-axis metric.
    Plot scripts read `metrics.jsonl`, never the wandb API, so a run logged locally plots the same as one mirrored.

    Args:
        run_dir: the run's folder; `config.json` and `metrics.jsonl` are written there.
        config: written to `config.json` at construction (before step 0) unless the folder has one already, which
            is never rewritten (`utils.run_dir.record_config` checks a resume's settings against it).
        wandb_project: empty = local only; otherwise mirror every row to this wandb project.
        wandb_run_name: wandb run name (defaults to the run folder's name).
        resume: keep existing metrics.jsonl rows (a resumed run appends after its last row) and continue the same
            wandb run (its id is kept in `<run_dir>/wandb_run_id`). Without it an existing metrics.jsonl is an error:
            the folder holds another run.
        wandb_entity, wandb_tags: passed to `wandb.init` (empty = wandb's defaults).
    """

    def __init__(
        self,
        run_dir: str | Path,
        config: dict,
        wandb_project: str = "",
        wandb_run_name: str = "",
        resume: bool = False,
        wandb_entity: str = "",
        wandb_tags: tuple[str, ...] | list[str] = (),
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if not resume and self.path.exists() and self.path.stat().st_size > 0:
            raise FileExistsError(f"{self.path} exists: that folder holds another run (resume it, or use a new one)")
        if not (self.run_dir / "config.json").exists():
            write_json(self.run_dir / "config.json", config)
        self._wandb = None
        if wandb_project:
            import wandb

            id_file = self.run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if resume and id_file.exists() else ""
            if not run_id:
                run_id = secrets.token_hex(4)  # wandb accepts any id of letters and digits
                id_file.write_text(run_id + "\n")
            self._wandb = wandb.init(
                project=wandb_project,
                entity=wandb_entity or None,
                tags=list(wandb_tags) or None,
                id=run_id,
                name=wandb_run_name or self.run_dir.name,
                config=config,
                dir=str(self.run_dir),
                resume="allow",
            )
            wandb.define_metric("train_step")
            wandb.define_metric("eval_step")
            wandb.define_metric("train/*", step_metric="train_step")
            wandb.define_metric("eval/*", step_metric="eval_step")

    def truncate_after(self, step: int) -> int:
        """Drop rows logged after `step` (a resumed run restarts from its checkpoint there); returns rows dropped."""
        if not self.path.exists():
            return 0
        import json

        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        keep = []
        for line_no, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if line_no == len(lines):  # a write cut off by the kill this run is resuming from
                    print(f"{self.path}:{line_no}: dropping a partial last line (interrupted write)", flush=True)
                    continue
                raise ValueError(f"{self.path}:{line_no}: malformed JSON ({e.msg}); not a partial last line") from None
            if row["step"] <= step:
                keep.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        tmp.replace(self.path)
        return len(lines) - len(keep)

    def log(self, metrics: dict[str, Any], step: int) -> dict:
        """Append one row for `step`; returns the row as written."""
        row = {"step": int(step), "time": time.time()}
        row.update({k: _plain(v) for k, v in metrics.items()})
        append_jsonl(self.path, row)
        if self._wandb is not None:
            payload = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
            if any(k.startswith("train/") for k in payload):
                payload["train_step"] = step
            if any(k.startswith("eval/") for k in payload):
                payload["eval_step"] = step
            self._wandb.log(payload)
        return row

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Mirror a table (e.g. sample generations) to wandb; the JSONL copy is the caller's samples file."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Table(columns=columns, data=rows), "eval_step": step})

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def format_step_line(step: int, metrics: dict[str, Any]) -> str:
    """The one console line per step: `step 00010 | loss 0.412 | lr 1.0e-04 | 812 ms | 31.2k tok/s`."""
    parts = [f"step {step:05d}"]
    loss = _plain(metrics.get("train/loss", float("nan")))
    parts.append(f"loss {loss:.4f}" if math.isfinite(loss) else f"loss {loss}")
    if "train/lr" in metrics:
        parts.append(f"lr {_plain(metrics['train/lr']):.1e}")
    if "train/grad_norm" in metrics:
        parts.append(f"gnorm {_plain(metrics['train/grad_norm']):.2f}")
    if "train/step_time_s" in metrics:
        parts.append(f"{1000 * _plain(metrics['train/step_time_s']):.0f} ms")
    if "train/tokens_per_s" in metrics:
        parts.append(f"{_plain(metrics['train/tokens_per_s']) / 1000:.1f}k tok/s")
    return " | ".join(parts)
