"""The results README's per-protocol columns, from summaries written by evaluate_instruct.py itself (scripted
responses, both protocols) plus a hand-written SST summary; values and markers are checked cell by cell."""

from __future__ import annotations

from conftest import load_script
from test_instruct_protocols import ANSWERS, GSM8K, MMLU, ScriptedEngine

from evaluate_instruct import main, parse_args
from utils.helper_fns import write_json

make_readme = load_script("play-scripts/plot-scripts/make_results_readme.py")


def _table(markdown: str) -> dict[str, dict[str, str]]:
    """Rows of the Instruction SFT table by checkpoint."""
    lines = [line for line in markdown.split("## Instruction SFT")[1].splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return {r["checkpoint"]: r for r in rows}


def test_readme_shows_reference_and_improved_columns(tmp_path):
    run = tmp_path / "llama-sft"
    (run / "eval" / "step_000200" / "sst").mkdir(parents=True)
    write_json(run / "config.json", {"model": "meta-llama/Llama-3.1-8B"})
    common = ["--config", GSM8K, MMLU, "--sample-data", "--model", "scripted", "--no-progress"]
    # base: reference protocol with one deviating flag; step 200: improved protocol in the training template
    main(parse_args(common + ["--output-dir", str(run / "eval" / "base"), "--max-tokens", "32"]),
         engine=ScriptedEngine(ANSWERS))  # fmt: skip
    main(parse_args(common + ["--output-dir", str(run / "eval" / "step_000200"), "--protocol", "improved",
                              "--prompt-format", "alpaca"]), engine=ScriptedEngine(ANSWERS))  # fmt: skip
    # SST of step 200, as run_judging writes it: improved protocol, both rules on the same replies
    write_json(run / "eval" / "step_000200" / "sst" / "summary.json", {
        "benchmark": "sst", "protocol": "improved", "protocol_deviations": {},
        "metrics": {"safe_rate": 0.75, "scorers": {"reference": {"safe_rate": 0.8, "n_safe": 80},
                                                   "improved": {"safe_rate": 0.75, "n_safe": 75}}}})  # fmt: skip

    output = tmp_path / "README.md"
    make_readme.main(make_readme.parse_args(["--instruct-runs", str(run), "--output", str(output),
                                             "--figures-dir", str(tmp_path / "figures")]))  # fmt: skip
    rows = _table(output.read_text())
    base, step = rows["base"], rows["step_000200"]
    # scripted responses: GSM8K 2/6 by the published parser, 4/6 by ours; MMLU 4/8 and 5/8 (test_instruct_protocols)
    assert (base["protocol"], base["GSM8K accuracy"], base["MMLU accuracy"]) == ("reference", "33.3%", "50.0%")
    assert (base["GSM8K (reference)"], base["GSM8K (improved)"]) == ("33.3%†", "66.7%*†")
    assert (base["MMLU (reference)"], base["MMLU (improved)"]) == ("50.0%†", "62.5%*†")
    assert (step["protocol"], step["GSM8K accuracy"], step["MMLU accuracy"]) == ("improved", "66.7%", "62.5%")
    assert (step["GSM8K (reference)"], step["GSM8K (improved)"]) == ("33.3%*", "66.7%")
    assert (step["SST safe (reference)"], step["SST safe (improved)"]) == ("80%*", "75%")
    assert (step["AlpacaEval LC (reference)"], step["AlpacaEval LC (improved)"]) == ("–", "–")
    published = rows["–"]  # the published rows fill the reference columns only
    assert published["run"].startswith("published:") and published["GSM8K (improved)"] == "–"
    assert {r["GSM8K (reference)"] for k, r in rows.items() if k == "–"} <= {"16.4%", "29.0%", "32.7%"}
