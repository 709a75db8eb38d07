"""TIES merging (Yadav et al. 2023): trim each task vector, elect a sign per entry, merge the agreeing.

The sign is elected on the weighted task vectors (as mergekit does; peft elects on the
unweighted ones: the same when all weights are 1). `trim` and `combine` serve dare_ties too.
"""

from __future__ import annotations

import torch
from torch import Generator, Tensor

from mergeserve.merge.methods.task_arithmetic import columns
from mergeserve.spec.merge import SignElected, TiesMerge


def trim(tau: Tensor, density: float) -> Tensor:
    """`tau` with all but its `density` fraction of largest-magnitude entries set to zero."""
    if density >= 1:
        return tau
    keep = int(density * tau.numel())
    if keep == 0:
        return torch.zeros_like(tau)
    if not tau.any():  # e.g. the base itself as an expert: nothing to select from
        return tau
    # The keep-th largest magnitude as a threshold: a selection, much faster than a topk this wide;
    # only exact ties at the threshold (which floats rarely have) keep an extra entry.
    magnitude = tau.abs()
    threshold = magnitude.flatten().kthvalue(tau.numel() - keep + 1).values
    return tau * (magnitude >= threshold)


def agreeing(weighted: Tensor, consensus: str) -> Tensor:
    """[E, *shape] bool: where an expert's entry has the elected sign (a zero never has).

    consensus "sum" elects the sign of the summed mass, "count" the more frequent sign; ties go to +.
    """
    signs = weighted.sign()
    mass = weighted.sum(0) if consensus == "sum" else signs.sum(0)
    return signs == torch.where(mass >= 0, 1.0, -1.0)


def combine(taus: Tensor, weights: list[float], params: SignElected) -> Tensor:
    """Disjoint merge of stacked task vectors [E, *shape] -> [*shape]: the sum of the weighted
    entries agreeing with the elected sign; if `normalize`, over the agreeing experts' weights."""
    w = columns(weights, taus)
    weighted = taus * w
    agree = agreeing(weighted, params.consensus)
    merged = (weighted * agree).sum(0)
    if not params.normalize:
        return merged
    divisor = (w * agree).sum(0)
    return merged / torch.where(divisor == 0, 1.0, divisor)


def merge(
    base: Tensor, experts: list[Tensor], weights: list[float], params: TiesMerge, generator: Generator
) -> Tensor:
    taus = torch.stack([trim(e - base, params.density) for e in experts])  # [E, *shape]
    return base + params.lambda_ * combine(taus, weights, params)
