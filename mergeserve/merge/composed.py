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

if TYPE_CHECKING:
    from mergeserve.router.sequence import SequenceRouter


@dataclass(eq=False)
class ExpertFFN:
    gate_proj: torch.Tensor  # [I, D]
    up_proj: torch.Tensor  # [I, D]
    down_proj: torch.Tensor  # [D, I]


@dataclass(eq=False)
class Attention:
    q_proj: torch.Tensor  # [H * Dh, D]
    k_proj: torch.Tensor  # [KVH * Dh, D]
    v_proj: torch.Tensor  # [KVH * Dh, D]
    o_proj: torch.Tensor  # [D, H * Dh]
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

    @property
    def is_moe(self) -> bool:
        return len(self.experts) > 1


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
    # Router logits are |x · row| instead of x · row (arrow: a singular vector's sign is arbitrary).
    router_abs: bool = False
    # MergeME sequence-level routing: one alpha [E] per request from its prompt; no gate rows then.
    sequence_router: SequenceRouter | None = None
    # Sources the composition was built from (base first; a learned router checks its base against it).
    sources: list[str] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return len(self.layers[0].experts)

    def tensors(self) -> list[torch.Tensor]:
        out = [self.embed, self.norm, self.lm_head]
        for layer in self.layers:
            out += [layer.input_norm, layer.post_attn_norm]
            out += [t for t in vars(layer.attn).values() if t is not None]
            out += [t for e in layer.experts for t in (e.gate_proj, e.up_proj, e.down_proj)]
            if layer.router is not None:
                out.append(layer.router)
        return out
