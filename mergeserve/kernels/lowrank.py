"""y = x W^T for a weight that is a plain tensor, a packed one, or a base plus low-rank factors."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mergeserve.composition import LowRank, Weight
from mergeserve.kernels.packed import Packed


def linear(x: torch.Tensor, w: Weight | Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> [..., out] in the weight's dtype (x is cast to it: the residual stream is fp32);
    a LowRank runs its base once and adds (x A^T) (scale B)^T."""
    if isinstance(w, Packed):
        return w(x, bias)
    if isinstance(w, LowRank):
        return linear(x, w.base, bias) + linear(linear(x, w.a), w.b) * w.scale
    return F.linear(x.to(w.dtype), w, bias)


def prepared(w: Weight) -> Weight:
    """`w` ready for `linear`: factors cast once to the base's dtype (not per call), scale folded into b."""
    if not isinstance(w, LowRank):
        return w
    return LowRank(w.base, w.a.to(w.base.dtype), w.scaled_b(w.base.dtype))


Pack = Callable[[torch.Tensor], "torch.Tensor | Packed"]


def packed(w: Weight | None, pack: Pack | None) -> Weight | Packed | None:
    """`w` with its full-size tensor (a LowRank's base) run through `pack` (a WeightPacker)."""
    if pack is None or w is None:
        return w
    if isinstance(w, LowRank):
        return LowRank(pack(w.base), w.a, w.b, w.scale)
    return pack(w)
