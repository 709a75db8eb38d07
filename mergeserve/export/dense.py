"""Export a dense (one-expert) composition in its base's own architecture (Llama, Mistral, Qwen2)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from mergeserve.composition import ComposedModel
from mergeserve.export.hf import DEFAULT_SHARD_BYTES, is_tied, parse_dtype, shared_tensors, write_checkpoint


def export_dense(
    composed: ComposedModel, out_dir: str | Path, dtype: str | torch.dtype = "float32",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a composition whose every layer has one FFN as a checkpoint of its base's model_type.

    Attention biases are kept, so Qwen2 bases export too. Raises ValueError for MoE layers.
    """
    moe = [n for n, layer in enumerate(composed.layers) if layer.is_moe]
    if moe:
        raise ValueError(f"composition {composed.name!r}: layers {moe} are MoE; export it with export_mixtral")
    tied = is_tied(composed)
    config = copy.deepcopy(composed.config)
    config.tie_word_embeddings = tied
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    tensors = shared_tensors(composed, tied, biases=True)
    for n, layer in enumerate(composed.layers):
        ffn, p = layer.experts[0], f"model.layers.{n}.mlp."
        tensors |= {p + "gate_proj.weight": ffn.gate_proj, p + "up_proj.weight": ffn.up_proj, p + "down_proj.weight": ffn.down_proj}
    return write_checkpoint(out_dir, config, tensors, composed, parse_dtype(dtype), max_shard_bytes)
