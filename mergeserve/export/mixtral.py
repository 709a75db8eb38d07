"""Export a composition as a Hugging Face Mixtral checkpoint (the per-expert hub layout).

transformers (which fuses the per-expert keys at load) and vLLM both load it. Mixtral's
router is softmax over all experts -> top-k -> renormalise, the same as the engine's, so
the exported model computes what the composition computes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import MixtralConfig, PretrainedConfig

from mergeserve.composition import ComposedModel
from mergeserve.experts.checkpoint import head_dim
from mergeserve.export.hf import DEFAULT_SHARD_BYTES, is_tied, parse_dtype, shared_tensors, write_checkpoint


def check_mixtral(composed: ComposedModel) -> None:
    """Raise ValueError naming what Mixtral cannot represent in `composed`."""
    config, name = composed.config, composed.name
    if composed.mixture_routing is not None:
        raise ValueError(
            f"composition {name!r}: router.kind={composed.mixture_routing.kind} routes once per request "
            f"(MergeME sequence routing, {composed.mixture_routing.attention} attention); a Mixtral checkpoint "
            "routes every token with a linear gate and cannot represent it; serve it with mergeserve instead"
        )
    if any(layer.attn_experts for layer in composed.layers):
        raise ValueError(
            f"composition {name!r}: router.attention=routed mixes the experts' attention per token; a Mixtral "
            "checkpoint has one shared attention per layer and cannot represent it; serve it with mergeserve instead"
        )
    if any(b is not None for layer in composed.layers for b in (layer.attn.q_bias, layer.attn.k_bias, layer.attn.v_bias)) \
            or getattr(config, "attention_bias", False):
        raise ValueError(
            f"composition {name!r}: its {config.model_type} base has q/k/v attention biases, which Mixtral "
            "cannot represent (Qwen2 bases); export of Qwen2-based compositions is not supported"
        )
    if getattr(config, "mlp_bias", False):
        raise ValueError(f"composition {name!r}: its base has MLP biases, which Mixtral cannot represent")
    if config.hidden_act != "silu":
        raise ValueError(f"composition {name!r}: hidden_act {config.hidden_act!r}, Mixtral experts use silu")
    dense = [n for n, layer in enumerate(composed.layers) if not layer.is_moe or layer.router is None]
    if dense:
        raise ValueError(
            f"composition {name!r}: layers {dense} are dense (one expert or no router); Mixtral needs every "
            "layer to be MoE. Export a fully dense composition with mergeserve.export.export_dense"
        )
    if composed.router_subspace:
        raise ValueError(
            f"composition {name!r}: its router scores experts by the norm of a projection (router.kind=arrow/smile), but Mixtral's "
            "gate is linear (x · row) and cannot represent it; serve it with mergeserve instead"
        )
    counts = {len(layer.experts) for layer in composed.layers}
    if len(counts) > 1:
        raise ValueError(f"composition {name!r}: layers have different expert counts {sorted(counts)}")
    if not 1 <= composed.top_k <= composed.num_experts:
        raise ValueError(f"composition {name!r}: top_k={composed.top_k} with {composed.num_experts} experts")


def mixtral_config(base: PretrainedConfig, num_experts: int, top_k: int, tied: bool) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=base.vocab_size, hidden_size=base.hidden_size, intermediate_size=base.intermediate_size,
        num_hidden_layers=base.num_hidden_layers, num_attention_heads=base.num_attention_heads,
        num_key_value_heads=base.num_key_value_heads, head_dim=head_dim(base), hidden_act="silu",
        max_position_embeddings=base.max_position_embeddings, rms_norm_eps=base.rms_norm_eps,
        rope_parameters=dict(base.rope_parameters), tie_word_embeddings=tied,
        bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id, pad_token_id=base.pad_token_id,
        sliding_window=getattr(base, "sliding_window", None),
        num_local_experts=num_experts, num_experts_per_tok=top_k,
        architectures=["MixtralForCausalLM"],
    )


def mixtral_tensors(composed: ComposedModel, tied: bool) -> dict[str, torch.Tensor]:
    tensors = shared_tensors(composed, tied)
    for n, layer in enumerate(composed.layers):
        p = f"model.layers.{n}.block_sparse_moe."
        tensors[p + "gate.weight"] = layer.router  # [E, D]
        for e, ffn in enumerate(layer.experts):
            tensors[p + f"experts.{e}.w1.weight"] = ffn.gate_proj  # [I, D]
            tensors[p + f"experts.{e}.w2.weight"] = ffn.down_proj  # [D, I]
            tensors[p + f"experts.{e}.w3.weight"] = ffn.up_proj  # [I, D]
    return tensors


def export_mixtral(
    composed: ComposedModel, out_dir: str | Path, dtype: str | torch.dtype = "float32",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write `composed` to `out_dir` as a Mixtral checkpoint; returns `out_dir`.

    Writes model*.safetensors (sharded above `max_shard_bytes`), config.json,
    generation_config.json and the tokenizer files. lm_head is left out, with
    tie_word_embeddings set, when it equals the embedding. Raises ValueError for what
    Mixtral cannot represent: attention or MLP biases (Qwen2 bases), dense layers and
    absolute-value routers (router.kind=arrow).
    A composition with one expert is a dense model: `export_dense` writes it in its
    base's own architecture, and `export_composition` picks between the two.
    """
    check_mixtral(composed)
    tied = is_tied(composed)
    config = mixtral_config(composed.config, composed.num_experts, composed.top_k, tied)
    return write_checkpoint(out_dir, config, mixtral_tensors(composed, tied), composed, parse_dtype(dtype), max_shard_bytes)
