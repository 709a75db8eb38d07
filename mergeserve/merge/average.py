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
    bases = [w.base if isinstance(w, LowRank) else w for w in ws]
    first = bases[0]
    if all(t.data_ptr() == first.data_ptr() and t.shape == first.shape for t in bases):
        if not any(isinstance(w, LowRank) for w in ws):
            return first
        return MergedLowRank(first, tuple((w if isinstance(w, LowRank) else None, c / total) for w, c in zip(ws, weights)))
    dense = [w.dense() if isinstance(w, LowRank) else w for w in ws]
    out = dense[0] * (weights[0] / total)
    for t, c in zip(dense[1:], weights[1:]):
        out.add_(t, alpha=c / total)
    return out
