"""The package's layers run one way: every import points down the architecture list of docs/architecture.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mergeserve"


def layers() -> list[list[str]]:
    """docs/architecture.md's layer block (its first ```text block), top row first: each row's modules
    (`server`, `weights`)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text.split("```text\n", 1)[1].split("```", 1)[0]
    rows = []
    for line in block.strip().splitlines():
        names = re.findall(r"^((?:[a-z_]+(?:/|\.py)\s+)+)", line + " ")[0].split()
        rows.append([n.removesuffix("/").removesuffix(".py") for n in names])
    return rows


def unit(module: str) -> str:
    """`mergeserve.server.backends.local` -> `server`: the architecture list's entry it belongs to."""
    return module.split(".")[1] if module.count(".") else module


def imports(path: Path) -> set[str]:
    """Every mergeserve module this file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} if node.module.startswith("mergeserve.") else set()
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mergeserve.")}
    return found


def test_every_module_is_on_the_architecture_list_and_imports_only_rows_below_its_own():
    rank = {name: i for i, row in enumerate(layers()) for name in row}
    units = {p.stem if p.parent == PACKAGE else p.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert units <= set(rank), f"not on docs/architecture.md's list: {sorted(units - set(rank))}"
    upward = []
    for path in PACKAGE.rglob("*.py"):
        me = path.stem if path.parent == PACKAGE else path.relative_to(PACKAGE).parts[0]
        if me == "__init__":
            continue
        for module in imports(path):
            other = unit(module)
            if other != me and rank[other] <= rank[me]:
                upward.append(f"{path.relative_to(REPO)} imports {module} ({other} is not below {me})")
    assert not upward, "\n".join(upward)
