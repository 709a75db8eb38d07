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
    from mergeserve.experts import Checkpoint


@dataclass(eq=False)
class LowRank:
    """A weight kept as its factors: base + scale * b @ a (a LoRA expert's projection).

    `base` is the pool's shared tensor; only the factors belong to the expert. `dense()`
    materialises the sum for whoever needs it (merges, export) and is never kept resident.
    """

    base: torch.Tensor  # [out, in]
    a: torch.Tensor  # [r, in]; may be stored in another dtype than base (adapters ship bf16)
    b: torch.Tensor  # [out, r]
    scale: float = 1.0  # LoRA's alpha / r (alpha / sqrt(r) for rsLoRA)

    @property
    def shape(self) -> torch.Size:
        return self.base.shape

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def scaled_b(self, dtype: torch.dtype) -> torch.Tensor:
        """scale * b in `dtype` (the scaling folded in at the compute precision)."""
        return self.b.to(dtype) * self.scale

    def dense(self) -> torch.Tensor:
        return torch.addmm(self.base, self.scaled_b(self.base.dtype), self.a.to(self.base.dtype))


# A projection weight: a plain tensor, or a shared base tensor plus low-rank factors.
Weight = torch.Tensor | LowRank


def dense(w: Weight) -> torch.Tensor:
    """The weight as one tensor (a new one for LowRank)."""
    return w.dense() if isinstance(w, LowRank) else w


def weight_tensors(w: Weight) -> list[torch.Tensor]:
    return [w.base, w.a, w.b] if isinstance(w, LowRank) else [w]


def row_blocks(ws: list[torch.Tensor], copy: bool = True) -> torch.Tensor | None:
    """The tensors stacked by rows, [sum of rows, in]: a view when they already lie back to
    back in one storage (the pool loads q/k/v and gate/up that way), else a new tensor
    (or None when `copy` is False)."""
    first, offset = ws[0], ws[0].storage_offset()
    for w in ws:
        if not (w.is_contiguous() and w.dtype == first.dtype and w.shape[1:] == first.shape[1:]
                and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                and w.storage_offset() == offset):
            return torch.cat(ws) if copy else None
        offset += w.numel()
    rows = sum(w.shape[0] for w in ws)
    return first.as_strided((rows, *first.shape[1:]), (first.stride(0), *first.stride()[1:]), first.storage_offset())


def fuse(ws: list[Weight], copy: bool = False) -> Weight | None:
    """One weight computing every w of `ws` side by side (their outputs concatenated); where
    they do not lie back to back, a copy (`copy`) or None.

    Low-rank parts fuse too: base rows stacked, A stacked, B block-diagonal, so one
    x @ A^T serves every projection. A plain tensor among them has rank 0.
    """
    if all(not isinstance(w, LowRank) for w in ws):
        return row_blocks(ws, copy)
    bases = row_blocks([w.base if isinstance(w, LowRank) else w for w in ws], copy)
    if bases is None:
        return None
    dtype = next(w.a.dtype for w in ws if isinstance(w, LowRank))  # the factors keep their precision
    a = [w.a.to(dtype) if isinstance(w, LowRank) else w.new_zeros(0, w.shape[1], dtype=dtype) for w in ws]
    b = [w.scaled_b(dtype) if isinstance(w, LowRank) else w.new_zeros(w.shape[0], 0, dtype=dtype) for w in ws]
    return LowRank(bases, torch.cat(a), torch.block_diag(*b))


def fuse_in_place(ws: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same tensors as views of one row-stacked buffer, so that `fuse` later costs no copy."""
    return list(row_blocks(ws).split([w.shape[0] for w in ws]))


@dataclass(eq=False)
class ExpertFFN:
    gate_proj: Weight  # [I, D]
    up_proj: Weight  # [I, D]
    down_proj: Weight  # [D, I]


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
class SequenceRouting:
    """MergeME sequence-level routing, as data: one alpha [E] per request, chosen from its prompt.

    The engine owns the scoring (engine/sequence_router.py); each layer's `expert_layers`
    hold what separate attention runs.
    """

    kind: str  # "perplexity" | "task_vector"
    attention: str  # "separate" | "merged"
    top_k: int
    temperature: float  # multiplies the scores before the softmax
    base: Checkpoint  # the pool's own; task_vector differentiates the base model
    experts: list[Checkpoint]  # the pool's own, in expert order

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
    sequence_routing: SequenceRouting | None = None
    # Sources the composition was built from (base first; a learned router checks its base against it).
    sources: list[str] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return len(self.layers[0].experts)

    def tensors(self) -> list[torch.Tensor]:
        out = [self.embed, self.norm, self.lm_head]
        for layer in self.layers:
            out += [layer.input_norm, layer.post_attn_norm]
            out += [t for w in vars(layer.attn).values() if w is not None for t in weight_tensors(w)]
            out += [t for e in layer.experts for w in (e.gate_proj, e.up_proj, e.down_proj) for t in weight_tensors(w)]
            for a in layer.attn_experts or []:
                out += [t for w in vars(a).values() if w is not None for t in weight_tensors(w)]
            out += [r for r in (layer.router, layer.attn_router) if r is not None]
        return out
