"""The numbers the top-level README quotes for the committed miniature are the ones in results/miniature/ (so a
regenerated report with a stale README, or the reverse, fails here)."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def miniature_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("## The published findings in miniature")
    return " ".join(readme[start:readme.index("\n## ", start + 1)].split())  # line breaks of the prose ignored


def test_readme_quotes_the_committed_miniature_findings():
    text = miniature_section()
    result = json.loads((ROOT / "results" / "miniature" / "findings.json").read_text())
    found, points = result["findings"], {(p["set"], p["full"]): p for p in result["points"]}
    assert f"{result['base']['accuracy']:.0%} held-out accuracy" in text
    assert f"(step {result['teacher']['demo_step']}: {result['teacher']['accuracy']:.0%})" in text
    assert f"its step {result['base']['demo_step']}:" in text
    stats = result["trace_stats"]
    assert f"keeps {stats['kept_full']:,} well-formed traces, {stats['kept_filtered']:,} graded correct" in text

    def spread(d: dict) -> str:
        return f"{d['mean']:+.3f} ({d['min']:+.3f} to {d['max']:+.3f})"

    assert spread(found["sft_vs_base"]) in text
    assert spread(found["filtered_vs_all"]) in text
    for size, d in found["filtered_vs_all_by_size"].items():
        assert f"{size}: {d['mean']:+.3f}" in text
    for s, d in found["more_examples"].items():
        assert spread(d) in text
    summed = found["per_example_vs_summed"]
    assert f"better by {-summed['mean']:.3f} ({-summed['max']:.3f} to {-summed['min']:.3f}" in text
    for key in (("filtered", True), ("all", True)):
        acc = points[key]["accuracy"]
        assert f"{acc['mean']:.3f} ({acc['min']:.3f} to {acc['max']:.3f})" in text
    minutes = re.search(r"(\d+) min (\d+) s wall", text)
    assert minutes, "the README states the measured wall time of the committed miniature"
