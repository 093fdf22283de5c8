"""The miniature's findings over seeds: one figure and one table, from the runs' own files (miniature.py's report
stage).

    python play-scripts/plot-scripts/plot_miniature.py --work-dir results/miniature-work --output-dir results/miniature

Reads <work-dir>/runs/seed<S>_<set>_<size>/ (config.json, eval_full/summary.json of evaluate_reason.py on the
held-out test split), the base's and the teacher's test scores (<work-dir>/evals/base_step_<N>/ and
teacher_step_<N>/: both score checkpoints of the CPU demo run, runs/demo/) and
<work-dir>/traces/sft_filtered.stats.json. Writes to --output-dir:
- miniature_findings.png: test accuracy vs unique training examples, all vs correct-only traces (mean over seeds as
  a line, each seed a dot, min-max as a band), the summed-loss students, the base model and the teacher;
- findings.md / findings.json: the per-point table (mean, min, max, n seeds) and the four published comparisons,
  each as a mean difference with its per-seed spread. Nothing is tuned or dropped here: a point with fewer seeds
  than the others is shown with its n.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils.helper_fns import write_json  # noqa: E402

RUN_NAME = re.compile(r"^seed(\d+)_(all|filtered|summed)_(full|\d+)$")
SET_TITLES = {"all": "all traces", "filtered": "correct traces", "summed": "correct traces, summed loss"}


def test_score(run_dir: Path, folder: str = "eval_full") -> dict | None:
    """`metrics` of the run's held-out eval (evaluate_reason.py summary.json), or None when it is missing."""
    path = run_dir / folder / "summary.json"
    return json.loads(path.read_text())["metrics"] if path.exists() else None


def checkpoint_eval(work: Path, role: str, step: int | None) -> dict | None:
    """Metrics (plus the demo step) of the base's or the teacher's test eval, <work>/evals/<role>_step_<N>/ (N =
    `step`, or the only one there); None when there is none. Several and no `step` is refused, not guessed."""
    pattern = f"{role}_step_{step:06d}" if step is not None else f"{role}_step_*"
    found = [p for p in sorted((work / "evals").glob(pattern)) if (p / "summary.json").exists()]
    if len(found) > 1:
        raise SystemExit(f"{work / 'evals'}: several {role} evals ({', '.join(p.name for p in found)}); "
                         f"say which with --{role}-step")
    if not found:
        return None
    return test_score(found[0], ".") | {"demo_step": int(found[0].name.rsplit("_", 1)[1])}


def collect(runs: Path) -> list[dict]:
    """One row per evaluated student: set, requested size, unique examples trained on, seed, test accuracy."""
    rows = []
    for run_dir in sorted(runs.iterdir()):
        m = RUN_NAME.match(run_dir.name)
        score = test_score(run_dir) if m else None
        if m is None or score is None:
            continue
        config = json.loads((run_dir / "config.json").read_text())
        rows.append({"run": run_dir.name, "seed": int(m.group(1)), "set": m.group(2), "full": m.group(3) == "full",
                     "num_examples": config["train_examples"], "accuracy": score["accuracy"],
                     "format_accuracy": score["format_accuracy"], "num_test": score["num_examples"],
                     "loss_normalization": config["loss_normalization"]})  # fmt: skip
    return rows


def spread(values: list[float]) -> dict:
    return {"mean": mean(values), "min": min(values), "max": max(values), "n": len(values)}


def points(rows: list[dict]) -> list[dict]:
    """Per (set, size): the accuracy spread over seeds. "full" points group by set, whatever their exact count."""
    keys = sorted({(r["set"], r["full"], r["num_examples"] if not r["full"] else -1) for r in rows})
    out = []
    for s, full, n in keys:
        group = [r for r in rows if r["set"] == s and r["full"] == full and (full or r["num_examples"] == n)]
        out.append({"set": s, "full": full, "num_examples": round(mean(r["num_examples"] for r in group)),
                    "accuracy": spread([r["accuracy"] for r in group]),
                    "format_accuracy": spread([r["format_accuracy"] for r in group]),
                    "seeds": sorted(r["seed"] for r in group)})  # fmt: skip
    return out


def paired(rows: list[dict], a: tuple[str, bool, int], b: tuple[str, bool, int]) -> dict | None:
    """Accuracy of point a minus point b, per seed present in both: {"mean", "min", "max", "n", "per_seed"}."""

    def pick(key):
        s, full, n = key
        return {r["seed"]: r["accuracy"] for r in rows if r["set"] == s and r["full"] == full
                and (full or r["num_examples"] == n)}  # fmt: skip

    left, right = pick(a), pick(b)
    seeds = sorted(set(left) & set(right))
    if not seeds:
        return None
    diffs = {seed: left[seed] - right[seed] for seed in seeds}
    return spread(list(diffs.values())) | {"per_seed": diffs}


def findings(rows: list[dict], base: dict | None, teacher: dict | None) -> dict:
    """The four published comparisons, as accuracy differences on the held-out test split."""
    full = {s: ("filtered" if s == "summed" else s, True, -1) for s in ("all", "filtered")}
    sizes = {s: sorted({r["num_examples"] for r in rows if r["set"] == s and not r["full"]})
             for s in ("all", "filtered")}
    out = {}
    if base is not None:
        sft = [r["accuracy"] for r in rows if r["set"] == "filtered" and r["full"]]
        if sft:
            out["sft_vs_base"] = spread([a - base["accuracy"] for a in sft]) | {"base": base["accuracy"]}
    out["filtered_vs_all"] = paired(rows, full["filtered"], full["all"])
    out["filtered_vs_all_by_size"] = {n: paired(rows, ("filtered", False, n), ("all", False, n))
                                      for n in sorted(set(sizes["all"]) & set(sizes["filtered"]))}  # fmt: skip
    out["more_examples"] = {s: paired(rows, full[s], (s, False, sizes[s][0])) | {"from": sizes[s][0]}
                            for s in ("all", "filtered") if sizes[s] and paired(rows, full[s], (s, False, sizes[s][0]))}
    out["per_example_vs_summed"] = paired(rows, full["filtered"], ("summed", True, -1))
    if teacher is not None:
        out["teacher"] = teacher["accuracy"]
    return out


def fmt_spread(s: dict | None, signed: bool = False) -> str:
    if s is None:
        return "–"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(s['mean'])} ({f.format(s['min'])} to {f.format(s['max'])}, n={s['n']})"


def table_lines(pts: list[dict], found: dict, base: dict | None, teacher: dict | None, stats: dict) -> list[str]:
    lines = ["| model | training traces | unique examples | test accuracy: mean (min to max, seeds) "
             "| format accuracy |",
             "|---|---|---|---|---|"]  # fmt: skip
    if base is not None:
        lines.append(f"| base (CPU demo model, step {base['demo_step']}) | – | – | {base['accuracy']:.3f} | "
                     f"{base['format_accuracy']:.3f} |")  # fmt: skip
    if teacher is not None:
        gold = f"{teacher['train_examples']:,}" if "train_examples" in teacher else "–"
        lines.append(f"| teacher (CPU demo model, step {teacher['demo_step']}) | gold (the demo's) | {gold} | "
                     f"{teacher['accuracy']:.3f} | {teacher['format_accuracy']:.3f} |")  # fmt: skip
    for p in pts:
        size = f"{p['num_examples']:,}" + (" (whole set)" if p["full"] else "")
        lines.append(f"| student | {SET_TITLES[p['set']]} | {size} | {fmt_spread(p['accuracy'])} | "
                     f"{p['format_accuracy']['mean']:.3f} |")  # fmt: skip
    lines += ["", f"Teacher traces: {stats.get('samples', '–')} sampled, {stats.get('kept_full', '–')} well-formed "
              f"(all), {stats.get('kept_filtered', '–')} graded correct (filtered).", "",
              "| published finding | miniature: accuracy difference, mean over seeds (min to max, seeds) |",
              "|---|---|"]
    by_size = found.get("filtered_vs_all_by_size", {})
    more = found.get("more_examples", {})
    lines += [f"| SFT lifts accuracy far above the base model | correct traces, whole set, minus base: "
              f"{fmt_spread(found.get('sft_vs_base'), True)} |",
              f"| correct-only traces beat all traces | whole sets: {fmt_spread(found.get('filtered_vs_all'), True)}"
              + "".join(f"; {n}: {fmt_spread(d, True)}" for n, d in by_size.items()) + " |",
              "| more unique examples help | "
              + "; ".join(f"{SET_TITLES[s]}, whole set minus {d['from']}: {fmt_spread(d, True)}"
                          for s, d in more.items())
              + " |",
              f"| per-example token-mean loss beats the summed loss | correct traces, whole set: "
              f"{fmt_spread(found.get('per_example_vs_summed'), True)} |"]  # fmt: skip
    return lines


def figure(pts: list[dict], rows: list[dict], base: dict | None, teacher: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"all": "tab:orange", "filtered": "tab:blue", "summed": "tab:purple"}
    for s in ("all", "filtered", "summed"):
        ps = sorted((p for p in pts if p["set"] == s), key=lambda p: p["num_examples"])
        if not ps:
            continue
        xs = [p["num_examples"] for p in ps]
        ax.plot(xs, [p["accuracy"]["mean"] for p in ps], marker="o" if s != "summed" else "D", color=colors[s],
                label=f"{SET_TITLES[s]} (mean)", linestyle="-" if s != "summed" else "none")  # fmt: skip
        ax.fill_between(xs, [p["accuracy"]["min"] for p in ps], [p["accuracy"]["max"] for p in ps], color=colors[s],
                        alpha=0.15, linewidth=0)  # fmt: skip
        seeds = [r for r in rows if r["set"] == s]
        ax.scatter([r["num_examples"] for r in seeds], [r["accuracy"] for r in seeds], color=colors[s], s=12, alpha=0.6)
    if base is not None:
        ax.axhline(base["accuracy"], color="0.35", linestyle="--", label=f"base (CPU demo, step {base['demo_step']})")
    if teacher is not None:
        ax.axhline(teacher["accuracy"], color="tab:green", linestyle=":",
                   label=f"teacher (CPU demo, step {teacher['demo_step']})")
    ax.set_xscale("log", base=2)
    ticks = sorted({p["num_examples"] for p in pts})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel="unique training examples (rightmost = the whole set)", ylim=(0, 1.02),
           title="Reasoning SFT in miniature: held-out accuracy (dots = seeds, band = min-max)")  # fmt: skip
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="results/miniature-work", help="miniature.py's work folder")
    p.add_argument("--output-dir", default="results/miniature", help="where the figure and tables go")
    p.add_argument("--base-step", type=int, default=None, help="demo step of the base (default: the one evaluated)")
    p.add_argument("--teacher-step", type=int, default=None,
                   help="demo step of the teacher (default: the one evaluated)")
    args = p.parse_args(argv)
    work, out = Path(args.work_dir), Path(args.output_dir)
    runs = work / "runs"
    if not runs.is_dir():
        raise SystemExit(f"--work-dir {work}: no runs/ folder (run miniature.py first)")
    rows = collect(runs)
    if not rows:
        raise SystemExit(f"{runs}: no student with a held-out eval (eval_full/summary.json)")
    base = checkpoint_eval(work, "base", args.base_step)  # two checkpoints of the demo run
    teacher = checkpoint_eval(work, "teacher", args.teacher_step)
    demo_config = runs / "demo" / "config.json"
    if teacher is not None and demo_config.exists():
        teacher["train_examples"] = json.loads(demo_config.read_text())["train_examples"]
    stats_path = work / "traces" / "sft_filtered.stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    pts, found = points(rows), findings(rows, base, teacher)
    figure(pts, rows, base, teacher, out / "miniature_findings.png")
    lines = ["# Reasoning SFT in miniature: findings", "", "![findings](miniature_findings.png)", "",
             *table_lines(pts, found, base, teacher, stats), ""]  # fmt: skip
    (out / "findings.md").write_text("\n".join(lines))
    result = {"points": pts, "findings": found, "runs": rows, "base": base, "teacher": teacher, "trace_stats": stats}
    write_json(out / "findings.json", result)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
