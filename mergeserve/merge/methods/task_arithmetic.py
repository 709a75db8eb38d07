"""Task arithmetic (Ilharco et al. 2023): base + lambda * sum_i w_i * tau_i, tau_i = expert_i - base."""

from __future__ import annotations

import torch
from torch import Generator, Tensor

from mergeserve.spec.merge import TaskArithmeticMerge


def columns(weights: list[float], taus: Tensor) -> Tensor:
    """The weights as [E, 1, ..., 1], to broadcast over stacked task vectors [E, *shape]."""
    w = torch.tensor(weights, dtype=taus.dtype, device=taus.device)
    return w.view(-1, *[1] * (taus.dim() - 1))


def weighted_sum(taus: Tensor, weights: list[float]) -> Tensor:
    """sum_i w_i * tau_i of stacked task vectors [E, *shape] -> [*shape]."""
    return (taus * columns(weights, taus)).sum(0)


def merge(
    base: Tensor, experts: list[Tensor], weights: list[float], params: TaskArithmeticMerge, generator: Generator
) -> Tensor:
    taus = torch.stack([e - base for e in experts])  # [E, *shape]
    return base + params.lambda_ * weighted_sum(taus, weights)
