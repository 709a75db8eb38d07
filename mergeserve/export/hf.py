"""What every export writes: Hugging Face tensor names for the non-FFN layers, safetensors
shards written a bounded amount of memory at a time, config, generation config, tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, PretrainedConfig

from mergeserve.composition import ComposedModel

from mergeserve.weights import Weight, dense

DEFAULT_SHARD_BYTES = 1 << 30


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype) or resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype!r} is not one of float32, bfloat16, float16")
    return resolved


def write_safetensors(
    out_dir: Path, tensors: dict[str, Weight], dtype: torch.dtype,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """Save `tensors` (views allowed, storage may be shared; LoRA factors are made dense here)
    as model*.safetensors in `out_dir`.

    Only one shard is materialised at a time; more than one shard also writes the
    `model.safetensors.index.json` that transformers and vLLM read.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        nbytes = t.shape.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    for name, keys in zip(names, shards):
        # copy=True: pool tensors are shared between experts and safetensors refuses shared storage.
        part = {k: dense(tensors[k]).detach().to(dtype=dtype, copy=True).contiguous() for k in keys}
        save_file(part, str(out_dir / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(keys, name)
        del part
    if n > 1:
        total = sum(t.shape.numel() * dtype.itemsize for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / name for name in names]


def is_tied(composed: ComposedModel) -> bool:
    """Whether lm_head can be left out: the same tensor as (or equal to) the embedding."""
    return composed.lm_head is composed.embed or torch.equal(composed.lm_head, composed.embed)


def shared_tensors(composed: ComposedModel, tied: bool, biases: bool = False) -> dict[str, Weight]:
    """Embedding, final norm, head and per-layer attention and norms, by Hugging Face name."""
    out = {"model.embed_tokens.weight": composed.embed, "model.norm.weight": composed.norm}
    if not tied:
        out["lm_head.weight"] = composed.lm_head
    for n, layer in enumerate(composed.layers):
        p = f"model.layers.{n}."
        out[p + "input_layernorm.weight"] = layer.input_norm
        out[p + "post_attention_layernorm.weight"] = layer.post_attn_norm
        for proj in ("q", "k", "v", "o"):
            out[p + f"self_attn.{proj}_proj.weight"] = getattr(layer.attn, f"{proj}_proj")
            bias = getattr(layer.attn, f"{proj}_bias", None)
            if biases and bias is not None:
                out[p + f"self_attn.{proj}_proj.bias"] = bias
    return out


def write_checkpoint(
    out_dir: str | Path, config: PretrainedConfig, tensors: dict[str, torch.Tensor],
    composed: ComposedModel, dtype: torch.dtype, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
        stale.unlink()  # a previous export with another shard count would otherwise shadow this one
    config.dtype = dtype
    write_safetensors(out, tensors, dtype, max_shard_bytes)
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    if composed.tokenizer is not None:
        composed.tokenizer.save_pretrained(out)
    return out
