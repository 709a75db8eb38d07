"""Consensus merging with TALL masks (Wang et al. 2024, "Localizing Task Information for Improved
Model Merging and Compression").

tau_MTL = sum_i w_i tau_i (task arithmetic). Task i's TALL mask keeps the entries where its
own vector outweighs what the others add: m_i = |tau_i| >= lambda_t * |tau_MTL - tau_i|.
Consensus keeps tau_MTL only where at least k tasks' masks agree: weights one task alone
needs ("selfish") and weights no task needs ("catastrophic") are dropped. The result is
base + lambda * (sum_i m_i >= k) * tau_MTL. The paper uses k = 2; its lambda_t is chosen on
validation data from 0.2-0.6, and 0.6 is FusionBench's default (`merge.tall_lambda`).
"""

from __future__ import annotations

import torch
from torch import Generator, Tensor

from mergeserve.merge.methods.task_arithmetic import weighted_sum
from mergeserve.spec.merge import ConsensusMerge


def tall_masks(taus: Tensor, mtl: Tensor, tall_lambda: float) -> Tensor:
    """Each task's mask [E, *shape] of the entries it matters for."""
    return taus.abs() >= tall_lambda * (mtl - taus).abs()


def merge(
    base: Tensor, experts: list[Tensor], weights: list[float], params: ConsensusMerge, generator: Generator
) -> Tensor:
    taus = torch.stack([e - base for e in experts])  # [E, *shape]
    mtl = weighted_sum(taus, weights)
    agree = tall_masks(taus, mtl, params.tall_lambda).sum(0) >= params.consensus_k
    return base + params.lambda_ * mtl * agree
