"""Dense Hugging Face checkpoint folders (config.json + *.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mergeserve.experts.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_model_type,
    check_tensors,
    fuse_projections,
    refuse_pickles,
)


def load_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file: {e}") from e
        tensors |= {k: v.to(torch.float32) for k, v in part.items()}
    return tensors


GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer the checkpoint ships. One saved as the generic class is loaded as such: its
    tokenizer.json is the whole truth, where AutoTokenizer would swap in the model type's own class
    and its pre-tokenizer (a Llama converted to Qwen2 would then tokenize the Qwen way)."""
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    config = folder / "tokenizer_config.json"
    declared = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if declared in GENERIC_TOKENIZERS and (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def load_hf_folder(folder: Path) -> Checkpoint:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{folder}/config.json: {e}") from e
    check_model_type(str(folder / "config.json"), config)
    weights = sorted(folder.glob("*.safetensors"))
    refuse_pickles(folder, weights)
    tensors = load_safetensors(weights)
    if "lm_head.weight" not in tensors and config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    check_tensors(str(folder), config, tensors)
    fuse_projections(tensors, config)
    return Checkpoint(str(folder), "hf", config, tensors, load_tokenizer(folder))
