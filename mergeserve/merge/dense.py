"""Dense merges: one model, every tensor (FFNs included) merged by a task-vector method.

`method: linear | task_arithmetic | ties | dare_linear | dare_ties | slerp` in a spec
builds this; the parameters are the spec's `merge` section. Tensors every expert shares
with the base (LoRA leaves embeddings alone) stay the base's own, uncopied.
"""

from __future__ import annotations

from mergeserve.composition import ComposedModel

from mergeserve.weights import ExpertFFN, fuse_in_place

from mergeserve.experts import ExpertPool
from mergeserve.merge.btx import compose, load_experts
from mergeserve.merge.methods import spec_merger
from mergeserve.spec import CompositionSpec


def build(spec: CompositionSpec, pool: ExpertPool) -> ComposedModel:
    base, experts = load_experts(spec, pool)
    merged = spec_merger(spec, base, experts)
    # compose() takes each expert's FFN as is; a dense model has one, merged like the rest.
    composed = compose(spec.name, base, experts[:1], [spec.name], 1, merged)
    for n, layer in enumerate(composed.layers):
        gate, up = fuse_in_place([merged(f"model.layers.{n}.mlp.{x}_proj.weight") for x in ("gate", "up")])
        layer.experts = [ExpertFFN(gate, up, merged(f"model.layers.{n}.mlp.down_proj.weight"))]
    composed.sources = [spec.base] + [e.source for e in spec.experts]
    return composed
