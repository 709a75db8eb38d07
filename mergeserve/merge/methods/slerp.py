"""SLERP: spherical interpolation from experts[0] (t=0) to experts[1] (t=1); the base is unused.

One angle for the whole flattened tensor (mergekit 0.1.5 takes one per output row); the
coefficients apply to the tensors as they are, not normalised, as in mergekit.
"""

from __future__ import annotations

import math

import torch
from torch import Generator, Tensor

from mergeserve.spec.merge import SlerpMerge

# mergekit's: past it the directions are colinear, sin(theta) ~ 0, and lerp is used instead.
DOT_THRESHOLD = 0.9995


def cosine(a: Tensor, b: Tensor, eps: float = 1e-8) -> float:
    return (torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm()).clamp_min(eps)).item()


def merge(
    base: Tensor, experts: list[Tensor], weights: list[float], params: SlerpMerge, generator: Generator
) -> Tensor:
    if len(experts) != 2:
        raise ValueError(f"slerp merges exactly two experts, got {len(experts)}")
    v0, v1 = experts
    cos = cosine(v0, v1)
    if abs(cos) > DOT_THRESHOLD:
        return torch.lerp(v0, v1, params.t)
    theta = math.acos(cos)
    return (math.sin((1 - params.t) * theta) * v0 + math.sin(params.t * theta) * v1) / math.sin(theta)
