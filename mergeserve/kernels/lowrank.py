"""y = x W^T for a weight that is a plain tensor, a packed one, or a base plus low-rank factors."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from mergeserve.weights import LowRank, Weight
from mergeserve.kernels.packed import Packed


def linear(x: torch.Tensor, w: Weight | Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> [..., out] in the weight's dtype (x is cast to it: the residual stream is fp32);
    a LowRank runs its base once and adds (x A^T) (scale B)^T."""
    if isinstance(w, Packed):
        return w(x, bias)
    if isinstance(w, LowRank):
        delta = linear(linear(x, w.a), w.b)
        return linear(x, w.base, bias) + (delta if w.scale == 1.0 else delta * w.scale)
    return F.linear(x.to(w.dtype), w, bias)


# Low-rank factors compute in float32 whatever the base's dtype: a rank-8..16 matmul of a decode
# batch (5 x 576 through 576 x 8 and 8 x 3072) took 58-70 us in bfloat16 and 6-9 us in float32
# on an AMX Xeon (oneDNN has no fast bf16 path for such thin shapes); AVX2-only CPUs emulate
# bfloat16 anyway. The factors are a few MB, so their precision costs no memory worth counting.
FACTOR_DTYPE = torch.float32


def prepared(w: Weight) -> Weight:
    """`w` ready for `linear`: factors cast once to FACTOR_DTYPE (not per call), scale folded into b.
    A merge of adapters (`terms`) is materialised: one dense matmul beats base plus factors."""
    if not isinstance(w, LowRank):
        return w
    if w.terms is not None:
        return w.dense()
    return LowRank(w.base, w.a.to(FACTOR_DTYPE), w.scaled_b(FACTOR_DTYPE))


class Pack(Protocol):
    """What readies the weights an engine runs: packed.WeightPacker (bf16 for oneDNN), int8.Int8Packer."""

    def __call__(self, w: torch.Tensor) -> torch.Tensor | Packed:
        """A full-size weight, its copy shared with other engines over the same tensor."""

    def private(self, w: torch.Tensor) -> torch.Tensor | Packed:
        """A full-size weight of one owner's (a fused concatenation), not shared."""

    def factors(self, w: torch.Tensor) -> torch.Tensor | Packed:
        """A table of low-rank factors."""


def packed(w: Weight | None, pack: Pack | None) -> Weight | Packed | None:
    """`w` with its full-size tensor (a LowRank's base) run through `pack` (a WeightPacker)."""
    if pack is None or w is None:
        return w
    if isinstance(w, LowRank):
        return LowRank(pack(w.base), w.a, w.b, w.scale)
    return pack(w)
