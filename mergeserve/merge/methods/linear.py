"""Linear merge (model soup): the weighted mean of the experts' tensors; the base is unused."""

from __future__ import annotations

from torch import Generator, Tensor

from mergeserve.merge.average import mean
from mergeserve.spec.merge import TaskVectorMerge


def merge(
    base: Tensor, experts: list[Tensor], weights: list[float], params: TaskVectorMerge, generator: Generator
) -> Tensor:
    return mean(experts, weights)
