"""MergeME mixture routers at build time: each expert's own layers and the routing data.

For prompt x, alpha = softmax(t * topk(score)) over the experts, zero outside the top k:
- perplexity: score_i = 1 / PPL(x | expert i), under expert i's own model (its decoder
  layers with the composition's shared embeddings, final norm and head), or with
  `router.score: log_likelihood` its log, the mean log-probability per token;
- task_vector: score_i = cos(-grad_theta L_base(x), tau_i), the base's descent direction on x
  against expert i's task vector (see engine/task_vector.py for the sign).
t is `router.inverse_temperature` (larger is sharper; 1, the default, is the paper's form).

The composition carries this as plain data (composition.MixtureRouting); the engine owns
the scoring (engine/mixture_router.py) and asks for a choice once per request, when it is
admitted.
"""

from __future__ import annotations

import torch

from mergeserve.composition import Attention, ComposedModel, Layer, MixtureRouting

from mergeserve.weights import ExpertFFN
from mergeserve.experts import Checkpoint
from mergeserve.spec import CompositionSpec


def attach_mixture_router(
    composed: ComposedModel, spec: CompositionSpec, base: Checkpoint, experts: list[Checkpoint],
) -> None:
    """Give every layer its experts' own decoder layers and the composition its mixture routing."""
    # attention dynamic merges every FFN per request: LoRA experts over the base only.
    over = base if spec.router.attention == "dynamic" else None
    for n, layer in enumerate(composed.layers):
        layer.expert_layers = [own_layer(e, n, over, x.name) for e, x in zip(experts, spec.experts)]
        layer.router = None
    r = spec.router
    composed.mixture_routing = MixtureRouting(
        kind=r.kind, attention=r.attention, top_k=composed.top_k,
        temperature=r.inverse_temperature, base=base, experts=experts, min_margin=r.min_margin,
        offsets=torch.tensor([r.offsets.get(e.name, 0.0) for e in spec.experts]) if r.offsets else None,
        score=getattr(r, "score", "inverse_perplexity"),
    )


def own_layer(expert: Checkpoint, n: int, over: Checkpoint | None = None, name: str = "") -> Layer:
    """Decoder layer n of `expert` as a dense Layer of the pool's tensors (a LoRA expert's as
    factors over the base: no copy either way). `over`: the base whose FFN the expert's must be
    (its own or LoRA factors over it); a dense FFN of the expert's own is refused, naming it."""
    t, w, p = expert.stored, expert.weight, f"model.layers.{n}."
    attn = Attention(
        *(w(p + f"self_attn.{x}_proj.weight") for x in "qkvo"),
        *(t.get(p + f"self_attn.{x}_proj.bias") for x in "qkv"),
    )
    keys = [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    ffn = ExpertFFN(*(expert.factored_over(over.stored, keys, name) if over is not None else map(w, keys)))
    return Layer(t[p + "input_layernorm.weight"], attn, t[p + "post_attention_layernorm.weight"], [ffn])
