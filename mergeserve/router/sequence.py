"""MergeME sequence-level routers at build time: each expert's own layers and the routing data.

For prompt x, alpha = softmax(t * topk(score)) over the experts, zero outside the top k:
- perplexity: score_i = 1 / PPL(x | expert i), under expert i's own model (its decoder
  layers with the composition's shared embeddings, final norm and head);
- task_vector: score_i = cos(-grad_theta L_base(x), tau_i), the base's descent direction on x
  against expert i's task vector (see engine/task_vector.py for the sign).
t is `router.scale` when the spec sets it (an inverse temperature: larger is sharper),
otherwise 1, the paper's form.

The composition carries this as plain data (composition.SequenceRouting); the engine owns
the scoring (engine/sequence_router.py) and asks for a choice once per request, when it is
admitted.
"""

from __future__ import annotations

from mergeserve.composition import Attention, ComposedModel, ExpertFFN, Layer, SequenceRouting
from mergeserve.experts import Checkpoint
from mergeserve.spec import CompositionSpec


def attach_sequence_router(
    composed: ComposedModel, spec: CompositionSpec, base: Checkpoint, experts: list[Checkpoint],
) -> None:
    """Give every layer its experts' own decoder layers and the composition its sequence routing."""
    names = [e.name for e in spec.experts]
    for n, layer in enumerate(composed.layers):
        layer.expert_layers = [own_layer(e, n) for e in experts]
        layer.router = None
        if spec.router.attention == "dynamic":  # every FFN merged per request: LoRA experts only
            keys = [f"model.layers.{n}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
            for e, name in zip(experts, names):
                e.factored_over(base.stored, keys, name)
    r = spec.router
    composed.sequence_routing = SequenceRouting(
        kind=r.kind, attention=r.attention, top_k=composed.top_k,
        temperature=r.scale if "scale" in r.model_fields_set else 1.0, base=base, experts=experts,
    )


def own_layer(expert: Checkpoint, n: int) -> Layer:
    """Decoder layer n of `expert` as a dense Layer of the pool's tensors (a LoRA expert's as
    factors over the base: no copy either way)."""
    t, w, p = expert.stored, expert.weight, f"model.layers.{n}."
    attn = Attention(
        *(w(p + f"self_attn.{x}_proj.weight") for x in "qkvo"),
        *(t.get(p + f"self_attn.{x}_proj.bias") for x in "qkv"),
    )
    ffn = ExpertFFN(*(w(p + f"mlp.{x}_proj.weight") for x in ("gate", "up", "down")))
    return Layer(t[p + "input_layernorm.weight"], attn, t[p + "post_attention_layernorm.weight"], [ffn])
