"""MergeME (homogeneous): BTX with the shared layers merged on task vectors (TIES or DARE).

tau_i = theta_i - theta_base for every non-FFN tensor; the shared tensor is
base + lambda * merge(w_i * tau_i) with the method and parameters of `spec.merge`
(paper defaults: TIES, lambda 1/3, keep ratio 0.8). FFN experts are the pool's own
tensors, unchanged. The base itself can be an expert (a generalist): give its
source as an expert's source.
"""

from __future__ import annotations

from mergeserve.composition import ComposedModel
from mergeserve.experts import ExpertPool
from mergeserve.merge.btx import build_moe, load_experts
from mergeserve.merge.methods import spec_merger
from mergeserve.spec import CompositionSpec


def build(spec: CompositionSpec, pool: ExpertPool) -> ComposedModel:
    base, experts = load_experts(spec, pool)
    return build_moe(spec, base, experts, spec_merger(spec, base, experts))
