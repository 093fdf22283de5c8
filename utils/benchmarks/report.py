"""Console lines for the summaries evaluate_instruct.py prints: headline numbers, both protocols' scorers on the same
responses, judge statistics, and a warning when judge replies could not be read."""

from __future__ import annotations


def summary_lines(name: str, summary: dict) -> list[str]:
    """One line of headline numbers of an instruction benchmark's summary; a warning line when a judge's replies
    could not all be read."""
    m, t = summary["metrics"], summary["throughput"]

    def pct(x) -> str:
        return "-" if x is None else f"{x:.1%}"

    if name in ("gsm8k", "mmlu"):
        line = f"accuracy {pct(m['accuracy'])} | parsed {pct(m['parsed_rate'])}"
        if name == "mmlu":
            line += " | " + " | ".join(f"{c} {pct(v)}" for c, v in m["per_category"].items())
        if m.get("scorers"):
            line += (f" | same responses by parser: reference {pct(m['scorers']['reference']['accuracy'])}, improved "
                     f"{pct(m['scorers']['improved']['accuracy'])} ({m['n_scorers_disagree']} differ)")  # fmt: skip
    elif m["num_judged"] < m["num_examples"]:
        line = f"not judged ({m['num_judged']} of {m['num_examples']})"
    elif name == "sst":
        line = f"safe {pct(m['safe_rate'])} | judge parsed {pct(m['judge_parsed_rate'])}"
        if "reference" in m.get("scorers", {}):
            line += (f" | same replies by rule: reference {pct(m['scorers']['reference']['safe_rate'])}, improved "
                     f"{pct(m['scorers']['improved']['safe_rate'])} ({m['n_rules_disagree']} differ)")  # fmt: skip
    else:
        line = (f"win rate {pct(m['win_rate'])} | LC win rate {pct(m['lc_win_rate'])} | judge parsed "
                f"{pct(m['judge_parsed_rate'])} | method {m['method']}")  # fmt: skip
        if m.get("approximation"):
            line += " (an approximation of the package's numbers)"
    if summary.get("judge") and "sent" in summary["judge"]:
        line += f" | judge: {summary['judge'].get('sent', 0)} sent, {summary['judge'].get('cached', 0)} cached"
    rate = "-" if t["examples_per_s"] is None else f"{t['examples_per_s']:.2f}"
    lines = [f"{name} | {summary.get('protocol', '-')} protocol | {m['num_examples']} examples | {line} | this run: "
             f"{t['examples_generated']} generated, {rate} ex/s ({summary['engine']})"]  # fmt: skip
    if name in ("sst", "alpaca_eval") and m.get("n_unparsed"):
        if name == "sst":
            counted = "counted as safe by the reference rule" if summary.get("protocol") == "reference" else \
                "counted as not safe"
        else:
            counted = "left out of the win rates"
        lines.append(f"warning: {name}: {m['n_unparsed']} of {m['num_examples']} judge replies unparsed ({counted}); "
                     f"see judgments.jsonl")  # fmt: skip
    return lines
