"""What every domain's data shares: a seeded split by source unit, chunking, and JSONL files
(written here, read by `calibration.read_jsonl`).

Examples are JSON objects with at least `text`; one object per line, keys sorted, so that
the same inputs always give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from mergeserve.zoo import build_dir, zoo_dir

Example = dict[str, str]


def heldout_path(domain: str) -> Path:
    return zoo_dir() / "data" / domain / "heldout.jsonl"


def other_path(domain: str, name: str = "other") -> Path:
    """The second held-out set (`other`) and its dev set (`other_dev`): other sources or phrasings
    than training's (zoo/other_sets.py)."""
    return zoo_dir() / "data" / domain / f"{name}.jsonl"


def train_path(domain: str) -> Path:
    return build_dir() / "data" / domain / "train.jsonl"


def rank(key: str, seed: str) -> str:
    """A fixed pseudo-random order of keys, the same on every machine and Python version."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def split_units(units: dict[str, int], seed: str, heldout_chars: int, max_unit_chars: int) -> set[str]:
    """Names of the units (files, chapters) held out: the first in hash order, up to a size budget.

    `units` maps a unit's name to its size in characters. Units larger than `max_unit_chars`
    always train, so that one huge file cannot fill the held-out budget alone.
    """
    held, total = set(), 0
    for name in sorted(units, key=lambda n: rank(n, seed)):
        size = units[name]
        if size > max_unit_chars or total + size > heldout_chars:
            continue
        held.add(name)
        total += size
    return held


def chunk(parts: Iterable[str], max_chars: int, sep: str) -> list[str]:
    """Join consecutive parts greedily into chunks of at most `max_chars` (a longer part stays whole)."""
    chunks, current = [], ""
    for part in parts:
        if current and len(current) + len(sep) + len(part) > max_chars:
            chunks.append(current)
            current = ""
        current = current + sep + part if current else part
    if current:
        chunks.append(current)
    return chunks


def write_jsonl(path: Path, examples: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in examples)
    path.write_text("".join(lines), encoding="utf-8")
