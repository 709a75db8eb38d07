"""Build, write and read each domain's train / held-out splits.

Regeneration is byte-for-byte deterministic given the same sources (Python 3.11.7's
standard library, debian-handbook 11.20220922); it installs nothing.
"""

from __future__ import annotations

from typing import Callable

from mergeserve.calibration import read_jsonl
from mergeserve.zoo import code_data, german_data, math_data
from mergeserve.zoo.splits import Example, heldout_path, train_path, write_jsonl

BUILDERS: dict[str, Callable[[], tuple[list[Example], list[Example]]]] = {
    "code": code_data.build, "german": german_data.build, "math": math_data.build,
}
SOURCES = {
    "code": "Python standard library of this interpreter (top-level modules and packages; tests, idlelib, encodings, pydoc_data excluded), split by file",
    "german": "Debian Administrator's Handbook, German edition (Debian package debian-handbook, HTML to text, German paragraphs only), split by HTML page",
    "math": "seeded generators of arithmetic word problems: 8 templates with 2-3 phrasings each (train seed 1, held-out seed 2, no held-out problem sharing its worked arithmetic with a training problem) and as many composed stories of many shapes and phrasings (math_story, seed 11), 1-2 digit operands, 2-4 steps",
}


def write_splits(domain: str) -> tuple[int, int]:
    train, heldout = BUILDERS[domain]()
    write_jsonl(train_path(domain), train)
    write_jsonl(heldout_path(domain), heldout)
    return len(train), len(heldout)


def load_split(domain: str, split: str) -> list[Example]:
    path = train_path(domain) if split == "train" else heldout_path(domain)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m mergeserve.zoo data --domain {domain}`")
    return read_jsonl(path)
