"""DARE (Yu et al. 2024): drop task-vector entries at random, keep each with probability
`density`, rescale the kept by 1/density; then task arithmetic. `drop` serves dare_ties too."""

from __future__ import annotations

import torch
from torch import Generator, Tensor

from mergeserve.merge.methods.task_arithmetic import weighted_sum
from mergeserve.spec.merge import DareLinearMerge, DareTiesMerge


def drop(tau: Tensor, params: DareLinearMerge | DareTiesMerge, generator: Generator) -> Tensor:
    if params.density >= 1:
        return tau
    kept = tau * torch.bernoulli(torch.full_like(tau, params.density), generator=generator)
    return kept / params.density if params.rescale else kept


def dropped(base: Tensor, experts: list[Tensor], params: DareLinearMerge | DareTiesMerge, generator: Generator) -> Tensor:
    """Stacked task vectors [E, *shape], one mask per expert drawn in expert order."""
    return torch.stack([drop(e - base, params, generator) for e in experts])


def merge(
    base: Tensor, experts: list[Tensor], weights: list[float], params: DareLinearMerge | DareTiesMerge, generator: Generator
) -> Tensor:
    return base + params.lambda_ * weighted_sum(dropped(base, experts, params, generator), weights)
