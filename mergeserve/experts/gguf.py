"""GGUF files, dequantised to fp32 by transformers' GGUF loader."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeserve.experts.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_model_type,
    check_tensors,
    fuse_projections,
)
from mergeserve.experts.gguf_header import check_gguf


def load_gguf(path: Path, max_bytes: int | None = None) -> Checkpoint:
    """`max_bytes`: refuse a file whose tensors dequantise to more (float32)."""
    check_gguf(path, max_bytes)  # transformers allocates what the header says before it reads a tensor
    folder, name = str(path.parent), path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot load GGUF: {e}") from e
    config = model.config
    # The dequantised weights are plain fp32: drop the marker so the config saves and reloads as dense.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    check_model_type(str(path), config.model_type)
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    check_tensors(str(path), config, tensors)
    fuse_projections(tensors, config)
    return Checkpoint(str(path), "gguf", config, tensors, tokenizer)
