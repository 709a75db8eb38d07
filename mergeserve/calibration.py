"""Unlabeled text for what learns from it (train-router, tune-merge, fisher, shrink, the zoo's
training): .jsonl files of `{"text": ...}` lines or .txt documents, made into rows of tokens."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

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


def read_jsonl(path: Path) -> list[dict]:
    """One JSON value per non-blank line."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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


def packed_rows(count: int, encode: Callable[[int], tuple[list[int], list[int]]], rows: int, seq_len: int,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows, T] ids, [rows, T] labels) of items 0..count-1 in seeded random order, packed, repeated
    if short; encode(i) gives item i's (ids, labels), called only for the items that fit."""
    order, rng, ids, labels, need = list(range(count)), random.Random(seed), [], [], rows * seq_len
    while len(ids) < need:
        rng.shuffle(order)
        for i in order:
            x, y = encode(i)
            ids += x
            labels += y
            if len(ids) >= need:
                break
    return torch.tensor(ids[:need]).view(rows, seq_len), torch.tensor(labels[:need]).view(rows, seq_len)


def token_rows(texts: list[str], tokenizer: PreTrainedTokenizerBase, rows: int, seq_len: int, seed: int) -> torch.Tensor:
    """`rows` sequences of `seq_len` tokens: texts in seeded random order, EOS after each, repeated if short."""
    def encode(i: int) -> tuple[list[int], list[int]]:
        ids = tokenizer(texts[i], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        return ids, ids

    return packed_rows(len(texts), encode, rows, seq_len, seed)[0]  # [rows, T]


def file_rows(texts: list[list[str]], tokenizer: PreTrainedTokenizerBase, rows: int, seq_len: int, seed: int) -> torch.Tensor:
    """`rows` sequences [rows, T] from the texts of each file, the files taking turns so every batch mixes them evenly."""
    per_file = -(-rows // len(texts))
    made = [token_rows(t, tokenizer, per_file, seq_len, seed) for t in texts]  # F x [per_file, T]
    return torch.stack(made, dim=1).reshape(-1, seq_len)[:rows]  # row j from file j % F
