"""A weight as the engine and the merges see it: a tensor, or a shared base tensor plus LoRA factors
(`LowRank`), and the row-stacking that lets fused projections run as one matmul without a copy."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(eq=False)
class LowRank:
    """A weight kept as its factors: base + scale * b @ a (a LoRA expert's projection).

    `base` is the pool's shared tensor; only the factors belong to the expert. `dense()`
    materialises the sum for whoever needs it (merges, export) and is never kept resident.
    """

    base: torch.Tensor  # [out, in]
    a: torch.Tensor  # [r, in]; may be stored in another dtype than base (adapters ship bf16)
    b: torch.Tensor  # [out, r]
    scale: float = 1.0  # LoRA's alpha / r (alpha / sqrt(r) for rsLoRA)
    # A merge of adapters (MergedLowRank): each input with its coefficient, None for the base itself.
    terms: tuple[tuple[LowRank | None, float], ...] | None = None

    @property
    def shape(self) -> torch.Size:
        return self.base.shape

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def scaled_b(self, dtype: torch.dtype) -> torch.Tensor:
        """scale * b in `dtype` (the scaling folded in at the compute precision)."""
        return self.b.to(dtype) * self.scale

    def dense(self) -> torch.Tensor:
        return torch.addmm(self.base, self.scaled_b(self.base.dtype), self.a.to(self.base.dtype))


class MergedLowRank(LowRank):
    """A merge of LoRA adapters over one base, base + sum_i c_i B_i A_i, held as its terms: the
    factors side by side (`a`, `b`) are made on each use and never kept, so a composition that
    averages adapters (BTX's attention, a linear merge) holds nothing but references. A base
    engine serves it from the adapters' own factors; an engine of its own materialises it."""

    def __init__(self, base: torch.Tensor, terms: tuple[tuple[LowRank | None, float], ...]) -> None:
        self.base, self.scale, self.terms = base, 1.0, terms

    @property
    def a(self) -> torch.Tensor:  # [sum r, in]
        return torch.cat([w.a.to(self.base.dtype) for w, _ in self.terms if w is not None])

    @property
    def b(self) -> torch.Tensor:  # [out, sum r], each B scaled by its adapter's scale and coefficient
        return torch.cat([w.scaled_b(self.base.dtype) * c for w, c in self.terms if w is not None], dim=1)


# A projection weight: a plain tensor, or a shared base tensor plus low-rank factors.
Weight = torch.Tensor | LowRank


def dense(w: Weight) -> torch.Tensor:
    """The weight as one tensor (a new one for LowRank)."""
    return w.dense() if isinstance(w, LowRank) else w


def weight_tensors(w: Weight) -> list[torch.Tensor]:
    """The tensors a weight holds (a merge holds its adapters')."""
    if isinstance(w, LowRank) and w.terms is not None:
        return [w.base, *(t for a, _ in w.terms if a is not None for t in weight_tensors(a))]
    return [w.base, w.a, w.b] if isinstance(w, LowRank) else [w]


def row_blocks(ws: list[torch.Tensor], copy: bool = True) -> torch.Tensor | None:
    """The tensors stacked by rows, [sum of rows, in]: a view when they already lie back to
    back in one storage (the pool loads q/k/v and gate/up that way), else a new tensor
    (or None when `copy` is False)."""
    first, offset = ws[0], ws[0].storage_offset()
    for w in ws:
        if not (w.is_contiguous() and w.dtype == first.dtype and w.shape[1:] == first.shape[1:]
                and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                and w.storage_offset() == offset):
            return torch.cat(ws) if copy else None
        offset += w.numel()
    rows = sum(w.shape[0] for w in ws)
    return first.as_strided((rows, *first.shape[1:]), (first.stride(0), *first.stride()[1:]), first.storage_offset())


def fuse(ws: list[Weight], copy: bool = False) -> Weight | None:
    """One weight computing every w of `ws` side by side (their outputs concatenated); where
    they do not lie back to back, a copy (`copy`) or None.

    Low-rank parts fuse too: base rows stacked, A stacked, B block-diagonal, so one
    x @ A^T serves every projection. A plain tensor among them has rank 0.
    """
    if all(not isinstance(w, LowRank) for w in ws):
        return row_blocks(ws, copy)
    bases = row_blocks([w.base if isinstance(w, LowRank) else w for w in ws], copy)
    if bases is None:
        return None
    dtype = next(w.a.dtype for w in ws if isinstance(w, LowRank))  # the factors keep their precision
    a = [w.a.to(dtype) if isinstance(w, LowRank) else w.new_zeros(0, w.shape[1], dtype=dtype) for w in ws]
    b = [w.scaled_b(dtype) if isinstance(w, LowRank) else w.new_zeros(w.shape[0], 0, dtype=dtype) for w in ws]
    return LowRank(bases, torch.cat(a), torch.block_diag(*b))


def fuse_in_place(ws: list[Weight]) -> list[Weight]:
    """The same tensors as views of one row-stacked buffer, so that `fuse` later costs no copy
    (low-rank weights are returned as they are: they are fused when they run)."""
    if any(isinstance(w, LowRank) for w in ws):
        return list(ws)
    return list(row_blocks(ws).split([w.shape[0] for w in ws]))


@dataclass(eq=False)
class ExpertFFN:
    """One expert's FFN: its three projections, each a tensor or a LowRank over the base's."""

    gate_proj: Weight  # [I, D]
    up_proj: Weight  # [I, D]
    down_proj: Weight  # [D, I]
