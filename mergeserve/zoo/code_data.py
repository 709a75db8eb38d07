"""Python source from this interpreter's standard library, split by file, docstrings and comments removed.

The code expert learns code, not English prose: with docstrings and comments kept it also got
slightly better on the math word problems, so the domains were not distinct.

The text depends on the Python version (3.11.7 made the committed held-out split); the
split itself is by relative path, so a file is held out or trained on for every version.
"""

from __future__ import annotations

import ast
import io
import re
import sysconfig
import tokenize
from pathlib import Path

from mergeserve.zoo.splits import Example, chunk, split_units

SEED = "zoo-code-v1"  # the held-out files are chosen by their size with prose, as before
HELDOUT_CHARS = 90_000
MAX_HELDOUT_FILE_CHARS = 12_000
CHUNK_CHARS = 1_000
# Tests and generated tables are not the code we want the expert to write.
EXCLUDED_PARTS = {"test", "tests", "idlelib", "site-packages", "encodings", "pydoc_data", "__pycache__"}
EXCLUDED_PREFIXES = ("config-", "_sysconfigdata")
TOP_LEVEL = re.compile(r"^(def |async def |class |@)")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path) -> dict[str, str]:
    """Relative path -> source text of every kept .py file under `root`."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_PARTS & set(rel.parts) or rel.parts[0].startswith(EXCLUDED_PREFIXES):
            continue
        with tokenize.open(path) as f:  # honours PEP 263 encoding cookies
            text = f.read()
        if text.strip():
            files[rel.as_posix()] = text
    return files


def docstrings(tree: ast.Module) -> list[tuple[ast.Expr, bool]]:
    """Every module/class/function docstring statement, and whether it is its body's only statement."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.append((first, len(node.body) == 1 and not isinstance(node, ast.Module)))
    return found


def strip_prose(source: str) -> str:
    """`source` without docstrings (a docstring-only body becomes `pass`) and comments."""
    drop, replace, ends = set(), {}, set()
    for doc, only in docstrings(ast.parse(source)):
        drop.update(range(doc.lineno, doc.end_lineno + 1))
        if only:
            replace[doc.lineno] = " " * doc.col_offset + "pass"
        else:
            ends.add(doc.end_lineno)  # the blank line after a docstring goes with it
    comments = {t.start[0]: t.start[1] for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    out, skip_blank = [], False
    for i, line in enumerate(source.splitlines(), 1):
        if i in drop:
            if i in replace:
                out.append(replace[i])
            skip_blank = i in ends
            continue
        if i in comments:
            line = line[:comments[i]].rstrip()
            if not line:
                continue
        if skip_blank and not line.strip():
            continue
        skip_blank = False
        out.append(line)
    return re.sub(r"\n{4,}", "\n\n\n", "\n".join(out).strip("\n"))


def blocks(source: str) -> list[str]:
    """The file cut before each top-level def/class/decorator that follows a blank line."""
    parts, current, prev_blank = [], [], False
    for line in source.splitlines():
        if current and prev_blank and TOP_LEVEL.match(line):
            parts.append("\n".join(current).strip("\n"))
            current = []
        current.append(line)
        prev_blank = not line.strip()
    parts.append("\n".join(current).strip("\n"))
    return [p for p in parts if p]


def build(root: Path | None = None, heldout_chars: int = HELDOUT_CHARS) -> tuple[list[Example], list[Example]]:
    files = source_files(root or stdlib_dir())
    held = split_units({name: len(text) for name, text in files.items()}, SEED, heldout_chars, MAX_HELDOUT_FILE_CHARS)
    train, heldout = [], []
    for name, text in files.items():
        # PEP 8 puts two blank lines between top-level blocks.
        examples = [{"source": name, "text": c} for c in chunk(blocks(strip_prose(text)), CHUNK_CHARS, "\n\n\n")]
        (heldout if name in held else train).extend(examples)
    return train, heldout
