"""Plot scripts and the results README, on small result folders written here through the real MetricsLogger."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from conftest import load_script as load_plot_script

from utils.helper_fns import read_jsonl, write_json
from utils.metrics_logger import MetricsLogger
from utils.plotting import (
    INSTRUCT_EVAL_LAYOUT, INSTRUCT_HEADLINES, checkpoint_step, expand_runs, fig_instruct_run, load_metrics, read_json,
    series,
)  # fmt: skip

SCRIPTS = Path(__file__).resolve().parents[1] / "play-scripts" / "plot-scripts"
SUBJECTS = ["abstract_algebra", "anatomy", "astronomy", "college_physics", "econometrics", "high_school_history",
            "philosophy", "prehistory", "sociology", "virology", "marketing", "world_religions"]  # fmt: skip
FINAL_SUMMARIES = {"qwen-all": "qwen-all/eval_full/summary.json",  # where the fixture puts each run's full-val summary
                   "qwen-filtered": "eval_reason_step_000038_val_T1_n1/summary.json"}
CATEGORIES = {"STEM": 0.0, "humanities": 0.05, "social sciences": 0.1, "other": 0.08}


def load_script(name: str):
    return load_plot_script(f"play-scripts/plot-scripts/{name}.py")


plot_reason, plot_instruct, make_readme = (load_script(n)
                                           for n in ("plot_reason", "plot_instruct", "make_results_readme"))


# ---- fixture result folders


def write_reason_run(root: Path, name: str, train_file: str, num_examples: int, train_examples: int, steps: int,
                     eval_every: int, final: tuple[float, float] | None, seed: int, grad_norm: bool = True,
                     final_dir: Path | None = None) -> Path:
    """A reasoning run as train_sft_reason.py writes it; accuracies rounded to the 4 decimals the table prints.

    `final`: a full-val summary.json, nested as utils/benchmarks run_benchmark writes it, in `final_dir`
    (default <run>/eval_full); evaluate_reason.py's own default folder sits next to the run.
    """
    run_dir = root / name
    config = dict(model="Qwen/Qwen2.5-Math-1.5B", train_file=train_file, num_examples=num_examples,
                  train_examples=train_examples, total_steps=steps, val_size=1000, eval_every=eval_every)  # fmt: skip
    logger = MetricsLogger(run_dir, config)
    for step in range(steps + 1):
        if step > 0:
            row = {"train/loss": 1.5 * math.exp(-step / 15) + 0.2 + 0.01 * seed, "train/nll_per_token": 1.0,
                   "train/token_entropy": 0.9 - 0.01 * step, "train/lr": 1e-4, "train/tokens_per_s": 3e4}
            if grad_norm:
                row["train/grad_norm"] = 2.0 / (1 + step) + 0.3
            logger.log(row, step)
        if step % eval_every == 0 or step == steps:
            acc = round(0.03 + (0.45 + 0.02 * seed) * (1 - math.exp(-step / 10)), 4)
            logger.log({"eval/math/accuracy": acc, "eval/math/format_accuracy": round(min(1.0, 0.15 + 0.09 * step), 4),
                        "eval/math/mean_response_tokens": 300.0 - step, "eval/teacher_forced_loss": 1.2 - 0.01 * step,
                        "eval/teacher_forced_token_entropy": 0.8}, step)  # fmt: skip
    logger.close()
    if final is not None:
        final_dir = final_dir or run_dir / "eval_full"
        final_dir.mkdir()
        model = str(run_dir / "checkpoints" / f"step_{steps:06d}")
        write_json(final_dir / "summary.json", {"benchmark": "math", "model": model, "metrics": {
            "accuracy": final[0], "format_accuracy": final[1], "num_examples": 5000}})
        write_json(final_dir / "config.json", {"model": model})
    return run_dir


def write_instruct_run(root: Path, name: str, gain: float, nested: bool) -> Path:
    """An instruction run laid out as INSTRUCT_EVAL_LAYOUT says: base and two checkpoints, four benchmarks each.

    `nested`: summaries hold their numbers under "metrics", as utils/benchmarks run_benchmark writes them.
    """
    run_dir = root / name
    run_dir.mkdir(parents=True)
    write_json(run_dir / "config.json", {"model": "meta-llama/Llama-3.1-8B"})
    for ckpt, t in (("base", 0.0), ("step_000200", 0.5), ("step_000400", 1.0)):
        g = gain * t
        per_subject = {s: round(0.3 + 0.05 * i + g * (1 if i % 3 else -0.5), 4) for i, s in enumerate(SUBJECTS)}
        summaries = {
            "gsm8k": {"accuracy": round(0.164 + g, 3), "parsed_rate": 0.97},
            "mmlu": {"accuracy": round(0.581 + g / 10, 3), "parsed_rate": 0.99, "per_subject": per_subject,
                     "per_category": {c: round(0.5 + d + g / 4, 4) for c, d in CATEGORIES.items()}},
            "sst": {"safe_rate": round(0.62 + g, 2)},
            "alpaca_eval": {"win_rate": round(0.01 + g / 10, 4), "lc_win_rate": round(0.0157 + g / 5, 4)},
        }
        for bench, summary in summaries.items():
            path = run_dir / INSTRUCT_EVAL_LAYOUT.format(checkpoint=ckpt, benchmark=bench)
            path.parent.mkdir(parents=True)
            write_json(path, {"benchmark": bench, "metrics": summary} if nested else summary)
    return run_dir


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    write_reason_run(root, "qwen-all", "data/sft-reason/sft_all.jsonl", -1, 4836, 38, 10, (0.4214, 0.9924), seed=0)
    write_reason_run(root, "qwen-filtered", "data/sft-reason/sft_filtered.jsonl", -1, 3496, 38, 10, (0.5204, 0.9906),
                     seed=1, final_dir=root / "eval_reason_step_000038_val_T1_n1")  # fmt: skip
    # no full-val summary and no grad norm: the marker and the grad-norm line are skipped with a warning
    write_reason_run(root, "qwen-filtered-long", "data/sft-reason/sft_filtered.jsonl", -1, 3496, 56, 14, None, seed=2,
                     grad_norm=False)  # fmt: skip
    for kind, size in [(k, n) for k in ("all", "filtered") for n in (128, 256, 512, -1)]:
        full = 4836 if kind == "all" else 3496
        final = (round(0.1 + 0.05 * (size if size > 0 else full).bit_length() + (0.04 if kind == "filtered" else 0), 4),
                 0.98)
        run_dir = write_reason_run(root / "sweep", f"{kind}-{size}", f"data/sft-reason/sft_{kind}.jsonl", size,
                                   size if size > 0 else full, 4, 2, final, seed=3)  # fmt: skip
        metrics = read_json(run_dir / "eval_full" / "summary.json")["metrics"]  # a flat summary reads the same
        write_json(run_dir / "eval_full" / "summary.json", metrics)
    write_instruct_run(root, "llama-nomask", gain=0.126, nested=False)
    write_instruct_run(root, "llama-mask", gain=0.163, nested=True)
    return root


def instruct_summary(run_dir: Path, checkpoint: str, benchmark: str) -> dict:
    summary = read_json(run_dir / INSTRUCT_EVAL_LAYOUT.format(checkpoint=checkpoint, benchmark=benchmark))
    return summary.get("metrics", summary)


def check_png(path: Path) -> None:
    """A real picture: over 10 kB, many colors, and ink on more than 2% of the canvas."""
    import matplotlib.image
    import numpy as np

    assert path.exists(), path
    assert path.stat().st_size > 10_000, f"{path}: {path.stat().st_size} bytes"
    rgb = matplotlib.image.imread(path)[..., :3]  # (H, W, 3) float in [0, 1]
    q = np.round(rgb * 255).astype(np.uint32)
    assert len(np.unique(q[..., 0] << 16 | q[..., 1] << 8 | q[..., 2])) > 50, f"{path}: nearly a single color"
    assert (rgb.min(axis=-1) < 0.9).mean() > 0.02, f"{path}: almost blank"


# ---- helpers


@pytest.mark.parametrize("name,step", [("base", None), ("200", 200), ("step_000200", 200), ("checkpoint-400", 400),
                                       ("final", -1)])
def test_checkpoint_step(name, step):
    assert checkpoint_step(name) == step


def test_series_keeps_last_value_of_a_repeated_step_and_skips_other_rows():
    rows = [{"step": 0, "eval/a": 0.1}, {"step": 1, "train/loss": 2.0}, {"step": 2, "eval/a": 0.2},
            {"step": 2, "eval/a": 0.3}]
    assert series(rows, "eval/a") == ([0, 2], [0.1, 0.3])
    assert series(rows, "eval/missing") == ([], [])


def test_label_count_mismatch_names_both_flags():
    with pytest.raises(SystemExit, match="--runs has 2 patterns but the labels flag has 1"):
        expand_runs(["a", "b"], ["only one"], "metrics.jsonl")


# ---- figures


def test_reason_figures_render_and_plot_the_logged_numbers(results, tmp_path, capsys):
    out = tmp_path / "figs"
    runs = [str(results / "qwen-all"), str(results / "qwen-filtered*"), str(results / "no-such-run")]
    args = plot_reason.parse_args(["--runs", *runs, "--labels", "all", "filtered", "ghost", "--sweep-runs",
                                   str(results / "sweep" / "*"), "--output-dir", str(out)])  # fmt: skip
    written = plot_reason.main(args)
    captured = capsys.readouterr()
    err = captured.err
    # a summary in evaluate_reason.py's default folder, next to the run, is found by the model path it names
    assert (f"filtered qwen-filtered: full-val score from {results / 'eval_reason_step_000038_val_T1_n1'}"
            in captured.out)
    assert "no-such-run" in err  # the missing run is named, and the rest still plots
    assert "filtered qwen-filtered-long: no train/grad_norm" in err
    assert "filtered qwen-filtered-long: no full-val summary.json" in err
    assert sorted(written) == ["reason_accuracy.png", "reason_sweep.png", "reason_train.png"]
    for path in written.values():
        check_png(path)

    # The curves hold exactly the logged eval numbers, and each run keeps one color across figures.
    loaded = expand_runs(runs[:2], ["all", "filtered"], "metrics.jsonl")
    for run in loaded:
        load_metrics(run)
    colors = plot_reason.run_colors([r.label for r in loaded])
    finals = {"all": read_json(results / "qwen-all" / "eval_full" / "summary.json")["metrics"]}
    fig = plot_reason.accuracy_figure(loaded, colors, finals, plot_reason.base_line(loaded, "auto"))
    acc_lines = {ln.get_label(): ln for ln in fig.axes[0].lines}
    for run in loaded:
        logged = [r for r in read_jsonl(run.path / "metrics.jsonl") if "eval/math/accuracy" in r]
        assert list(acc_lines[run.label].get_xdata()) == [r["step"] for r in logged]
        assert list(acc_lines[run.label].get_ydata()) == [r["eval/math/accuracy"] for r in logged]
    assert acc_lines["base model (published, full val)"].get_ydata()[0] == 0.0288
    stars = [ln for ln in fig.axes[0].lines if ln.get_marker() == "*"]
    assert [(ln.get_xdata()[0], ln.get_ydata()[0]) for ln in stars] == [(38, 0.4214)]
    train = plot_reason.train_figure(loaded, colors)
    train_colors = {ln.get_label(): ln.get_color() for ln in train.axes[2].lines}  # token entropy: every run has it
    assert train_colors == {run.label: colors[run.label] for run in loaded}


def test_base_line_is_the_step0_eval_for_a_model_without_published_numbers(results, tmp_path, capsys):
    run_dir = write_reason_run(tmp_path, "demo", "data/demo/train.jsonl", -1, 3000, 4, 2, None, seed=0)
    write_json(run_dir / "config.json", dict(read_json(run_dir / "config.json"), model="tiny"))
    runs = expand_runs([str(run_dir)], ["demo"], "metrics.jsonl")
    load_metrics(runs[0])
    base = plot_reason.base_line(runs, "auto")
    at0 = read_jsonl(run_dir / "metrics.jsonl")[0]
    assert (base["accuracy"], base["format_accuracy"]) == (at0["eval/math/accuracy"], at0["eval/math/format_accuracy"])
    assert "step-0 eval of demo" in capsys.readouterr().out
    assert plot_reason.base_line(runs, "none") is None


def test_sweep_scores_and_falls_back_to_in_loop_for_all_when_one_final_is_missing(results, capsys):
    from utils.plotting import sweep_points

    runs = expand_runs([str(results / "sweep" / "*")], None, "config.json")
    points = sweep_points(runs, None, "auto")
    assert [(p.group, p.num_examples, p.full) for p in points] == [
        ("all", 128, False), ("all", 256, False), ("all", 512, False), ("all", 4836, True),
        ("filtered", 128, False), ("filtered", 256, False), ("filtered", 512, False), ("filtered", 3496, True)]
    for p in points:
        assert p.accuracy == read_json(p.run.path / "eval_full" / "summary.json")["accuracy"]
    (runs[0].path / "eval_full" / "summary.json").rename(runs[0].path / "eval_full" / "summary.json.bak")
    try:
        points = sweep_points(expand_runs([str(results / "sweep" / "*")], None, "config.json"), None, "auto")
    finally:
        (runs[0].path / "eval_full" / "summary.json.bak").rename(runs[0].path / "eval_full" / "summary.json")
    assert "scoring by last in-loop eval" in capsys.readouterr().out
    assert {p.source for p in points} == {"in-loop step 4"}


def test_instruct_figures_render_and_plot_the_summaries(results, tmp_path, capsys):
    out = tmp_path / "figs"
    args = plot_instruct.parse_args(["--runs", str(results / "llama-nomask"), str(results / "llama-mask"),
                                     str(results / "llama-missing"), "--labels", "no masking", "prompt masking",
                                     "missing", "--output-dir", str(out)])  # fmt: skip
    written = plot_instruct.main(args)
    assert "llama-missing" in capsys.readouterr().err
    assert sorted(written) == sorted([fig_instruct_run("no masking"), fig_instruct_run("prompt masking"),
                                      "instruct_benchmarks_overlay.png", "instruct_mmlu_categories.png",
                                      "instruct_mmlu_subjects.png"])  # fmt: skip
    for path in written.values():
        check_png(path)

    runs = expand_runs([str(results / "llama-mask")], ["prompt masking"], "eval")
    checkpoints = plot_instruct.load_instruct_evals(runs[0])
    base = plot_instruct.pick_baseline(runs[0], checkpoints, "auto")
    fig = plot_instruct.benchmarks_figure([(runs[0], checkpoints, base)], plot_instruct.run_colors(["prompt masking"]),
                                          "t")
    for ax, h in zip(fig.axes, INSTRUCT_HEADLINES):
        run_line = next(ln for ln in ax.lines if ln.get_label() == "prompt masking")
        assert list(run_line.get_xdata()) == [0, 200, 400]  # the run's own base eval is its step 0
        expected = [instruct_summary(results / "llama-mask", c, h.benchmark)[h.key]
                    for c in ("base", "step_000200", "step_000400")]
        assert list(run_line.get_ydata()) == expected


def test_nothing_matching_warns_and_writes_nothing(tmp_path, capsys):
    written = plot_instruct.main(plot_instruct.parse_args(["--runs", str(tmp_path / "nope*"),
                                                           "--output-dir", str(tmp_path)]))
    assert written == {} and "nope*" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--runs and/or --sweep-runs"):
        plot_reason.main(plot_reason.parse_args(["--output-dir", str(tmp_path)]))


# ---- results README


def parse_tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """{section heading: rows as {column: cell}} for the first table under each '## ' heading."""
    tables, heading, header = {}, None, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            heading, header = line[3:], None
        elif line.startswith("|") and heading:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = cells
            elif not set("".join(cells)) <= set("-"):
                tables.setdefault(heading, []).append(dict(zip(header, cells)))
    return tables


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%")) / (100 if cell.endswith("%") else 1)


def test_readme_tables_equal_the_fixture_files(results, tmp_path, capsys):
    figs = tmp_path / "figures"
    reason_runs = [str(results / "qwen-*"), str(results / "gone")]
    plot_reason.main(plot_reason.parse_args(["--runs", *reason_runs, "--sweep-runs", str(results / "sweep" / "*"),
                                             "--output-dir", str(figs)]))  # fmt: skip
    instruct = [str(results / "llama-nomask"), str(results / "llama-mask")]
    plot_instruct.main(plot_instruct.parse_args(["--runs", *instruct, "--labels", "no masking", "prompt masking",
                                                 "--output-dir", str(figs)]))  # fmt: skip
    output = tmp_path / "report" / "README.md"
    make_readme.main(make_readme.parse_args([
        "--reason-runs", *reason_runs, "--sweep-runs", str(results / "sweep" / "*"), "--instruct-runs", *instruct,
        "--instruct-labels", "no masking", "prompt masking", "--figures-dir", str(figs), "--output", str(output)]))
    assert "gone" in capsys.readouterr().err
    text = output.read_text()
    tables = parse_tables(text)
    assert list(tables) == ["Reasoning SFT", "Reasoning SFT: dataset-size sweep", "Instruction SFT"]

    reason = {r["run"]: r for r in tables["Reasoning SFT"]}
    for name in ("qwen-all", "qwen-filtered", "qwen-filtered-long"):
        rows = read_jsonl(results / name / "metrics.jsonl")
        last_eval = [r for r in rows if "eval/math/accuracy" in r][-1]
        assert number(reason[name]["in-loop accuracy"]) == last_eval["eval/math/accuracy"]
        assert number(reason[name]["in-loop format accuracy"]) == last_eval["eval/math/format_accuracy"]
        assert int(reason[name]["steps"]) == rows[-1]["step"]
        summary_path = FINAL_SUMMARIES.get(name)
        if summary_path:
            summary = read_json(results / summary_path)["metrics"]
            assert number(reason[name]["full-val accuracy"]) == summary["accuracy"]
            assert number(reason[name]["full-val format accuracy"]) == summary["format_accuracy"]
            assert number(reason[name]["full-val examples"]) == summary["num_examples"]
        else:
            assert reason[name]["full-val accuracy"] == "–"
    assert reason["published: base model"]["full-val accuracy"] == "0.0288"

    sweep = tables["Reasoning SFT: dataset-size sweep"]
    assert len(sweep) == 8
    for row in sweep:
        summary = read_json(results / "sweep" / row["run"] / "eval_full" / "summary.json")
        assert number(row["accuracy"]) == summary["accuracy"]
        assert row["traces"] == ("filtered" if "filtered" in row["run"] else "all")

    inst = {(r["run"], r["checkpoint"]): r for r in tables["Instruction SFT"]}
    for label, folder in (("no masking", "llama-nomask"), ("prompt masking", "llama-mask")):
        for ckpt in ("base", "step_000400"):
            row = inst[(label, ckpt)]
            for h in INSTRUCT_HEADLINES:
                summary = instruct_summary(results / folder, ckpt, h.benchmark)
                assert number(row[h.title]) == pytest.approx(summary[h.key], abs=1e-12)
    assert inst[("published: SFT, prompt masking", "–")]["GSM8K accuracy"] == "32.7%"
    assert inst[("published: base model", "–")]["SimpleSafetyTests safe share"] == "62%"
    assert inst[("published: base model", "–")]["AlpacaEval LC win rate"] == "1.57%"

    # every figure the plot scripts wrote is linked, by a path that resolves from the README's folder
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(Path(link).name for link in links) == sorted(p.name for p in figs.glob("*.png"))
    assert all((output.parent / link).resolve().exists() for link in links)


def test_sweep_means_average_seeds_at_each_size():
    """Several runs at one size are seeds: the line is their mean at that size, the dots each run, in size order."""
    from utils.plotting import Run, SweepPoint, sweep_means

    def point(group, n, acc, fmt, full=False):
        return SweepPoint(Run(f"{group}-{n}-{acc}", Path(".")), group, n, full, acc, fmt, "full val (n=10)")

    points = [point("all", 512, 0.5, 0.9), point("all", 128, 0.2, None), point("all", 128, 0.4, 1.0),
              point("all", 128, 0.3, 0.8), point("filtered", 900, 0.7, 0.95, full=True), point("all", 512, 0.6, 0.7)]
    acc = sweep_means(points, "accuracy")
    assert [(n, full) for n, _, _, full in acc["all"]] == [(128, False), (512, False)]
    assert acc["all"][0][1] == pytest.approx(0.3) and sorted(acc["all"][0][2]) == [0.2, 0.3, 0.4]
    assert acc["all"][1][1] == pytest.approx(0.55) and acc["filtered"] == [(900, 0.7, [0.7], True)]
    fmt = sweep_means(points, "format_accuracy")  # a run without a format score is left out of that panel only
    assert fmt["all"][0][1] == pytest.approx(0.9) and len(fmt["all"][0][2]) == 2
