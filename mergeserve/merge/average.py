"""Weighted averages of weights, reusing storage where every source already agrees."""

from __future__ import annotations

from mergeserve.weights import LowRank, MergedLowRank, Weight


def mean(ws: list[Weight], weights: list[float] | None = None) -> Weight:
    """Weighted elementwise mean (weights normalised to sum 1).

    The first tensor itself, uncopied, when all are the same storage; LoRA experts over one
    base average as base + sum_i w_i B_i A_i, a MergedLowRank of references to their factors:
    nothing is copied here.
    """
    weights = weights or [1.0] * len(ws)
    total = sum(weights)
    if (summed := delta_sum(ws, [c / total for c in weights])) is not None:
        return summed
    dense = [w.dense() if isinstance(w, LowRank) else w for w in ws]
    out = dense[0] * (weights[0] / total)
    for t, c in zip(dense[1:], weights[1:]):
        out.add_(t, alpha=c / total)
    return out


def delta_sum(ws: list[Weight], coefs: list[float]) -> Weight | None:
    """base + sum_i coefs_i B_i A_i where every weight is one base's tensor or LoRA factors over it,
    a MergedLowRank of references (the base itself where none is low-rank); None where they are
    not over one base. With coefficients summing to 1 it is their weighted mean; otherwise a
    task-arithmetic sum of the adapters' task vectors B_i A_i."""
    bases = [w.base if isinstance(w, LowRank) else w for w in ws]
    first = bases[0]
    if not all(t.data_ptr() == first.data_ptr() and t.shape == first.shape for t in bases):
        return None
    if not any(isinstance(w, LowRank) for w in ws):
        return first
    return MergedLowRank(first, tuple((w if isinstance(w, LowRank) else None, c) for w, c in zip(ws, coefs)))
