"""Linear merge: one dense model, every tensor (FFNs included) the weighted mean of the experts'."""

from __future__ import annotations

from mergeserve.experts import ExpertPool
from mergeserve.merge.average import mean
from mergeserve.merge.btx import compose, load_experts
from mergeserve.merge.composed import ComposedModel, ExpertFFN
from mergeserve.spec import CompositionSpec


def build(spec: CompositionSpec, pool: ExpertPool) -> ComposedModel:
    base, experts = load_experts(spec, pool)
    weights = [e.weight for e in spec.experts]
    composed = compose(spec.name, base, experts, [spec.name], top_k=1, weights=weights)
    for layer in composed.layers:
        ffns = layer.experts
        layer.experts = [ExpertFFN(*(mean([getattr(f, p) for f in ffns], weights) for p in ("gate_proj", "up_proj", "down_proj")))]
    composed.sources = [spec.base] + [e.source for e in spec.experts]
    return composed
