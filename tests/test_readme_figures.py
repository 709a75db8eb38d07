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
# A setting's default ("900 s by default", "default 30 s"), as the generated reference pages state them.
DEFAULT = re.compile(r"\d+(\.\d+)?\s*\S+ by default|\bdefault:? \d+(\.\d+)?\s*\S+")


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


def test_readme_and_docs_figures_are_the_result_files():
    stale = [str(path.relative_to(ROOT)) for path in readme.pages() if readme.render(path.read_text()) != path.read_text()]
    assert not stale, f"figures differ from benchmarks/results/ in {stale}: run benchmarks/readme.py"


def test_readme_and_docs_state_no_figure_outside_rendered_blocks():
    hits = []
    for path in readme.pages():
        for number, line in prose_lines(path.read_text()):
            for allowed in NOT_MEASURED:
                line = line.replace(allowed, "")
            line = DEFAULT.sub("", line)
            if MEASURED.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "measured figures outside a results block:\n" + "\n".join(hits)


def test_every_results_block_is_rendered_and_every_renderer_used():
    names = [name for path in readme.pages() for name in re.findall(r"<!-- results: ([a-z_]+) -->", path.read_text())]
    assert names and set(names) <= set(readme.RENDERERS)
    assert set(readme.RENDERERS) <= set(names), f"renderers no page uses: {sorted(set(readme.RENDERERS) - set(names))}"
    assert "headline" in re.findall(r"<!-- results: ([a-z_]+) -->", readme.README.read_text())


def test_results_blocks_name_files_as_code_not_links():
    """A link from a block to a file outside docs/ would be broken in mkdocs (and the same block renders in both)."""
    for name, render in readme.RENDERERS.items():
        assert "](" not in "\n".join(render()), f"block {name!r} renders a Markdown link"
