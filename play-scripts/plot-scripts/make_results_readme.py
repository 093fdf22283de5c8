"""Write results/README.md: one table of final numbers per experiment, with links to the figures the plot scripts drew.

Render the figures first, with the same run globs and labels, then write the report:
    python play-scripts/plot-scripts/plot_reason.py --runs 'results/qwen-math-*' --sweep-runs 'results/sweep-*'
    python play-scripts/plot-scripts/plot_instruct.py --runs results/llama-nomask results/llama-mask \\
        --labels "no masking" "prompt masking"
    python play-scripts/plot-scripts/make_results_readme.py --reason-runs 'results/qwen-math-*' \\
        --sweep-runs 'results/sweep-*' --instruct-runs results/llama-nomask results/llama-mask \\
        --instruct-labels "no masking" "prompt masking"
After the CPU demo run (figures in results/demo, which .gitignore lets be committed):
    python play-scripts/plot-scripts/plot_reason.py --runs results/demo --output-dir results/demo
    python play-scripts/plot-scripts/make_results_readme.py --reason-runs results/demo --figures-dir results/demo

Numbers are printed as REFERENCE.md prints them (reasoning accuracies to 4 decimals; instruction benchmarks in
percent), and published numbers are added as "published:" rows when a run's model is the reference model.

The instruction table shows each checkpoint's headline numbers (the protocol it was evaluated under, see
evaluate_instruct.py --protocol) and, side by side, the reference (published) and improved protocols' numbers: GSM8K
and MMLU responses are scored by both parsers and SST replies by both rules in every run, so both columns fill from
one generation pass; a number scored on the other protocol's generations (other prompt or sampling) is marked *,
one from a reference run with deviating settings †. AlpacaEval has a number only for the protocol that ran.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils.plotting import (  # noqa: E402
    FIG_INSTRUCT_OVERLAY, FIG_MMLU_CATEGORIES, FIG_MMLU_SUBJECTS, FIG_REASON_ACCURACY, FIG_REASON_SWEEP,
    FIG_REASON_TRAIN, INSTRUCT_EVAL_LAYOUT, INSTRUCT_HEADLINES, REASON_FMT, REFERENCE_INSTRUCT,
    REFERENCE_INSTRUCT_MODEL, REFERENCE_REASON, REFERENCE_REASON_MODEL, expand_runs, fig_instruct_run,
    find_final_summary, last_value, load_instruct_evals, load_metrics, read_json, summary_metrics, sweep_points, warn,
)  # fmt: skip

BLANK = "–"
PROTOCOLS = ("reference", "improved")  # evaluate_instruct.py --protocol
SHORT_TITLES = {"gsm8k": "GSM8K", "mmlu": "MMLU", "sst": "SST safe", "alpaca_eval": "AlpacaEval LC"}
OTHER_GENERATIONS, DEVIATED = "*", "†"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reason-runs", nargs="*", default=[],
                   help="globs of reasoning run folders (as plot_reason.py --runs)")
    p.add_argument("--reason-labels", nargs="*", default=[], help="one label per --reason-runs pattern")
    p.add_argument("--final-evals", nargs="*", default=[],
                   help="one per --reason-runs pattern: summary.json path, 'auto' or 'none' (as plot_reason.py)")
    p.add_argument("--sweep-runs", nargs="*", default=[], help="globs of dataset-size sweep runs")
    p.add_argument("--sweep-groups", nargs="*", default=[],
                   help="one group per --sweep-runs pattern (default: from the train file)")
    p.add_argument("--sweep-score", choices=["auto", "final", "in_loop"], default="auto",
                   help="as plot_reason.py --sweep-score")
    p.add_argument("--instruct-runs", nargs="*", default=[],
                   help="globs of instruction run folders (as plot_instruct.py --runs)")
    p.add_argument("--instruct-labels", nargs="*", default=[], help="one label per --instruct-runs pattern")
    p.add_argument("--figures-dir", default="results/figures",
                   help="where the plot scripts wrote the PNGs (linked relative to --output)")
    p.add_argument("--output", default="results/README.md", help="the markdown file to write")
    p.add_argument("--no-published", action="store_true", help="leave out the published reference rows")
    return p.parse_args(argv)


def fmt(value, spec: str) -> str:
    return spec.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else BLANK


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def figure_links(names: list[tuple[str, str]], figures_dir: Path, output: Path) -> list[str]:
    """Markdown images for the figures that exist; a missing one is named in a warning."""
    lines = []
    for name, caption in names:
        path = figures_dir / name
        if not path.exists():
            warn(f"figure {path} not found (run the plot script first); not linked")
            continue
        lines.append(f"![{caption}]({Path(os.path.relpath(path, output.parent)).as_posix()})")
    return lines + [""] if lines else []


def reason_section(args, figures_dir: Path, output: Path) -> list[str]:
    runs = expand_runs(args.reason_runs, args.reason_labels, "metrics.jsonl", "--reason-runs")
    if not runs:
        return []
    rows, models = [], set()
    for run in runs:
        load_metrics(run)
        given = args.final_evals[run.pattern_index] if args.final_evals else "auto"
        path = find_final_summary(run, given)
        final = summary_metrics((read_json(path) if path else None) or {})
        acc, fmt_acc = last_value(run.rows, "eval/math/accuracy"), last_value(run.rows, "eval/math/format_accuracy")
        models.add(run.config.get("model"))
        rows.append([run.label, str(run.config.get("model", BLANK)), fmt(run.config.get("train_examples"), "{:,}"),
                     str(run.rows[-1]["step"]) if run.rows else BLANK,
                     fmt(acc[1] if acc else None, REASON_FMT), fmt(fmt_acc[1] if fmt_acc else None, REASON_FMT),
                     fmt(final.get("accuracy"), REASON_FMT), fmt(final.get("format_accuracy"), REASON_FMT),
                     fmt(final.get("num_examples"), "{:,}")])  # fmt: skip
    if REFERENCE_REASON_MODEL in models and not args.no_published:
        for name, ref in REFERENCE_REASON.items():
            rows.append([f"published: {name}", REFERENCE_REASON_MODEL, BLANK, BLANK, BLANK, BLANK,
                         fmt(ref["accuracy"], REASON_FMT), fmt(ref["format_accuracy"], REASON_FMT),
                         "5,000"])  # fmt: skip
    header = ["run", "model", "train examples", "steps", "in-loop accuracy", "in-loop format accuracy",
              "full-val accuracy", "full-val format accuracy", "full-val examples"]  # fmt: skip
    return (["## Reasoning SFT", ""]
            + figure_links([(FIG_REASON_ACCURACY, "validation accuracy vs step"),
                            (FIG_REASON_TRAIN, "training dynamics")], figures_dir, output)
            + table(header, rows)
            + ["", "In-loop: the last eval during training, on the run's fixed val subset "
                   "(`val_size` in its config.json). Full-val: `summary.json` of evaluate_reason.py.", ""])  # fmt: skip


def sweep_section(args, figures_dir: Path, output: Path) -> list[str]:
    if args.sweep_groups and len(args.sweep_groups) != len(args.sweep_runs):
        raise SystemExit(f"--sweep-groups has {len(args.sweep_groups)} entries "
                         f"but --sweep-runs has {len(args.sweep_runs)} patterns")
    runs = expand_runs(args.sweep_runs, None, "config.json", "--sweep-runs")
    points = sweep_points(runs, args.sweep_groups or None, args.sweep_score)
    if not points:
        return []
    rows = [[p.group, f"{p.num_examples:,}" + (" (full)" if p.full else ""), p.run.label, fmt(p.accuracy, REASON_FMT),
             fmt(p.format_accuracy, REASON_FMT), p.source] for p in points]  # fmt: skip
    return (["## Reasoning SFT: dataset-size sweep", ""]
            + figure_links([(FIG_REASON_SWEEP, "accuracy vs unique training examples")], figures_dir, output)
            + table(["traces", "unique examples", "run", "accuracy", "format accuracy", "scored on"], rows) + [""])


def protocol_columns() -> list[str]:
    return [f"{SHORT_TITLES[h.benchmark]} ({p})" for h in INSTRUCT_HEADLINES for p in PROTOCOLS]


def protocol_cells(run_path: Path, checkpoint: str) -> list[str]:
    """The protocol a checkpoint was evaluated under, then each headline per protocol (see the module docstring).

    Reads the benchmarks' summary.json files: `protocol` and `protocol_deviations` at the top, `metrics.scorers`
    (per-protocol numbers on the same responses) and the headline in `metrics`. A summary written before protocols
    existed has no `protocol`: its number is left out of the per-protocol columns.
    """
    protocols, cells = set(), []
    for h in INSTRUCT_HEADLINES:
        path = run_path / INSTRUCT_EVAL_LAYOUT.format(checkpoint=checkpoint, benchmark=h.benchmark)
        summary = (read_json(path) if path.exists() else None) or {}
        metrics, ran = summary_metrics(summary), summary.get("protocol")
        if ran:
            protocols.add(ran)
        for p in PROTOCOLS:
            value = (metrics.get("scorers") or {}).get(p, {}).get(h.key)
            if value is None and ran == p:
                value = metrics.get(h.key)
            cell = fmt(value, h.fmt)
            if cell != BLANK and ran != p:
                cell += OTHER_GENERATIONS
            if cell != BLANK and ran == "reference" and summary.get("protocol_deviations"):
                cell += DEVIATED
            cells.append(cell)
    return [" + ".join(sorted(protocols)) or BLANK] + cells


def instruct_section(args, figures_dir: Path, output: Path) -> list[str]:
    runs = expand_runs(args.instruct_runs, args.instruct_labels, "eval", "--instruct-runs")
    rows, models, figures = [], set(), []
    for run in runs:
        checkpoints = load_instruct_evals(run)
        trained = [c for c in checkpoints if c.step is not None]
        if not trained:
            warn(f"{run.label}: no evaluated checkpoint under {run.path}/eval; left out of the table")
            continue
        models.add(run.config.get("model"))
        figures.append((fig_instruct_run(run.label), f"{run.label}: benchmarks vs step"))
        for c in [c for c in checkpoints if c.step is None] + [trained[-1]]:
            missing = [h.name for h in INSTRUCT_HEADLINES if c.value(h) is None]
            if missing:
                warn(f"{run.label} {c.name}: no {', '.join(missing)}; shown as {BLANK}")
            rows.append([run.label, c.name] + [fmt(c.value(h), h.fmt) for h in INSTRUCT_HEADLINES]
                        + protocol_cells(run.path, c.name))  # fmt: skip
    if not rows:
        return []
    if REFERENCE_INSTRUCT_MODEL in models and not args.no_published:
        for name, ref in REFERENCE_INSTRUCT.items():
            published = [fmt(ref.get(h.name), h.fmt) for h in INSTRUCT_HEADLINES]
            per_protocol = [cell for v in published for cell in (v, BLANK)]  # the published protocol's numbers
            rows.append([f"published: {name}", BLANK] + published + ["reference"] + per_protocol)
    figures = [(FIG_INSTRUCT_OVERLAY, "runs overlaid")] * (len(figures) > 1) + figures + [
        (FIG_MMLU_CATEGORIES, "MMLU by category"), (FIG_MMLU_SUBJECTS, "MMLU per subject")]
    header = ["run", "checkpoint"] + [h.title for h in INSTRUCT_HEADLINES] + ["protocol"] + protocol_columns()
    notes = ("Each run: its base model (`base`) and its last evaluated checkpoint. The headline columns are the "
             "protocol's the checkpoint was evaluated under (`protocol`); the (reference) / (improved) columns score "
             f"the same responses by each protocol's parser or rule. {OTHER_GENERATIONS} = scored on generations made "
             f"under the other protocol (another prompt or sampling), so not that protocol's own number; "
             f"{DEVIATED} = a reference run with settings that deviate from the published ones (summary.json "
             "`protocol_deviations`).")  # fmt: skip
    return (["## Instruction SFT", ""] + figure_links(figures, figures_dir, output) + table(header, rows)
            + ["", notes, ""])


def main(args: argparse.Namespace) -> Path:
    if not (args.reason_runs or args.sweep_runs or args.instruct_runs):
        raise SystemExit("nothing to report: give --reason-runs, --sweep-runs and/or --instruct-runs")
    if args.reason_labels and len(args.reason_labels) != len(args.reason_runs):
        raise SystemExit(f"--reason-labels has {len(args.reason_labels)} entries "
                         f"but --reason-runs has {len(args.reason_runs)}")
    if args.final_evals and len(args.final_evals) != len(args.reason_runs):
        raise SystemExit(f"--final-evals has {len(args.final_evals)} entries "
                         f"but --reason-runs has {len(args.reason_runs)}")
    output, figures_dir = Path(args.output), Path(args.figures_dir)
    lines = ["# Results", "",
             "Generated by `play-scripts/plot-scripts/make_results_readme.py` from the runs' own files; "
             "edit the flags, not this file. \"published\" rows: the earlier implementation's numbers "
             "(CS336 spring 2025 assignment 5 SFT).", ""]  # fmt: skip
    sections = [reason_section(args, figures_dir, output) if args.reason_runs else [],
                sweep_section(args, figures_dir, output) if args.sweep_runs else [],
                instruct_section(args, figures_dir, output) if args.instruct_runs else []]  # fmt: skip
    if not any(sections):
        warn("no run matched any pattern; writing a README with no tables")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines + [line for s in sections for line in s]), encoding="utf-8")
    print(f"wrote {output} ({sum(1 for s in sections if s)} experiment tables)")
    return output


if __name__ == "__main__":
    main(parse_args())
