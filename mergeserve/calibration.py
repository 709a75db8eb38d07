"""Unlabeled calibration text for the commands that learn from it (train-router, tune-merge):
.jsonl files of `{"text": ...}` lines or .txt documents, packed into rows of tokens."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from mergeserve.zoo.splits import pack, read_jsonl

DATA_SUFFIXES = (".jsonl", ".txt")


def data_files(paths: list[str | Path]) -> list[Path]:
    """The .jsonl and .txt files named, or found (recursively) in the folders named."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in DATA_SUFFIXES and f.is_file())
            if not found:
                raise ValueError(f"{p}: no .jsonl or .txt files in this folder")
            files += found
        elif not p.is_file():
            raise FileNotFoundError(f"{p}: no such file or folder")
        elif p.suffix not in DATA_SUFFIXES:
            raise ValueError(f"{p}: calibration data must be .jsonl (one {{\"text\": ...}} per line) or .txt")
        else:
            files.append(p)
    return files


def read_texts(path: Path) -> list[str]:
    """A .jsonl file's `text` fields, or a .txt file as one document."""
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    try:
        examples = read_jsonl(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON lines: {e}") from e
    if not examples or not all(isinstance(e, dict) and isinstance(e.get("text"), str) for e in examples):
        raise ValueError(f"{path}: every line must be a JSON object with a string \"text\" field")
    return [e["text"] for e in examples]


def pack_files(texts: list[list[str]], tokenizer: PreTrainedTokenizerBase, rows: int, seq_len: int, seed: int) -> torch.Tensor:
    """`rows` sequences [rows, T] from the texts of each file, the files taking turns so every batch mixes them evenly."""
    per_file = -(-rows // len(texts))
    packed = [pack(t, tokenizer, per_file, seq_len, seed) for t in texts]  # F x [per_file, T]
    return torch.stack(packed, dim=1).reshape(-1, seq_len)[:rows]  # row j from file j % F
