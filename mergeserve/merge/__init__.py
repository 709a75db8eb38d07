"""Merge methods for shared layers and MoE builders, one module each, registered by name."""

from __future__ import annotations

from collections.abc import Callable

from mergeserve.experts import ExpertPool
from mergeserve.merge.composed import ComposedModel
from mergeserve.spec import CompositionSpec


def _methods() -> dict[str, Callable[[CompositionSpec, ExpertPool], ComposedModel]]:
    from mergeserve.merge import btx, linear

    return {"btx": btx.build, "linear": linear.build}


def build(spec: CompositionSpec, pool: ExpertPool) -> ComposedModel:
    """Build the composition `spec` describes from experts in `pool` (loaded there once)."""
    return _methods()[spec.method](spec, pool)
