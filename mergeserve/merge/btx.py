"""BTX: expert FFNs stay separate, everything else is averaged, a top-k router per layer.

The experts' FFN tensors enter the composition as the pool's own tensors (no copy);
only shared layers that differ between experts become new, averaged tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from mergeserve.composition import Attention, ComposedModel, Layer

from mergeserve.weights import ExpertFFN, fuse_in_place

from mergeserve.experts import Checkpoint, CheckpointError, ExpertPool
from mergeserve.experts.peft_adapter import names_base
from mergeserve.kernels.capability import resolve_dtype
from mergeserve.merge.average import mean
from mergeserve.spec import CompositionSpec

log = logging.getLogger(__name__)

# Merges one named tensor across the experts (the key is the Hugging Face tensor name).
MergeFn = Callable[[str], torch.Tensor]


def build(spec: CompositionSpec, pool: ExpertPool) -> ComposedModel:
    base, experts = load_experts(spec, pool)
    return build_moe(spec, base, experts, lambda key: mean([e.weight(key) for e in experts]))


def build_moe(spec: CompositionSpec, base: Checkpoint, experts: list[Checkpoint], shared: MergeFn) -> ComposedModel:
    """The MoE both BTX and MergeME build: `shared` merges the non-FFN tensors. Its routers are
    the builder's next step (router.init_router)."""
    names = [e.name for e in spec.experts]
    composed = compose(spec.name, base, experts, names, spec.router.top_k, shared, routed_attention=spec.router.keeps_attention_deltas)
    composed.sources = [spec.base] + [e.source for e in spec.experts]
    return composed


def checkpoints(spec: CompositionSpec, pool: ExpertPool) -> tuple[Checkpoint, list[Checkpoint]]:
    """The spec's base and experts as the pool holds them: loaded once, the same objects at every call."""
    base = pool.get(spec.base, dtype=_dtype(spec))
    if base.tokenizer is None:
        raise CheckpointError(f"{base.source}: the base has no tokenizer files")
    return base, [pool.get_expert(e.source, e.base or spec.base, _dtype(spec)) for e in spec.experts]


def load_experts(spec: CompositionSpec, pool: ExpertPool) -> tuple[Checkpoint, list[Checkpoint]]:
    """`checkpoints`, each adapter checked against the base it names."""
    base, experts = checkpoints(spec, pool)
    for e, loaded in zip(spec.experts, experts):
        check_declared_base(loaded, e.name, pool.get(e.base, dtype=_dtype(spec)) if e.base else base, spec.strict_base)
    return base, experts


def _dtype(spec: CompositionSpec) -> torch.dtype | None:
    return resolve_dtype(spec.dtype) if spec.dtype else None  # None: the pool's


def check_declared_base(expert: Checkpoint, name: str, base: Checkpoint, strict: bool) -> None:
    """An adapter trained on another base fits any base of the same shapes, so shapes prove nothing:
    compare the base it names. A mismatch is logged, or refused with `strict_base: true`."""
    if expert.declared_base is None or names_base(expert.declared_base, base):
        return
    message = (f"expert {name!r} ({expert.source}): its adapter_config.json names the base "
               f"{expert.declared_base!r}, the composition applies it to {base.source}")
    if strict:
        raise CheckpointError(message + " (strict_base: true)")
    log.warning("%s; set strict_base: true to refuse such adapters", message)


def compose(
    name: str, base: Checkpoint, experts: list[Checkpoint], names: list[str], top_k: int, shared: MergeFn,
    routed_attention: bool = False,
) -> ComposedModel:
    """Merge the shared layers of `experts` with `shared`, keep their FFNs; routers are left empty.

    routed_attention: each layer's attention is the base's own, and every expert's attention
    its low-rank deltas over it (router.attention: routed or dynamic), instead of one merged attention.
    """
    def optional(key: str):
        return shared(key) if key in base.tensors else None

    layers = []
    for n in range(base.config.num_hidden_layers):
        p = f"model.layers.{n}."
        merged = base.stored.get if routed_attention else optional  # routed: the base's own attention
        q, k, v = fuse_in_place([merged(p + f"self_attn.{x}_proj.weight") for x in "qkv"])  # one qkv matmul, no copy
        attn = Attention(q, k, v, merged(p + "self_attn.o_proj.weight"), *(merged(p + f"self_attn.{x}_proj.bias") for x in "qkv"))
        # The pool's own tensors, or a LoRA expert's factors over the base: never a dense copy.
        ffns = [ExpertFFN(*(e.weight(p + f"mlp.{x}_proj.weight") for x in ("gate", "up", "down"))) for e in experts]
        layer = Layer(shared(p + "input_layernorm.weight"), attn, shared(p + "post_attention_layernorm.weight"), ffns)
        if routed_attention:
            layer.attn_experts = [expert_attention(e, x, p + "self_attn.", base.stored) for e, x in zip(experts, names)]
        layers.append(layer)
    embed = shared("model.embed_tokens.weight")
    lm_head = embed if base.config.tie_word_embeddings else shared("lm_head.weight")
    return ComposedModel(
        name=name, config=base.config, tokenizer=base.tokenizer, embed=embed, norm=shared("model.norm.weight"),
        lm_head=lm_head, layers=layers, expert_names=names, top_k=min(top_k, len(experts)),
    )


def expert_attention(expert: Checkpoint, name: str, prefix: str, base: dict[str, torch.Tensor]) -> Attention:
    """The expert's q/k/v/o as the base's tensors or LoRA factors over them."""
    for x in "qkv":
        if (bias := expert.stored.get(prefix + f"{x}_proj.bias")) is not None and bias.data_ptr() != base[prefix + f"{x}_proj.bias"].data_ptr():
            raise CheckpointError(f"expert {name!r} ({expert.source}): router.attention=routed/dynamic cannot mix its own {x}_proj bias")
    return Attention(*expert.factored_over(base, [prefix + f"{x}_proj.weight" for x in "qkvo"], name))
