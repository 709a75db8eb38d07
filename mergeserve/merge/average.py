"""Weighted averages of tensors, reusing storage where every source already agrees."""

from __future__ import annotations

import torch


def mean(tensors: list[torch.Tensor], weights: list[float] | None = None) -> torch.Tensor:
    """Weighted elementwise mean (weights normalised to sum 1); the first tensor itself,
    uncopied, when all are the same storage."""
    first = tensors[0]
    if all(t.data_ptr() == first.data_ptr() and t.shape == first.shape for t in tensors):
        return first
    weights = weights or [1.0] * len(tensors)
    total = sum(weights)
    out = first * (weights[0] / total)
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t, alpha=w / total)
    return out
