"""Token routers: training-free initialisation of the per-layer gate rows."""

from __future__ import annotations

import torch

from mergeserve.merge.composed import ComposedModel
from mergeserve.spec import CompositionSpec


def init_router(composed: ComposedModel, spec: CompositionSpec) -> None:
    """Fill every MoE layer's router [E, D] as the spec's router section says."""
    if composed.num_experts == 1:
        return
    if spec.router.kind == "random":
        from mergeserve.router.random import random_rows

        rows = random_rows(len(composed.layers), composed.num_experts, composed.config.hidden_size, spec.router)
    else:
        from mergeserve.router.hidden import hidden_rows

        rows = hidden_rows(composed, spec)
    for layer, r in zip(composed.layers, rows):
        layer.router = r


def zero_rows(composed: ComposedModel) -> list[torch.Tensor]:
    return [torch.zeros(composed.num_experts, composed.config.hidden_size) for _ in composed.layers]
