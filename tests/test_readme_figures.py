"""Every measured figure in the README and the docs comes from a committed result file.

The figures live in blocks that `benchmarks/readme.py` renders from `benchmarks/results/`;
outside those blocks (and code), the README and docs/ state no measurements.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import readme  # noqa: E402

# A number with a unit of time, speed, memory or a ratio: what a measurement looks like.
MEASURED = re.compile(r"\d(\.\d+)?\s*(tok/s|ms|s|%|x|×|MB|MiB|GB|GiB|minutes|µs|GB/s|pp)\b")
# Settings and limits that look like measurements but are not.
NOT_MEASURED = ("400s", "(1 MiB on `/admin`, 16 MiB on", "(1, 2, 4 … 30 s)")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The lines outside code fences and rendered results blocks."""
    lines, fence, block = [], False, False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fence = not fence
        elif line.startswith("<!-- results:"):
            block = True
        elif line.startswith("<!-- /results"):
            block = False
        elif not fence and not block:
            lines.append((number, line))
    return lines


def test_readme_figures_are_the_result_files():
    text = readme.README.read_text()
    assert readme.render(text) == text, "README.md's figures differ from benchmarks/results/: run benchmarks/readme.py"


def test_readme_and_docs_state_no_figure_outside_rendered_blocks():
    hits = []
    for path in [readme.README, *sorted((ROOT / "docs").rglob("*.md"))]:
        for number, line in prose_lines(path.read_text()):
            for allowed in NOT_MEASURED:
                line = line.replace(allowed, "")
            if MEASURED.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "measured figures outside a results block:\n" + "\n".join(hits)


def test_every_results_block_is_rendered():
    names = re.findall(r"<!-- results: ([a-z_]+) -->", readme.README.read_text())
    assert names and set(names) <= set(readme.RENDERERS)
