"""Random gate rows (tests, baselines): logits of order `scale` for unit-RMS inputs."""

from __future__ import annotations

import torch

from mergeserve.spec import RouterSpec


def random_rows(layers: int, experts: int, dim: int, spec: RouterSpec, offset: int = 0) -> list[torch.Tensor]:
    """offset: another draw from the same seed (the attention router's rows are not the FFN's)."""
    g = torch.Generator().manual_seed(spec.seed + offset)
    return [torch.randn(experts, dim, generator=g) * (spec.scale / dim**0.5) for _ in range(layers)]
