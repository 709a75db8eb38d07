"""Weighted averages of weights, reusing storage where every source already agrees."""

from __future__ import annotations

import torch

from mergeserve.weights import LowRank, Weight


def mean(ws: list[Weight], weights: list[float] | None = None) -> Weight:
    """Weighted elementwise mean (weights normalised to sum 1).

    The first tensor itself, uncopied, when all are the same storage; LoRA experts over one
    base average as base + sum_i w_i B_i A_i, kept as factors side by side (a LowRank whose
    `terms` name the adapters): nothing dense is made here.
    """
    weights = weights or [1.0] * len(ws)
    total = sum(weights)
    bases = [w.base if isinstance(w, LowRank) else w for w in ws]
    first = bases[0]
    if all(t.data_ptr() == first.data_ptr() and t.shape == first.shape for t in bases):
        low = [(w, c / total) for w, c in zip(ws, weights) if isinstance(w, LowRank)]
        if not low:
            return first
        b = torch.cat([w.scaled_b(first.dtype) * c for w, c in low], dim=1)  # [out, sum r]
        a = torch.cat([w.a.to(first.dtype) for w, _ in low])  # [sum r, in]
        terms = tuple((w if isinstance(w, LowRank) else None, c / total) for w, c in zip(ws, weights))
        return LowRank(first, a, b, 1.0, terms)
    dense = [w.dense() if isinstance(w, LowRank) else w for w in ws]
    out = dense[0] * (weights[0] / total)
    for t, c in zip(dense[1:], weights[1:]):
        out.add_(t, alpha=c / total)
    return out
