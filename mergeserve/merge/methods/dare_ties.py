"""DARE-TIES: DARE's random drop and rescale, then TIES's sign election and disjoint merge."""

from __future__ import annotations

from torch import Generator, Tensor

from mergeserve.merge.methods.dare_linear import dropped
from mergeserve.merge.methods.ties import combine
from mergeserve.spec.merge import DareTiesMerge


def merge(
    base: Tensor, experts: list[Tensor], weights: list[float], params: DareTiesMerge, generator: Generator
) -> Tensor:
    return base + params.lambda_ * combine(dropped(base, experts, params, generator), weights, params)
