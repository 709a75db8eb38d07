"""Token routers: the per-layer gate rows [E, D] of an MoE composition, by kind.

Router initialisation is the builder's step after the merge (learn/compose.py). Kinds that read
their experts' prompts through the composed model (hidden, centroid) get that forward injected
as a `Calibration`, so that nothing here imports the engine or the merge.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from mergeserve.composition import ComposedModel
from mergeserve.experts import Checkpoint
from mergeserve.spec import CompositionSpec


# For each (texts, expert e): the router inputs of `texts` with every router forced to e, site ->
# L x [tokens, D] (the attention site only with routed attention). One forward for all of them.
RouterInputs = Callable[[list[tuple[list[str], int]]], list[dict[str, list[torch.Tensor]]]]
# The calibration forward of a composition whose routers are not filled yet.
Calibration = Callable[[ComposedModel], RouterInputs]


def init_router(
    composed: ComposedModel, spec: CompositionSpec, base: Checkpoint, experts: list[Checkpoint],
    calibration: Calibration | None = None,
) -> None:
    """Fill every MoE layer's router [E, D] as the spec's router section says, and with routed
    attention every layer's attention router [E, D] too. `calibration`: the forward that kinds
    reading their experts' prompts run (None: those kinds are refused).

    Mixture routers (perplexity, task_vector) have no gate rows: they attach each expert's
    own layers and MixtureRouting data instead (router/mixture.py).
    """
    if composed.num_experts == 1:
        return
    if spec.mixture_routed:
        from mergeserve.router.mixture import attach_mixture_router

        attach_mixture_router(composed, spec, base, experts)
        return
    rows = _rows(composed, spec, base, calibration)
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


# Each token router kind and the function, `module:name` under mergeserve.router, that computes its
# rows: (composed, spec, base, calibration) -> Rows. Imported on first use; a new kind is a module and a line here.
ROW_BUILDERS = {
    "hidden": "hidden:hidden_rows",
    "centroid": "centroid:centroid_rows",
    "arrow": "arrow:arrow_rows",
    "smile": "smile:smile_rows",
    "random": "random:random_router_rows",
    "learned": "learned:learned_rows",
}


def _rows(composed: ComposedModel, spec: CompositionSpec, base: Checkpoint, calibration: Calibration | None) -> Rows:
    module, name = ROW_BUILDERS[spec.router.kind].split(":")
    return getattr(importlib.import_module(f"mergeserve.router.{module}"), name)(composed, spec, base, calibration)


def calibrated(composed: ComposedModel, spec: CompositionSpec, calibration: Calibration | None) -> RouterInputs:
    """The composition's calibration forward, for a kind that reads its experts' prompts."""
    if calibration is None:
        raise ValueError(f"router.kind={spec.router.kind} reads its experts' prompts through the composed model: "
                         "build the composition with a calibration forward (mergeserve.learn.compose.build)")
    return calibration(composed)


def zero_rows(composed: ComposedModel) -> list[torch.Tensor]:
    return [torch.zeros(composed.num_experts, composed.config.hidden_size) for _ in composed.layers]
