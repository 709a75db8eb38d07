"""The in-memory composition: plain tensors, no compute.

Every tensor here is either a view of a tensor owned by the ExpertPool (expert FFNs,
shared layers that all sources hold in common) or a new tensor the merge made
(averaged shared layers, router rows). The engine wraps these tensors without copying;
the exporter writes them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from mergeserve.weights import ExpertFFN, Weight, weight_tensors

if TYPE_CHECKING:
    from mergeserve.experts import Checkpoint




@dataclass(eq=False)
class Attention:
    q_proj: Weight  # [H * Dh, D]
    k_proj: Weight  # [KVH * Dh, D]
    v_proj: Weight  # [KVH * Dh, D]
    o_proj: Weight  # [D, H * Dh]
    q_bias: torch.Tensor | None = None  # Qwen2 has q/k/v biases
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None


@dataclass(eq=False)
class Layer:
    input_norm: torch.Tensor  # [D]
    attn: Attention
    post_attn_norm: torch.Tensor  # [D]
    experts: list[ExpertFFN]  # one entry: a dense FFN
    router: torch.Tensor | None = None  # [E, D]; None for a dense layer
    # Sequence routing: each expert's own whole decoder layer (dense, the pool's tensors).
    expert_layers: list[Layer] | None = None
    # Routed attention (router.attention: routed): `attn` is the base's own, and each expert's
    # attention is low-rank deltas over it, mixed per token by `attn_router` [E, D].
    attn_experts: list[Attention] | None = None
    attn_router: torch.Tensor | None = None

    @property
    def is_moe(self) -> bool:
        return len(self.experts) > 1


@dataclass(eq=False)
class MixtureRouting:
    """MergeME sequence-level routing, as data: one alpha [E] per request, chosen from its prompt.

    The engine owns the scoring (engine/mixture_router.py); each layer's `expert_layers`
    hold what separate attention runs.
    """

    kind: str  # "perplexity" | "task_vector"
    attention: str  # "separate" | "merged"
    top_k: int
    temperature: float  # multiplies the scores before the softmax
    base: Checkpoint  # the pool's own; task_vector differentiates the base model
    experts: list[Checkpoint]  # the pool's own, in expert order
    min_margin: float = 0.0  # below this margin between the two best, every expert is mixed (spec.router)
    offsets: torch.Tensor | None = None  # [E] added to the scores (spec.router.offsets); None: none
    score: str = "inverse_perplexity"  # perplexity's scale: "inverse_perplexity" | "log_likelihood"

    @property
    def separate(self) -> bool:
        return self.attention == "separate"


@dataclass(eq=False)
class ComposedModel:
    name: str
    config: PretrainedConfig  # the base architecture's Hugging Face config
    tokenizer: PreTrainedTokenizerBase
    embed: torch.Tensor  # [V, D]
    norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D]; the same tensor as `embed` when tied
    layers: list[Layer]
    expert_names: list[str]
    top_k: int = 2
    # 0: router logits are x · row. k >= 1: each expert has k router rows (singular vectors of its
    # delta, whose signs are arbitrary) and its logit is the norm of x's projection on them
    # (arrow: k = 1, |x · v|; SMILE: k = router.subspace).
    router_subspace: int = 0
    # MergeME sequence-level routing: one alpha [E] per request from its prompt; no gate rows then.
    mixture_routing: MixtureRouting | None = None
    # Sources the composition was built from (base first; a learned router checks its base against it).
    sources: list[str] = field(default_factory=list)
    # dtype int8: the tensors are bf16, and the engine runs the full-size ones as int8 (kernels/int8.py).
    int8: bool = False
    # MergeME's heterogeneous merge (merge/hetero.py): `embed` and `lm_head` are shared by every
    # member, of width D_s; each member maps into its own width and back: x = embed[t] @ embed_proj
    # ([D_s, D]) and logits = (h @ head_proj) @ lm_head.T (head_proj [D, D_s]). None: no projection.
    embed_proj: torch.Tensor | None = None
    head_proj: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return len(self.layers[0].experts)

    def tensors(self) -> list[torch.Tensor]:
        out = [self.embed, self.norm, self.lm_head, *(p for p in (self.embed_proj, self.head_proj) if p is not None)]
        for layer in self.layers:
            out += [layer.input_norm, layer.post_attn_norm]
            out += [t for w in vars(layer.attn).values() if w is not None for t in weight_tensors(w)]
            out += [t for e in layer.experts for w in (e.gate_proj, e.up_proj, e.down_proj) for t in weight_tensors(w)]
            for a in layer.attn_experts or []:
                out += [t for w in vars(a).values() if w is not None for t in weight_tensors(w)]
            out += [r for r in (layer.router, layer.attn_router) if r is not None]
        return out
