"""The builder's two steps: merge the spec's tensors (merge/), then initialise its routers (router/).

Routers that read their experts' prompts (hidden, centroid) calibrate through the engine's
forward (learn/router_inputs.py), injected here: merge and router import neither the engine nor
each other. Everything that serves, evaluates, exports or learns from a composition builds it here.
"""

from __future__ import annotations

from mergeserve import merge
from mergeserve.composition import ComposedModel
from mergeserve.experts import ExpertPool
from mergeserve.learn.router_inputs import calibration
from mergeserve.merge.btx import checkpoints
from mergeserve.router import init_router
from mergeserve.spec import CompositionSpec


def build(spec: CompositionSpec, pool: ExpertPool) -> ComposedModel:
    """The composition `spec` describes, from experts in `pool` (loaded there once), ready to run."""
    composed = merge.build(spec, pool)
    if spec.is_moe:
        base, experts = checkpoints(spec, pool)  # the ones merge.build loaded: the pool holds them
        init_router(composed, spec, base, experts, calibration)
    return composed
