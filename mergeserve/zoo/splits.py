"""What every domain's data shares: a seeded split by source unit, chunking, and JSONL files.

Examples are JSON objects with at least `text`; one object per line, keys sorted, so that
the same inputs always give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Iterable

import torch
from transformers import PreTrainedTokenizerBase

from mergeserve.zoo import BUILD_DIR, ZOO_DIR

Example = dict[str, str]


def heldout_path(domain: str) -> Path:
    return ZOO_DIR / "data" / domain / "heldout.jsonl"


def train_path(domain: str) -> Path:
    return BUILD_DIR / "data" / domain / "train.jsonl"


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


def read_jsonl(path: Path) -> list[Example]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pack(texts: list[str], tokenizer: PreTrainedTokenizerBase, rows: int, seq_len: int, seed: int) -> torch.Tensor:
    """`rows` sequences of `seq_len` tokens: texts in seeded random order, EOS after each, repeated if short."""
    order, rng, ids, need = list(range(len(texts))), random.Random(seed), [], rows * seq_len
    while len(ids) < need:
        rng.shuffle(order)
        for i in order:
            ids += tokenizer(texts[i], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            if len(ids) >= need:
                break
    return torch.tensor(ids[:need]).view(rows, seq_len)  # [rows, T]
