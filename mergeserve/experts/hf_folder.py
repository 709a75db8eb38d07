"""Dense Hugging Face checkpoint folders (config.json + *.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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


def check_config_file(folder: Path, weights: list[Path]) -> None:
    """config.json as written, before transformers reads it: a supported model type, and no more
    layers than the weight files hold (read from their headers). Qwen2's config builds a list
    entry per layer, so a count of a billion would cost memory and minutes before any other check."""
    source = f"{folder}/config.json"
    try:
        raw = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: not a JSON object")
    check_model_type(source, raw.get("model_type"))
    held: set[str] = set()
    for f in weights:
        try:
            with safe_open(str(f), "pt") as part:
                held |= {k.split(".")[2] for k in part.keys() if k.startswith("model.layers.")}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file: {e}") from e
    if not isinstance(layers := raw.get("num_hidden_layers"), int) or layers > len(held):
        raise CheckpointError(f"{source}: num_hidden_layers={layers!r}, but the weights hold {len(held)} layers")


def load_hf_folder(folder: Path) -> Checkpoint:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    weights = sorted(folder.glob("*.safetensors"))
    refuse_pickles(folder, weights)
    check_config_file(folder, weights)
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{folder}/config.json: {e}") from e
    tensors = load_safetensors(weights)
    if "lm_head.weight" not in tensors and config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    check_tensors(str(folder), config, tensors)
    fuse_projections(tensors, config)
    return Checkpoint(str(folder), "hf", config, tensors, load_tokenizer(folder))
