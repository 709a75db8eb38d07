"""Python source from this interpreter's standard library, split by file.

The text depends on the Python version (3.11.7 made the committed held-out split); the
split itself is by relative path, so a file is held out or trained on for every version.
"""

from __future__ import annotations

import re
import sysconfig
import tokenize
from pathlib import Path

from mergeserve.zoo.splits import Example, chunk, split_units

SEED = "zoo-code-v1"
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
        examples = [{"source": name, "text": c} for c in chunk(blocks(text), CHUNK_CHARS, "\n\n\n")]
        (heldout if name in held else train).extend(examples)
    return train, heldout
