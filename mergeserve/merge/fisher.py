"""Fisher-weighted merging (Matena & Raffel 2022): theta = sum_i w_i F_i theta_i / sum_i w_i F_i.

F_i is expert i's diagonal Fisher information, cached by `mergeserve fisher` (learn/fisher.py) as
`DIR/<expert>.safetensors`: one tensor per merged weight, the expert's source in the metadata.
A spec with `method: fisher` and `merge: {fisher: DIR}` reads them here. Where every expert's
Fisher is ~0 the merge falls back to the weighted average (eps).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from mergeserve.experts import CheckpointError

EPS = 1e-12  # keeps sum_i F_i away from 0 where no expert's loss depends on a weight


def merge(base: Tensor, experts: list[Tensor], weights: list[float], fishers: list[Tensor]) -> Tensor:
    """Fisher-weighted average of the experts' tensors (fp32, the base's shape)."""
    del base  # theta_i are whole weights: the base cancels out
    num = sum(w * f * e for w, f, e in zip(weights, fishers, experts))
    den = sum(w * f for w, f in zip(weights, fishers))
    mean = sum(w * e for w, e in zip(weights, experts)) / sum(weights)
    return torch.where(den > EPS, num / den.clamp_min(EPS), mean)


class FisherFiles:
    """The cached Fishers of a spec's experts, read tensor by tensor."""

    def __init__(self, folder: str | Path, names: list[str], sources: list[str]) -> None:
        self.files = []
        for name, source in zip(names, sources):
            path = Path(folder) / f"{name}.safetensors"
            try:
                f = safe_open(str(path), "pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: no readable Fisher for expert {name!r} (run `mergeserve fisher`): {e}") from e
            if (f.metadata() or {}).get("source") != source:
                raise CheckpointError(f"{path}: computed for {(f.metadata() or {}).get('source')}, the spec's {name!r} is {source}")
            self.files.append(f)

    def get(self, key: str) -> list[Tensor] | None:
        """Every expert's Fisher of `key`; None when not computed (a tensor the experts share)."""
        if not all(key in f.keys() for f in self.files):
            return None
        return [f.get_tensor(key) for f in self.files]
