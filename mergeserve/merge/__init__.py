"""Merge methods for shared layers and MoE builders, one module each, registered by name."""

from __future__ import annotations

import importlib

from mergeserve.composition import ComposedModel
from mergeserve.experts import ExpertPool
from mergeserve.kernels.capability import resolve_format
from mergeserve.spec import CompositionSpec
from mergeserve.spec.merge import MODELS


# The builder of each composition method (route and hetero are not built here: each member is its own engine).
# Modules by name, imported on first use: a dense server never loads the MoE builders.
BUILDERS: dict[str, str] = {"btx": "mergeserve.merge.btx", "mergeme": "mergeserve.merge.mergeme",
                            **dict.fromkeys(MODELS, "mergeserve.merge.dense")}


def build(spec: CompositionSpec, pool: ExpertPool) -> ComposedModel:
    """Build the composition `spec` describes from experts in `pool` (loaded there once)."""
    if spec.routes_requests:
        raise ValueError(f"{spec.name}: method={spec.method} serves whole models, each in an engine of its own: "
                         "there is no one model to build or export")
    composed = importlib.import_module(BUILDERS[spec.method]).build(spec, pool)
    composed.int8 = resolve_format(spec.dtype) == "int8" if spec.dtype else pool.int8
    return composed
