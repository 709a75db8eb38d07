"""BTX: expert FFNs stay separate, everything else is averaged, a top-k router per layer.

The experts' FFN tensors enter the composition as the pool's own tensors (no copy);
only shared layers that differ between experts become new, averaged tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mergeserve.composition import Attention, ComposedModel, ExpertFFN, Layer, fuse_in_place
from mergeserve.experts import Checkpoint, CheckpointError, ExpertPool
from mergeserve.kernels.capability import resolve_dtype
from mergeserve.merge.average import mean
from mergeserve.router import init_router
from mergeserve.spec import CompositionSpec

# Merges one named tensor across the experts (the key is the Hugging Face tensor name).
MergeFn = Callable[[str], torch.Tensor]


def build(spec: CompositionSpec, pool: ExpertPool) -> ComposedModel:
    base, experts = load_experts(spec, pool)
    return build_moe(spec, base, experts, lambda key: mean([e.weight(key) for e in experts]))


def build_moe(spec: CompositionSpec, base: Checkpoint, experts: list[Checkpoint], shared: MergeFn) -> ComposedModel:
    """The MoE both BTX and MergeME build: `shared` merges the non-FFN tensors."""
    composed = compose(spec.name, base, experts, [e.name for e in spec.experts], spec.router.top_k, shared)
    composed.sources = [spec.base] + [e.source for e in spec.experts]
    init_router(composed, spec, base, experts)
    return composed


def load_experts(spec: CompositionSpec, pool: ExpertPool) -> tuple[Checkpoint, list[Checkpoint]]:
    dtype = resolve_dtype(spec.dtype) if spec.dtype else None  # None: the pool's
    base = pool.get(spec.base, dtype=dtype)
    if base.tokenizer is None:
        raise CheckpointError(f"{base.source}: the base has no tokenizer files")
    return base, [pool.get_expert(e.source, e.base or spec.base, dtype) for e in spec.experts]


def compose(
    name: str, base: Checkpoint, experts: list[Checkpoint], names: list[str], top_k: int, shared: MergeFn,
) -> ComposedModel:
    """Merge the shared layers of `experts` with `shared`, keep their FFNs; routers are left empty."""
    def optional(key: str):
        return shared(key) if key in base.tensors else None

    layers = []
    for n in range(base.config.num_hidden_layers):
        p = f"model.layers.{n}."
        q, k, v = fuse_in_place([shared(p + f"self_attn.{x}_proj.weight") for x in "qkv"])  # one qkv matmul, no copy
        attn = Attention(q, k, v, shared(p + "self_attn.o_proj.weight"), *(optional(p + f"self_attn.{x}_proj.bias") for x in "qkv"))
        # The pool's own tensors, or a LoRA expert's factors over the base: never a dense copy.
        ffns = [ExpertFFN(*(e.weight(p + f"mlp.{x}_proj.weight") for x in ("gate", "up", "down"))) for e in experts]
        layers.append(Layer(shared(p + "input_layernorm.weight"), attn, shared(p + "post_attention_layernorm.weight"), ffns))
    embed = shared("model.embed_tokens.weight")
    lm_head = embed if base.config.tie_word_embeddings else shared("lm_head.weight")
    return ComposedModel(
        name=name, config=base.config, tokenizer=base.tokenizer, embed=embed, norm=shared("model.norm.weight"),
        lm_head=lm_head, layers=layers, expert_names=names, top_k=min(top_k, len(experts)),
    )
