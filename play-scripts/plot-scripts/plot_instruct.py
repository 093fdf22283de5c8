"""Figures for instruction SFT runs, from the per-checkpoint benchmark summaries evaluate_instruct.py writes.

Masking vs no masking, each run evaluated at its base model and several checkpoints:
    python play-scripts/plot-scripts/plot_instruct.py --runs results/llama-nomask results/llama-mask \\
        --labels "no masking" "prompt masking" --output-dir results/figures
One run, with the published base-model numbers as the baseline:
    python play-scripts/plot-scripts/plot_instruct.py --runs 'results/llama-mask*' --baseline reference

Reads <run>/eval/<checkpoint>/<benchmark>/summary.json (utils/plotting.py INSTRUCT_EVAL_LAYOUT, "base" = the model
before training). Writes per run instruct_benchmarks_<label>.png (GSM8K, MMLU, SST safe share, AlpacaEval LC win
rate vs checkpoint step; dashed = baseline), with two or more runs instruct_benchmarks_overlay.png, and from each
run's last MMLU eval instruct_mmlu_categories.png (bars per category) and instruct_mmlu_subjects.png (per-subject
accuracy, baseline vs fine-tuned).

--baseline: run = the run's own eval/base/; reference = the published base-model numbers (REFERENCE.md; headlines
only, no MMLU breakdown); auto = run, else reference when the run's model is the published one; none = no line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils.plotting import (  # noqa: E402
    FIG_INSTRUCT_OVERLAY, FIG_MMLU_CATEGORIES, FIG_MMLU_SUBJECTS, INSTRUCT_BASE_CHECKPOINT, INSTRUCT_HEADLINES,
    MMLU_CATEGORIES, REFERENCE_INSTRUCT, REFERENCE_INSTRUCT_MODEL, Checkpoint, Run, expand_runs, fig_instruct_run,
    load_instruct_evals, run_colors, save_figure, use_agg, warn,
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="globs of instruction run folders (with an eval/ folder)")
    p.add_argument("--labels", nargs="*", default=[],
                   help="one legend label per --runs pattern (default: folder names)")
    p.add_argument("--baseline", choices=["auto", "run", "reference", "none"], default="auto",
                   help=f"dashed baseline (see above): run = eval/{INSTRUCT_BASE_CHECKPOINT}/, "
                        f"reference = published {REFERENCE_INSTRUCT_MODEL} numbers")
    p.add_argument("--output-dir", default="results/figures", help="where the PNGs go")
    return p.parse_args(argv)


def reference_baseline() -> Checkpoint:
    summaries: dict[str, dict] = {}
    for name, value in REFERENCE_INSTRUCT["base model"].items():
        bench, key = name.split("/")
        summaries.setdefault(bench, {})[key] = value
    return Checkpoint("published base", None, summaries)


def pick_baseline(run: Run, checkpoints: list[Checkpoint], choice: str) -> Checkpoint | None:
    """The run's baseline checkpoint per --baseline; prints the choice, warns when there is none."""
    own = next((c for c in checkpoints if c.step is None), None)
    if choice in ("auto", "run") and own is not None:
        return own
    if choice == "reference" or (choice == "auto" and run.config.get("model") == REFERENCE_INSTRUCT_MODEL):
        print(f"{run.label}: baseline = published {REFERENCE_INSTRUCT_MODEL} numbers (REFERENCE.md)")
        return reference_baseline()
    if choice != "none":
        warn(f"{run.label}: no eval/{INSTRUCT_BASE_CHECKPOINT}/ and model {run.config.get('model', '?')!r} "
             "has no published baseline; no baseline drawn")  # fmt: skip
    return None


def benchmarks_figure(items: list[tuple[Run, list[Checkpoint], Checkpoint | None]], colors: dict, title: str):
    """2 x 2 panels, one headline each, vs checkpoint step; a run's baseline is dashed and marked at step 0."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    distinct_bases = {tuple(b.value(h) for h in INSTRUCT_HEADLINES) for _, _, b in items if b is not None}
    for ax, h in zip(axes.flat, INSTRUCT_HEADLINES):
        for run, checkpoints, base in items:
            pts = [(c.step, c.value(h)) for c in checkpoints if c.step is not None and c.value(h) is not None]
            if (pts and base is not None and base.step is None and base.name == INSTRUCT_BASE_CHECKPOINT
                    and base.value(h) is not None):
                pts.insert(0, (0, base.value(h)))  # the run's own base eval is its step 0; a published baseline is not
            if not pts:
                warn(f"{run.label}: no {h.name} at any checkpoint; left out of '{h.title}'")
            else:
                ax.plot(*zip(*pts), marker="o", color=colors[run.label], label=run.label)
            if base is not None and base.value(h) is not None:
                one = len(distinct_bases) == 1
                color = "0.35" if one else colors[run.label]
                label = f"baseline ({base.name})" if one else f"{run.label} baseline ({base.name})"
                if label not in ax.get_legend_handles_labels()[1]:
                    ax.axhline(base.value(h), color=color, linestyle="--", linewidth=1.5, label=label)
                    ax.plot([0], [base.value(h)], marker="D", color=color, linestyle="none")
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {h.name} found", transform=ax.transAxes, ha="center", va="center", color="0.4")
        ax.set(title=h.title, xlabel="checkpoint step")
        ax.margins(y=0.15)  # autoscaled, not from 0: a 0.3-point MMLU change would vanish on a 0-100% axis
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if ax.lines:
            ax.legend(loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def last_with(checkpoints: list[Checkpoint], benchmark: str) -> Checkpoint | None:
    """The latest trained checkpoint with a summary for `benchmark`."""
    return next((c for c in reversed(checkpoints) if c.step is not None and benchmark in c.summaries), None)


def mmlu_categories_figure(base: Checkpoint | None, finals: list[tuple[Run, Checkpoint]], colors: dict):
    """Grouped bars: MMLU accuracy per category, the baseline then each run's last checkpoint."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import PercentFormatter

    bars = ([("baseline", base, "0.6")] if base is not None else []) + [
        (f"{run.label} (step {c.step})", c, colors[run.label]) for run, c in finals]
    fig, ax = plt.subplots(figsize=(11, 5))
    x = np.arange(len(MMLU_CATEGORIES))
    width = 0.8 / max(1, len(bars))
    for i, (label, ckpt, color) in enumerate(bars):
        per_category = ckpt.summaries.get("mmlu", {}).get("per_category", {})
        missing = [c for c in MMLU_CATEGORIES if c not in per_category]
        if missing:
            warn(f"{label}: mmlu per_category lacks {missing}; those bars left out")
        values = [per_category.get(c, np.nan) for c in MMLU_CATEGORIES]
        rects = ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width, color=color, label=label)
        ax.bar_label(rects, labels=[f"{v:.1%}" if v == v else "" for v in values], fontsize=8, padding=2)
    ax.set_xticks(x, MMLU_CATEGORIES)
    ax.set(title="MMLU accuracy by category", ylabel="accuracy", ylim=(0, 1.05))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(loc="upper left", ncols=min(3, len(bars)))
    fig.tight_layout()
    return fig


def mmlu_subjects_figure(base: Checkpoint, finals: list[tuple[Run, Checkpoint]], colors: dict):
    """Scatter per MMLU subject: baseline accuracy (x) vs fine-tuned accuracy (y); above the diagonal = improved."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    base_subjects = base.summaries["mmlu"]["per_subject"]
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.plot([0, 1], [0, 1], color="0.5", linestyle=":", linewidth=1)
    for run, ckpt in finals:
        tuned = ckpt.summaries["mmlu"].get("per_subject", {})
        common = sorted(set(base_subjects) & set(tuned))
        if len(common) < len(base_subjects):
            warn(f"{run.label}: {len(base_subjects) - len(common)} baseline MMLU subjects missing at step {ckpt.step}")
        if not common:
            continue
        xs, ys = [base_subjects[s] for s in common], [tuned[s] for s in common]
        gain = sum(y - x for x, y in zip(xs, ys)) / len(common)
        ax.scatter(xs, ys, s=28, alpha=0.8, color=colors[run.label],
                   label=f"{run.label} (step {ckpt.step}; mean change {100 * gain:+.1f} points)")
        if len(finals) == 1:  # name the subjects that moved most; with several runs the names would collide
            ranked = sorted(zip(common, xs, ys), key=lambda t: t[2] - t[1])
            for subject, x, y in ranked[:2] + ranked[-2:]:
                ax.annotate(subject.replace("_", " "), (x, y), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set(title="MMLU per subject: baseline vs fine-tuned", xlabel="baseline accuracy", ylabel="fine-tuned accuracy",
           xlim=(0, 1), ylim=(0, 1), aspect="equal")  # fmt: skip
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def main(args: argparse.Namespace) -> dict[str, Path]:
    """Render the figures the runs allow; returns {figure name: path}. Missing runs/metrics are warned and skipped."""
    use_agg()
    out = Path(args.output_dir)
    written: dict[str, Path] = {}
    items = []
    for run in expand_runs(args.runs, args.labels, "eval", "--runs"):
        checkpoints = load_instruct_evals(run)
        if not any(c.step is not None for c in checkpoints):
            warn(f"{run.label}: no evaluated checkpoint under {run.path}/eval; skipped")
            continue
        items.append((run, checkpoints, pick_baseline(run, checkpoints, args.baseline)))
    if not items:
        warn("--runs: no instruction run with evaluated checkpoints; nothing plotted")
        return written
    colors = run_colors([run.label for run, _, _ in items])
    for item in items:
        name = fig_instruct_run(item[0].label)
        written[name] = save_figure(benchmarks_figure([item], colors, f"Instruction SFT: {item[0].label}"), out / name)
    if len(items) > 1:
        title = "Instruction SFT: " + " vs ".join(run.label for run, _, _ in items)
        written[FIG_INSTRUCT_OVERLAY] = save_figure(benchmarks_figure(items, colors, title), out / FIG_INSTRUCT_OVERLAY)

    finals = [(run, last_with(cks, "mmlu")) for run, cks, _ in items]
    for run, final in finals:
        if final is None:
            warn(f"{run.label}: no MMLU eval at any checkpoint; left out of the MMLU figures")
    finals = [(run, c) for run, c in finals if c is not None]
    # The MMLU breakdowns need a measured baseline (the published one has headlines only): the first run's own.
    base = next((b for _, _, b in items if b is not None and "per_category" in b.summaries.get("mmlu", {})), None)
    if finals:
        written[FIG_MMLU_CATEGORIES] = save_figure(mmlu_categories_figure(base, finals, colors),
                                                   out / FIG_MMLU_CATEGORIES)
    subject_base = next((b for _, _, b in items if b is not None and "per_subject" in b.summaries.get("mmlu", {})),
                        None)
    if finals and subject_base is not None:
        written[FIG_MMLU_SUBJECTS] = save_figure(mmlu_subjects_figure(subject_base, finals, colors),
                                                 out / FIG_MMLU_SUBJECTS)
    elif finals:
        warn(f"no run has an eval/{INSTRUCT_BASE_CHECKPOINT}/mmlu with per_subject; per-subject scatter skipped")
    return written


if __name__ == "__main__":
    main(parse_args())
