"""Figures for reasoning SFT runs, from their metrics.jsonl and full-val summary.json files.

All-traces and correct-traces runs with their full-val scores, plus a dataset-size sweep:
    python play-scripts/plot-scripts/plot_reason.py --runs 'results/qwen-math-all' 'results/qwen-math-filtered*' \\
        --labels "all traces" "correct traces" --sweep-runs 'results/sweep-*' --output-dir results/figures
The CPU demo run (figures next to it, where .gitignore lets them be committed):
    python play-scripts/plot-scripts/plot_reason.py --runs results/demo --output-dir results/demo

Writes reason_accuracy.png (val accuracy and format accuracy vs step; a star = the run's full-val score; dashed =
the base model), reason_train.png (train loss with eval teacher-forced loss, grad norm, token entropy) and, with
--sweep-runs, reason_sweep.png (accuracy vs unique training examples, all vs filtered traces).

--final-evals: per --runs pattern, a full-val summary.json (or its folder); 'auto' looks in <run>/eval_full,
<run>/*/, then sibling folders evaluating one of the run's checkpoints; 'none' draws no star. --base: the dashed
base-model line is the published full-val numbers (reference), the first run's step-0 eval (step0) or none.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils.plotting import (  # noqa: E402
    FIG_REASON_ACCURACY, FIG_REASON_SWEEP, FIG_REASON_TRAIN, REFERENCE_REASON, REFERENCE_REASON_MODEL, Run,
    expand_runs, find_final_summary, load_metrics, read_json, run_colors, save_figure, series, summary_metrics,
    sweep_means, sweep_points, use_agg, warn,
)  # fmt: skip

ACCURACY_PANELS = (("eval/math/accuracy", "accuracy", "Validation accuracy"),
                   ("eval/math/format_accuracy", "format_accuracy", "Format accuracy"))  # fmt: skip
TRAIN_PANELS = (("train/loss", "Train loss (per-token NLL)"), ("train/grad_norm", "Gradient norm (before clipping)"),
                ("train/token_entropy", "Token entropy (nats)"))  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", default=[], help="globs of run folders (with metrics.jsonl) for the curves")
    p.add_argument("--labels", nargs="*", default=[],
                   help="one legend label per --runs pattern (default: folder names)")
    p.add_argument("--final-evals", nargs="*", default=[],
                   help="one per --runs pattern: summary.json (or its folder), 'auto' or 'none' "
                        "(default: auto for all)")
    p.add_argument("--base", choices=["auto", "reference", "step0", "none"], default="auto",
                   help="dashed base-model line (see above); "
                        f"auto = reference for {REFERENCE_REASON_MODEL}, else step0")
    p.add_argument("--sweep-runs", nargs="*", default=[],
                   help="globs of dataset-size sweep runs (config.json has num_examples)")
    p.add_argument("--sweep-groups", nargs="*", default=[],
                   help="group per --sweep-runs pattern "
                        "(default: 'filtered' if the train file's name says so, else 'all')")
    p.add_argument("--sweep-score", choices=["auto", "final", "in_loop"], default="auto",
                   help="sweep y: final = full-val summary.json, in_loop = last in-loop eval, "
                        "auto = final if all have one")
    p.add_argument("--output-dir", default="results/figures", help="where the PNGs go")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if not args.runs and not args.sweep_runs:
        raise SystemExit("nothing to plot: give --runs and/or --sweep-runs")
    if args.labels and len(args.labels) != len(args.runs):
        raise SystemExit(f"--labels has {len(args.labels)} entries but --runs has {len(args.runs)} patterns")
    if args.final_evals and len(args.final_evals) != len(args.runs):
        raise SystemExit(f"--final-evals has {len(args.final_evals)} entries but --runs has {len(args.runs)} patterns")
    if args.sweep_groups and len(args.sweep_groups) != len(args.sweep_runs):
        raise SystemExit(f"--sweep-groups has {len(args.sweep_groups)} entries "
                         f"but --sweep-runs has {len(args.sweep_runs)} patterns")


def base_line(runs: list[Run], choice: str) -> dict | None:
    """{"accuracy", "format_accuracy", "label"} of the base model, or None; prints what was chosen."""
    if choice == "auto":
        models = {r.config.get("model") for r in runs}
        choice = "reference" if models == {REFERENCE_REASON_MODEL} else "step0"
    if choice == "reference":
        print(f"base line: published {REFERENCE_REASON_MODEL} full-val numbers (REFERENCE.md)")
        return dict(REFERENCE_REASON["base model"], label="base model (published, full val)")
    if choice == "step0":
        for run in runs:
            at0 = {}
            for key, short, _ in ACCURACY_PANELS:
                steps, values = series(run.rows, key)
                if steps and steps[0] == 0:
                    at0[short] = values[0]
            if at0:
                print(f"base line: step-0 eval of {run.label}")
                return at0 | {"label": f"base model (step 0 of {run.label})"}
        warn("--base step0: no run has a step-0 eval; no base line")
    return None


def accuracy_figure(runs: list[Run], colors: dict, finals: dict[str, dict], base: dict | None):
    """Two panels, accuracy and format accuracy vs step; a star at the last step = the run's full-val score."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import PercentFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for ax, (key, short, title) in zip(axes, ACCURACY_PANELS):
        stars = []
        for run in runs:
            steps, values = series(run.rows, key)
            if not steps:
                warn(f"{run.label}: no {key} in metrics.jsonl; left out of '{title}'")
                continue
            ax.plot(steps, values, marker="o", color=colors[run.label], label=run.label)
            final = finals.get(run.label)
            if final is not None and isinstance(final.get(short), (int, float)):
                x = run.rows[-1]["step"]  # drawn at the run's last logged step
                ax.plot([x], [final[short]], marker="*", markersize=16, color=colors[run.label],
                        markeredgecolor="black", linestyle="none", zorder=5)  # fmt: skip
                stars.append((final[short], x))
        if base is not None and base.get(short) is not None:
            ax.axhline(base[short], color="0.35", linestyle="--", linewidth=1.5, label=base["label"])
        if not any(ln.get_label() in colors for ln in ax.lines):
            ax.text(0.5, 0.5, f"no {key} logged", transform=ax.transAxes, ha="center", va="center", color="0.4")
        ax.set(title=title, xlabel="optimizer step", ylim=(0, 1.02))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        label_y = -1.0
        for y, x in sorted(stars):  # values of nearby stars are spread apart vertically so they stay readable
            label_y = max(y, label_y + 0.05)
            ax.annotate(f"{y:.3f}", (x, y), xytext=(x + 0.02 * (ax.get_xlim()[1] - ax.get_xlim()[0]), label_y - 0.015),
                        fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    if finals:
        handles.append(Line2D([], [], marker="*", markersize=12, color="0.5", markeredgecolor="black",
                              linestyle="none"))
        labels.append("full-val score (at the last step)")
    if handles:
        axes[0].legend(handles, labels, loc="best")
    fig.suptitle("Reasoning SFT: validation during training (in-loop subset)")
    fig.tight_layout()
    return fig


def train_figure(runs: list[Run], colors: dict):
    """Three panels vs step: train loss (with eval teacher-forced loss, dashed), grad norm, token entropy."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), sharex=True)
    for ax, (key, title) in zip(axes, TRAIN_PANELS):
        for run in runs:
            steps, values = series(run.rows, key)
            if not steps:
                warn(f"{run.label}: no {key} in metrics.jsonl; left out of '{title}'")
                continue
            ax.plot(steps, values, color=colors[run.label], label=run.label)
            if key == "train/loss":
                ev_steps, ev_values = series(run.rows, "eval/teacher_forced_loss")
                if ev_steps:
                    ax.plot(ev_steps, ev_values, color=colors[run.label], linestyle="--", marker="s", label="_val")
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {key} logged", transform=ax.transAxes, ha="center", va="center", color="0.4")
        ax.set(title=title, xlabel="optimizer step")
        handles, labels = ax.get_legend_handles_labels()
        if any(ln.get_label() == "_val" for ln in ax.lines):
            handles.append(Line2D([], [], color="0.4", linestyle="--", marker="s"))
            labels.append("val, teacher-forced (dashed)")
        if handles:
            ax.legend(handles, labels, loc="best")
    fig.suptitle("Reasoning SFT: training dynamics")
    fig.tight_layout()
    return fig


def sweep_figure(points, colors_by_group: dict):
    """Accuracy and format accuracy vs unique training examples (log2 axis), one line per group."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    ticks = sorted({p.num_examples for p in points})
    tick_labels = {t: f"{t / 1000:.1f}k" if t >= 1000 else str(t) for t in ticks}
    for ax, (attr, title) in zip(axes, (("accuracy", "Accuracy"), ("format_accuracy", "Format accuracy"))):
        for group, rows in sweep_means(points, attr).items():
            color, seeds = colors_by_group[group], max(len(values) for _, _, values, _ in rows)
            label = f"{group} traces" + (f" (line: mean of up to {seeds} runs, dots: each run)" if seeds > 1 else "")
            ax.plot([n for n, *_ in rows], [m for _, m, *_ in rows], marker="o" if seeds == 1 else None,
                    color=color, label=label)  # fmt: skip
            if seeds > 1:
                xs = [n for n, _, values, _ in rows for _ in values]
                ax.plot(xs, [v for *_, values, _ in rows for v in values], marker="o", markersize=4, alpha=0.5,
                        color=color, linestyle="none")  # fmt: skip
            full = [(n, m) for n, m, _, whole in rows if whole]
            ax.plot([n for n, _ in full], [m for _, m in full], marker="s", markersize=10,
                    markerfacecolor="none", markeredgecolor=color, linestyle="none")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [tick_labels[t] for t in ticks])
        ax.minorticks_off()
        ax.set(title=title, xlabel="unique training examples (square = the whole file)", ylim=(0, 1.02))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if ax.lines:
            ax.legend(loc="best")
    source = "full-val" if all(p.source.startswith("full val") for p in points) else "last in-loop eval"
    fig.suptitle(f"Reasoning SFT: dataset-size sweep ({source} scores)")
    fig.tight_layout()
    return fig


def main(args: argparse.Namespace) -> dict[str, Path]:
    """Render the figures the flags allow; returns {figure name: path}. Missing runs/metrics are warned and skipped."""
    check_args(args)
    use_agg()
    out = Path(args.output_dir)
    written: dict[str, Path] = {}
    runs = expand_runs(args.runs, args.labels, "metrics.jsonl", "--runs") if args.runs else []
    for run in runs:
        if not load_metrics(run):
            warn(f"{run.label}: metrics.jsonl is empty; skipped")
    runs = [r for r in runs if r.rows]
    colors = run_colors([r.label for r in runs])
    if runs:
        finals = {}
        for run in runs:
            given = args.final_evals[run.pattern_index] if args.final_evals else "auto"
            path = find_final_summary(run, given)
            summary = read_json(path) if path else None
            if summary is not None:
                print(f"{run.label}: full-val score from {path} "
                      f"(model {summary.get('model') or read_json_model(path)})")
                finals[run.label] = summary_metrics(summary)
        written[FIG_REASON_ACCURACY] = save_figure(accuracy_figure(runs, colors, finals, base_line(runs, args.base)),
                                                   out / FIG_REASON_ACCURACY)  # fmt: skip
        written[FIG_REASON_TRAIN] = save_figure(train_figure(runs, colors), out / FIG_REASON_TRAIN)
    elif args.runs:
        warn("--runs: no run left to plot; accuracy and train figures skipped")
    if args.sweep_runs:
        sweep = expand_runs(args.sweep_runs, None, "config.json", "--sweep-runs")
        points = sweep_points(sweep, args.sweep_groups or None, args.sweep_score)
        if points:
            groups = sorted({p.group for p in points})
            written[FIG_REASON_SWEEP] = save_figure(sweep_figure(points, run_colors(groups)), out / FIG_REASON_SWEEP)
        else:
            warn("--sweep-runs: no scored sweep run; sweep figure skipped")
    return written


def read_json_model(summary_path: Path) -> str:
    """The model named in the config.json next to a summary.json (evaluate_reason.py writes both), or '?'."""
    config_path = summary_path.parent / "config.json"
    config = read_json(config_path) if config_path.exists() else None
    return str((config or {}).get("model", "?"))


if __name__ == "__main__":
    main(parse_args())
