"""The builder's two steps: merge the spec's tensors (merge/), then initialise its routers (router/).

Routers that read their experts' prompts (hidden, centroid) calibrate through the engine's
forward (learn/router_inputs.py), injected here: merge and router import neither the engine nor
each other. Everything that serves, evaluates, exports or learns from a composition builds it here.
"""

from __future__ import annotations

import logging

from mergeserve import merge
from mergeserve.composition import ComposedModel
from mergeserve.experts import ExpertPool
from mergeserve.learn.router_inputs import calibration
from mergeserve.merge import hetero
from mergeserve.merge.btx import checkpoints
from mergeserve.router import init_router
from mergeserve.spec import CompositionSpec

log = logging.getLogger(__name__)


def build(spec: CompositionSpec, pool: ExpertPool) -> ComposedModel:
    """The composition `spec` describes, from experts in `pool` (loaded there once), ready to run."""
    composed = merge.build(spec, pool)
    if spec.is_moe:
        base, experts = checkpoints(spec, pool)  # the ones merge.build loaded: the pool holds them
        init_router(composed, spec, base, experts, calibration)
    return composed


def build_members(spec: CompositionSpec, pool: ExpertPool) -> list[ComposedModel]:
    """method=route or hetero: each member a composition of its own; hetero's then share one
    embedding and head through projectors fitted in closed form (merge/hetero.py)."""
    members = [build(spec.member(e), pool) for e in spec.experts]
    if spec.method != "hetero":
        return members
    members, fits = hetero.share(members)
    for e, fit in zip(spec.experts, fits):
        log.info("%s: member %s reads the shared embedding at %.1e and its head at %.1e relative residual",
                 spec.name, e.name, fit.embedding, fit.head)
    return members
