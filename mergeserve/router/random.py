"""Random gate rows (tests, baselines): logits of order `scale` for unit-RMS inputs."""

from __future__ import annotations

import torch

from mergeserve.composition import ComposedModel
from mergeserve.experts import Checkpoint
from mergeserve.router import Calibration, Rows, routed_sites
from mergeserve.spec import CompositionSpec
from mergeserve.spec.router import RandomRouterSpec


def random_rows(layers: int, experts: int, dim: int, spec: RandomRouterSpec, offset: int = 0) -> list[torch.Tensor]:
    """offset: another draw from the same seed (the attention router's rows are not the FFN's)."""
    g = torch.Generator().manual_seed(spec.seed + offset)
    return [torch.randn(experts, dim, generator=g) * (spec.scale / dim**0.5) for _ in range(layers)]


def random_router_rows(composed: ComposedModel, spec: CompositionSpec, base: Checkpoint, calibration: Calibration | None) -> Rows:
    shape = (len(composed.layers), composed.num_experts, composed.config.hidden_size)
    return {site: random_rows(*shape, spec.router, offset=i) for i, site in enumerate(routed_sites(composed))}
