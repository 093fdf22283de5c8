"""Read what runs wrote under results/ and style the figures drawn from it; the plot scripts' shared half.

Only files are read (`config.json`, `metrics.jsonl`, eval `summary.json`), never the wandb API, so a run plots the
same on any machine. A run, metric or summary that is missing is named in a `warning:` line on stderr and skipped.
"""

from __future__ import annotations

import glob
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from utils.helper_fns import read_jsonl

# ---- published numbers of the earlier implementation of the CS336 spring 2025 assignment 5 SFT parts and supplement
# (the team's REFERENCE.md, which also gives their settings). Fractions, not percent. Drawn as base-model lines and
# printed as "published" table rows.
REFERENCE_REASON_MODEL = "Qwen/Qwen2.5-Math-1.5B"
REFERENCE_REASON = {  # MATH val, 5,000 problems, r1_zero grader, temperature 1.0
    "base model": {"accuracy": 0.0288, "format_accuracy": 0.1438},
    "all 4,836 traces, 38 steps": {"accuracy": 0.4214, "format_accuracy": 0.9924},
    "3,496 correct traces, 38 steps": {"accuracy": 0.5204, "format_accuracy": 0.9906},
    "same, summed loss instead of per-example mean": {"accuracy": 0.5106, "format_accuracy": 0.9898},
    "3,496 correct traces, 56 steps": {"accuracy": 0.5336, "format_accuracy": 0.9926},
}
REFERENCE_INSTRUCT_MODEL = "meta-llama/Llama-3.1-8B"
REFERENCE_INSTRUCT = {  # keys are "<benchmark>/<summary key>" as in INSTRUCT_HEADLINES
    "base model": {"gsm8k/accuracy": 0.164, "mmlu/accuracy": 0.581, "sst/safe_rate": 0.62,
                   "alpaca_eval/lc_win_rate": 0.0157},
    "SFT, no masking": {"gsm8k/accuracy": 0.290, "mmlu/accuracy": 0.584, "sst/safe_rate": 0.78,
                        "alpaca_eval/lc_win_rate": 0.0523},
    "SFT, prompt masking": {"gsm8k/accuracy": 0.327, "mmlu/accuracy": 0.582, "sst/safe_rate": 0.77,
                            "alpaca_eval/lc_win_rate": 0.0449},
}

# ---- where instruction evals live. Assumed until evaluate_instruct.py lands; adjust here and nowhere else.
# One folder per checkpoint under the run: "base" for the untrained model, otherwise a name ending in the step
# number ("200", "step_000200" and "checkpoint-200" all parse to step 200).
INSTRUCT_EVAL_LAYOUT = "eval/{checkpoint}/{benchmark}/summary.json"
INSTRUCT_BASE_CHECKPOINT = "base"
MMLU_CATEGORIES = ("STEM", "humanities", "social sciences", "other")  # keys of mmlu summary["per_category"]


@dataclass(frozen=True)
class Headline:
    """One headline number of an instruction benchmark: `summary.json[key]` of `<benchmark>/`, a fraction in [0, 1]."""

    benchmark: str
    key: str
    title: str
    fmt: str  # as the REFERENCE.md tables print it

    @property
    def name(self) -> str:
        return f"{self.benchmark}/{self.key}"


INSTRUCT_HEADLINES = (
    Headline("gsm8k", "accuracy", "GSM8K accuracy", "{:.1%}"),
    Headline("mmlu", "accuracy", "MMLU accuracy", "{:.1%}"),
    Headline("sst", "safe_rate", "SimpleSafetyTests safe share", "{:.0%}"),
    # alpaca_eval's own leaderboard prints percent (5.23); the summary is assumed to hold the fraction (0.0523).
    Headline("alpaca_eval", "lc_win_rate", "AlpacaEval LC win rate", "{:.2%}"),
)
REASON_FMT = "{:.4f}"  # the reasoning table in REFERENCE.md prints accuracies to 4 decimals

# Figure file names, shared by the plot scripts (which write them) and make_results_readme.py (which links them).
FIG_REASON_ACCURACY = "reason_accuracy.png"
FIG_REASON_TRAIN = "reason_train.png"
FIG_REASON_SWEEP = "reason_sweep.png"
FIG_INSTRUCT_OVERLAY = "instruct_benchmarks_overlay.png"
FIG_MMLU_CATEGORIES = "instruct_mmlu_categories.png"
FIG_MMLU_SUBJECTS = "instruct_mmlu_subjects.png"


def fig_instruct_run(label: str) -> str:
    """File name of one instruction run's 4-panel figure."""
    return f"instruct_benchmarks_{slug(label)}.png"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def warn(message: str) -> None:
    """The one way these scripts report something skipped: one line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_json(path: str | Path) -> dict | None:
    """A JSON object from `path`, or None (with a warning naming the file) when it is missing or not an object."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        warn(f"{path}: missing; skipped")
        return None
    except json.JSONDecodeError as e:
        warn(f"{path}: malformed JSON ({e.msg}); skipped")
        return None
    if not isinstance(obj, dict):
        warn(f"{path}: expected a JSON object; skipped")
        return None
    return obj


def summary_metrics(summary: dict) -> dict:
    """The metrics of an eval summary.json: `summary["metrics"]` as utils/benchmarks run_benchmark writes it, or the
    top level for a flat summary."""
    return summary["metrics"] if isinstance(summary.get("metrics"), dict) else summary


# ---- runs


@dataclass
class Run:
    """One run folder: its label for legends and tables, its config, and its metrics rows (empty if none)."""

    label: str
    path: Path
    config: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    pattern_index: int = 0  # which --runs pattern matched it (per-pattern flags such as --final-evals use it)


def expand_runs(patterns: list[str], labels: list[str] | None, marker: str, flag: str = "--runs") -> list[Run]:
    """Run folders matching each glob in `patterns`, in flag order, each labelled.

    Args:
        patterns: globs of run folders (plain paths work too), relative to the working directory.
        labels: one label per pattern, or None/empty for the folder names; a pattern matching several folders
            labels them "<label> <folder name>".
        marker: a path inside a folder that makes it a run of the wanted kind ("metrics.jsonl", "eval").
        flag: the flag name used in messages.
    Returns:
        Runs with `config` loaded (empty dict and a warning when config.json is missing); `rows` not yet loaded.
        A pattern that matches no run is named in a warning. A folder matched twice is kept once.
    """
    if labels and len(labels) != len(patterns):
        raise SystemExit(f"{flag} has {len(patterns)} patterns but the labels flag has {len(labels)}; "
                         "give one label per pattern")
    runs, seen = [], set()
    for i, pattern in enumerate(patterns):
        matches = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / marker).exists())
        if not matches:
            warn(f"{flag} {pattern!r}: no run folder with {marker} matches; skipped")
            continue
        for path in matches:
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            if labels:
                label = labels[i] if len(matches) == 1 else f"{labels[i]} {path.name}"
            else:
                label = path.name
            config = read_json(path / "config.json") if (path / "config.json").exists() else None
            if config is None:
                warn(f"{path}: no config.json; model and data columns will be blank")
            runs.append(Run(label=label, path=path, config=config or {}, pattern_index=i))
    return runs


def load_metrics(run: Run) -> list[dict]:
    """`run.rows` = the rows of metrics.jsonl, ordered by step; a step logged twice keeps each key's last value."""
    path = run.path / "metrics.jsonl"
    if not path.exists():
        warn(f"{run.label}: {path} missing; no curves for this run")
        run.rows = []
        return run.rows
    run.rows = sorted(read_jsonl(path), key=lambda r: r.get("step", 0))  # stable: later rows of a step stay later
    return run.rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the rows that carry it, one value per step (the last logged), by step."""
    by_step: dict[int, float] = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            by_step[int(row["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def last_value(rows: list[dict], key: str) -> tuple[int, float] | None:
    """(step, value) of the last finite `key` in the rows, or None."""
    steps, values = series(rows, key)
    finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    return finite[-1] if finite else None


def find_final_summary(run: Run, given: str | None) -> Path | None:
    """The full-val summary.json of a reasoning run (evaluate_reason.py output), or None.

    `given`: a summary.json path or its folder, "none" to skip, or "auto" (or None) to look in `<run>/eval_full/`,
    then in `<run>/*/`, then in sibling folders of the run whose summary names a model inside the run folder
    (evaluate_reason.py's default output, results/eval_reason_<checkpoint>_..., sits next to the run). Among
    several, the newest is used and named.
    """
    if given == "none":
        return None
    if given and given != "auto":
        path = Path(given)
        path = path / "summary.json" if path.is_dir() else path
        if not path.exists():
            warn(f"{run.label}: final eval {path} missing; no full-val marker")
            return None
        return path
    preferred = run.path / "eval_full" / "summary.json"
    if preferred.exists():
        return preferred
    found = sorted(run.path.glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        found = sorted((p for p in run.path.parent.glob("*/summary.json") if _evaluates(p, run.path)),
                       key=lambda p: p.stat().st_mtime)  # fmt: skip
    if not found:
        warn(f"{run.label}: no full-val summary.json in {run.path}/eval_full, {run.path}/*/ or a sibling folder "
             "evaluating one of its checkpoints; no full-val marker")
        return None
    if len(found) > 1:
        print(f"{run.label}: {len(found)} summary.json files under {run.path}; using the newest, {found[-1]}")
    return found[-1]


def _evaluates(summary_path: Path, run_dir: Path) -> bool:
    """Whether the summary's model (or its config.json's) is a folder inside `run_dir`, e.g. one of its checkpoints."""
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        model = summary.get("model") if isinstance(summary, dict) else None
        if not model and (summary_path.parent / "config.json").exists():
            model = json.loads((summary_path.parent / "config.json").read_text(encoding="utf-8")).get("model")
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return bool(model) and Path(str(model)).resolve().is_relative_to(run_dir.resolve())


# ---- instruction evals


@dataclass
class Checkpoint:
    """One evaluated checkpoint of an instruction run: its step (None = base model) and summaries by benchmark."""

    name: str
    step: int | None
    summaries: dict[str, dict]

    def value(self, headline: Headline) -> float | None:
        v = self.summaries.get(headline.benchmark, {}).get(headline.key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def checkpoint_step(name: str) -> int | None:
    """Step of a checkpoint folder name ("base" -> None; "200", "step_000200", "checkpoint-200" -> 200)."""
    if name == INSTRUCT_BASE_CHECKPOINT:
        return None
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else -1


def load_instruct_evals(run: Run) -> list[Checkpoint]:
    """All evaluated checkpoints of an instruction run, base first then by step (INSTRUCT_EVAL_LAYOUT).

    Folders whose name has no step number are named in a warning and skipped. A headline value above 1 is named
    in a warning, since every headline is assumed to be a fraction.
    """
    eval_root = run.path / INSTRUCT_EVAL_LAYOUT.split("/{checkpoint}")[0]
    checkpoints = []
    for folder in sorted(p for p in eval_root.glob("*") if p.is_dir()):
        step = checkpoint_step(folder.name)
        if step == -1:
            warn(f"{run.label}: {folder} is neither '{INSTRUCT_BASE_CHECKPOINT}' nor ends in a step number; skipped")
            continue
        summaries = {}
        for bench in sorted({h.benchmark for h in INSTRUCT_HEADLINES}):
            path = run.path / INSTRUCT_EVAL_LAYOUT.format(checkpoint=folder.name, benchmark=bench)
            if path.exists():
                summary = read_json(path)
                if summary is not None:
                    summaries[bench] = summary_metrics(summary)
        checkpoints.append(Checkpoint(folder.name, step, summaries))
    checkpoints.sort(key=lambda c: -1 if c.step is None else c.step)
    for c in checkpoints:
        for h in INSTRUCT_HEADLINES:
            v = c.value(h)
            if v is not None and v > 1.0:
                warn(f"{run.label} {c.name}: {h.name} = {v} > 1, but INSTRUCT_HEADLINES assumes fractions (percent?)")
    return checkpoints


# ---- style


def use_agg() -> None:
    """Select the file-only backend and the house style; called by each plot script's main()."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({
        "figure.dpi": 100, "savefig.dpi": 150, "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
        "legend.fontsize": 9, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
        "axes.spines.right": False, "lines.linewidth": 2.0, "lines.markersize": 5,
    })  # fmt: skip


def run_colors(labels: list[str]) -> dict[str, tuple]:
    """A color per label, fixed by the order the runs were given, so a run has one color in every figure."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` as PNG (tight bounding box), close it, print the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path


# ---- dataset-size sweep


@dataclass
class SweepPoint:
    """One run of a dataset-size sweep: its group ("all"/"filtered" or a flag-given name) and scores."""

    run: Run
    group: str
    num_examples: int  # unique training examples the run saw (config train_examples, else num_examples)
    full: bool  # trained on the whole file (num_examples == -1)
    accuracy: float
    format_accuracy: float | None
    source: str  # "full val (n=...)" or "in-loop step N"


def sweep_group(run: Run, given: str | None) -> str:
    """The flag-given group, else "filtered" when the train file's name says so, else "all"."""
    if given:
        return given
    return "filtered" if "filtered" in Path(str(run.config.get("train_file", ""))).name else "all"


def sweep_points(runs: list[Run], groups: list[str] | None, score: str) -> list[SweepPoint]:
    """Score each sweep run; runs without a size or a score are named in a warning and skipped.

    Args:
        groups: one group name per --sweep-runs pattern (None = from the train file name).
        score: "final" = full-val summary.json, "in_loop" = last in-loop eval, "auto" = final when every run has
            one, else in_loop for all (a sweep mixing the two would compare different val sets).
    """
    finals = {r.label: find_final_summary(r, "auto") for r in runs} if score in ("auto", "final") else {}
    if score == "auto":
        score = "final" if runs and all(finals.values()) else "in_loop"
        print(f"sweep: scoring by {'full-val summary.json' if score == 'final' else 'last in-loop eval'} "
              f"({'every' if score == 'final' else 'not every'} sweep run has a full-val summary)")
    points = []
    for run in runs:
        n = run.config.get("train_examples", run.config.get("num_examples"))
        full = run.config.get("num_examples", -1) == -1
        if not isinstance(n, int) or n < 0:
            warn(f"sweep {run.label}: config.json has neither train_examples nor num_examples >= 0; skipped")
            continue
        if score == "final":
            summary = read_json(finals[run.label]) if finals.get(run.label) else None
            summary = summary_metrics(summary) if summary is not None else None
            if summary is None or not isinstance(summary.get("accuracy"), (int, float)):
                warn(f"sweep {run.label}: no full-val accuracy; skipped")
                continue
            acc, fmt = summary["accuracy"], summary.get("format_accuracy")
            source = f"full val (n={summary.get('num_examples', '?')})"
        else:
            rows = run.rows or load_metrics(run)
            last = last_value(rows, "eval/math/accuracy")
            if last is None:
                warn(f"sweep {run.label}: no eval/math/accuracy in metrics.jsonl; skipped")
                continue
            step, acc = last
            fmt_rows = [r for r in rows if r.get("step") == step and "eval/math/format_accuracy" in r]
            fmt = fmt_rows[-1]["eval/math/format_accuracy"] if fmt_rows else None
            source = f"in-loop step {step}"
        group = sweep_group(run, groups[run.pattern_index] if groups else None)
        points.append(SweepPoint(run, group, n, full, float(acc), None if fmt is None else float(fmt), source))
    return sorted(points, key=lambda p: (p.group, p.num_examples))


def sweep_means(points: list[SweepPoint], attr: str) -> dict[str, list[tuple[int, float, list[float], bool]]]:
    """Per group, per unique-example count: (count, mean of `attr` over the runs there, their values, whether it is
    the whole file). Several runs at one size are seeds: the figure draws their mean as the line and each as a dot,
    never a line through the seeds one after another. Runs whose `attr` is None are left out."""
    by_key: dict[tuple[str, int], list[SweepPoint]] = {}
    for p in points:
        if getattr(p, attr) is not None:
            by_key.setdefault((p.group, p.num_examples), []).append(p)
    out: dict[str, list[tuple[int, float, list[float], bool]]] = {}
    for (group, n), pts in sorted(by_key.items()):
        values = [float(getattr(p, attr)) for p in pts]
        out.setdefault(group, []).append((n, sum(values) / len(values), values, any(p.full for p in pts)))
    return out
