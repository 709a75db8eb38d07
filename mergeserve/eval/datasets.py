"""The evaluation sets: per-domain held-out examples, the math problems, the mixed set.

Held-out files are `<data_dir>/<domain>/<set>.jsonl` (JSONL, each object with `text`; math
objects also carry `question` and `answer`): `heldout`, cut from training's own sources
(`python -m mergeserve.zoo data`), and `other`, from other sources and phrasings
(`python -m mergeserve.zoo other`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from mergeserve.calibration import read_jsonl
from mergeserve.zoo.splits import Example


SETS = ("heldout", "other")


@dataclass(frozen=True)
class EvalData:
    domains: dict[str, list[Example]]  # loss sets, in file order
    math: list[Example]  # problems scored by exact match of the final answer
    mixed: list[tuple[str, Example]]  # (source domain, example), domains interleaved in a seeded order


def load_eval_data(
    data_dir: str | Path, domains: tuple[str, ...], per_domain: int | None = None,
    mixed_per_domain: int = 40, math_examples: int = 100, seed: int = 0, math_domain: str = "math",
    held_out: str = "heldout",
) -> EvalData:
    """Read the held-out files and cut the subsets.

    per_domain: the first N examples of each file score the loss (None: all of them).
    mixed_per_domain: a seeded sample of N examples per domain, shuffled together.
    math_examples: the first N examples of the math file score exact-match accuracy.
    held_out: which set of each domain (SETS).
    """
    data_dir = Path(data_dir)
    full = {d: read_jsonl(data_dir / d / f"{held_out}.jsonl") for d in domains}
    rng = random.Random(seed)
    mixed = [(d, e) for d in domains for e in rng.sample(full[d], min(mixed_per_domain, len(full[d])))]
    rng.shuffle(mixed)
    math = full[math_domain][:math_examples] if math_domain in full else []
    return EvalData({d: examples[:per_domain] for d, examples in full.items()}, math, mixed)
