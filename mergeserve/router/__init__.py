"""Token routers: the per-layer gate rows [E, D] of an MoE composition, by kind."""

from __future__ import annotations

import torch

from mergeserve.composition import ComposedModel
from mergeserve.experts import Checkpoint
from mergeserve.spec import CompositionSpec


def init_router(
    composed: ComposedModel, spec: CompositionSpec, base: Checkpoint, experts: list[Checkpoint],
) -> None:
    """Fill every MoE layer's router [E, D] as the spec's router section says, and with routed
    attention every layer's attention router [E, D] too.

    Sequence routers (perplexity, task_vector) have no gate rows: they attach each expert's
    own layers and SequenceRouting data instead (router/sequence.py).
    """
    if composed.num_experts == 1:
        return
    if spec.router.is_sequence:
        from mergeserve.router.sequence import attach_sequence_router

        attach_sequence_router(composed, spec, base, experts)
        return
    rows = _rows(composed, spec, base)
    for site in SITES:
        for layer, r in zip(composed.layers, rows.get(site, [])):
            # Routing runs in fp32 whatever the weights: top-k is sensitive to rounding.
            setattr(layer, ROUTER_FIELD[site], r.float())


# Where a token router sits: before the FFN (every MoE), before attention (routed attention).
SITES = ("ffn", "attention")
ROUTER_FIELD = {"ffn": "router", "attention": "attn_router"}
Rows = dict[str, list[torch.Tensor]]  # site -> L x [E, D]


def routed_sites(composed: ComposedModel) -> tuple[str, ...]:
    return SITES if composed.layers[0].attn_experts else SITES[:1]


def _rows(composed: ComposedModel, spec: CompositionSpec, base: Checkpoint) -> Rows:
    kind = spec.router.kind
    if kind == "random":
        from mergeserve.router.random import random_rows

        shape = (len(composed.layers), composed.num_experts, composed.config.hidden_size)
        return {site: random_rows(*shape, spec.router, offset=i) for i, site in enumerate(routed_sites(composed))}
    if kind == "hidden":
        from mergeserve.router.hidden import hidden_rows

        return hidden_rows(composed, spec)
    if kind == "centroid":
        from mergeserve.router.centroid import centroid_rows

        return centroid_rows(composed, spec)
    if kind == "arrow":
        from mergeserve.router.arrow import arrow_rows

        return arrow_rows(composed, spec, base)
    if kind == "smile":
        from mergeserve.router.smile import smile_rows

        return smile_rows(composed, spec, base)
    from mergeserve.router.learned import load_rows

    return {site: load_rows(composed, spec.router.weights, site) for site in routed_sites(composed)}


def zero_rows(composed: ComposedModel) -> list[torch.Tensor]:
    return [torch.zeros(composed.num_experts, composed.config.hidden_size) for _ in composed.layers]
