"""Merge methods for shared layers and MoE builders, one module each, registered by name."""

from __future__ import annotations

from mergeserve.composition import ComposedModel
from mergeserve.experts import ExpertPool
from mergeserve.spec import CompositionSpec


def build(spec: CompositionSpec, pool: ExpertPool) -> ComposedModel:
    """Build the composition `spec` describes from experts in `pool` (loaded there once).

    `btx` and `mergeme` build MoEs; every other method is a dense task-vector merge.
    """
    if spec.method == "btx":
        from mergeserve.merge.btx import build as build_btx

        return build_btx(spec, pool)
    if spec.method == "mergeme":
        from mergeserve.merge.mergeme import build as build_mergeme

        return build_mergeme(spec, pool)
    from mergeserve.merge.dense import build as build_dense

    return build_dense(spec, pool)
