"""Repository-wide text rules that a reviewer would otherwise check by eye: line length, help text that prints
as written, and no machine's absolute paths."""

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


PYTHON = tracked("*.py")


def test_the_checkout_is_a_git_repo_with_python_files():
    assert len(PYTHON) > 50  # the other tests in this file would pass vacuously otherwise


def test_python_lines_are_at_most_120_characters():
    long = [f"{p.relative_to(ROOT)}:{i}" for p in PYTHON
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if len(line) > 120]  # fmt: skip
    assert not long, long


def test_module_docstrings_keep_their_shell_line_continuations():
    """A lone backslash at the end of a docstring line joins it with the next one, so a script's --help would print
    a multi-line example command as one long line; the docstring must say \\\\ (or be raw)."""
    joined = []
    for p in PYTHON:
        src = p.read_text(encoding="utf-8")
        body = ast.parse(src).body
        if not (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):  # fmt: skip
            continue
        segment = ast.get_source_segment(src, body[0])
        if not segment.startswith(("r", "R")) and re.search(r"(?<!\\)\\\n", segment):
            joined.append(str(p.relative_to(ROOT)))
    assert not joined, joined


@pytest.mark.parametrize("pattern", [r"/home/\w", r"/Users/\w", r"/work/\w", r"/tmp/bash_job[s]", r"C:\\\\Users"])
def test_no_absolute_paths_of_a_machine(pattern):
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in tracked("*.py", "*.md", "*.sh", "*.txt", "*.yaml", ".ci/*")
            for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if re.search(pattern, line)]  # fmt: skip
    assert not hits, hits
