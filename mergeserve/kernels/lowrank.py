"""y = x W^T for a weight that is a plain tensor or a base plus low-rank factors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergeserve.composition import LowRank, Weight


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> [..., out]; a LowRank runs its base once and adds (x A^T) (scale B)^T."""
    if not isinstance(w, LowRank):
        return F.linear(x, w, bias)
    return F.linear(x, w.base, bias) + F.linear(F.linear(x, w.a), w.b) * w.scale


def prepared(w: Weight) -> Weight:
    """`w` ready for `linear`: factors cast once to the base's dtype (not per call), scale folded into b."""
    if not isinstance(w, LowRank):
        return w
    return LowRank(w.base, w.a.to(w.base.dtype), w.scaled_b(w.base.dtype))
