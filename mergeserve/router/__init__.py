"""Token routers: the per-layer gate rows [E, D] of an MoE composition, by kind."""

from __future__ import annotations

import torch

from mergeserve.composition import ComposedModel
from mergeserve.experts import Checkpoint
from mergeserve.spec import CompositionSpec


def init_router(
    composed: ComposedModel, spec: CompositionSpec, base: Checkpoint, experts: list[Checkpoint],
) -> None:
    """Fill every MoE layer's router [E, D] as the spec's router section says.

    Sequence routers (perplexity, task_vector) have no gate rows: they attach each expert's
    own layers and SequenceRouting data instead (router/sequence.py).
    """
    if composed.num_experts == 1:
        return
    if spec.router.is_sequence:
        from mergeserve.router.sequence import attach_sequence_router

        attach_sequence_router(composed, spec, base, experts)
        return
    kind = spec.router.kind
    if kind == "random":
        from mergeserve.router.random import random_rows

        rows = random_rows(len(composed.layers), composed.num_experts, composed.config.hidden_size, spec.router)
    elif kind == "hidden":
        from mergeserve.router.hidden import hidden_rows

        rows = hidden_rows(composed, spec)
    elif kind == "centroid":
        from mergeserve.router.centroid import centroid_rows

        rows = centroid_rows(composed, spec)
    elif kind == "arrow":
        from mergeserve.router.arrow import arrow_rows

        rows = arrow_rows(composed, spec, base)
    else:
        from mergeserve.router.learned import load_rows

        rows = load_rows(composed, spec.router.weights)
    for layer, r in zip(composed.layers, rows):
        layer.router = r.float()  # routing runs in fp32 whatever the weights: top-k is sensitive to rounding


def zero_rows(composed: ComposedModel) -> list[torch.Tensor]:
    return [torch.zeros(composed.num_experts, composed.config.hidden_size) for _ in composed.layers]
