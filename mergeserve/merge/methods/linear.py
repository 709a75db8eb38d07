"""Linear merge (model soup): the weighted mean of the experts' tensors; the base is unused."""

from __future__ import annotations

from torch import Generator, Tensor

from mergeserve.merge.average import mean
from mergeserve.spec import MergeParams


def merge(
    base: Tensor, experts: list[Tensor], weights: list[float], params: MergeParams, generator: Generator
) -> Tensor:
    return mean(experts, weights)
