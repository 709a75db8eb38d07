"""Export a composition that is exactly one LoRA over its base as a PEFT adapter, and the base alone.

A single adapter, and a linear or task-arithmetic merge of adapters, are the base plus one fixed
low-rank delta per projection: sum_i c_i s_i B_i A_i = [c_1 s_1 B_1 | ... ] @ [A_1; ...], the
factors side by side (rank sum), exact. Scales and coefficients are folded into B, so the
adapter's scaling is 1 (lora_alpha = r). vLLM, peft and anything that loads PEFT folders serve it
over the base exported here, and many such adapters share that one base.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mergeserve.composition import ComposedModel
from mergeserve.engine.tables import ATTENTION, FFN, NotLowRank, base_of
from mergeserve.export.dense import export_dense
from mergeserve.export.hf import parse_dtype
from mergeserve.weights import LowRank, Weight

PREFIX = "base_model.model.model.layers"


class NotOneAdapter(ValueError):
    """The composition is not the base plus one fixed LoRA delta; the message says why."""


def adapter_factors(composed: ComposedModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every adapted projection's factors in fp32, by PEFT module name: A [R, in], B [out, R], all
    zero-padded to one rank R (the largest rank sum). Raises NotOneAdapter."""
    why = _not_one_adapter(composed)
    if why:
        raise NotOneAdapter(f"composition {composed.name!r} is not one LoRA over its base: {why}")
    found: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for i, layer in enumerate(composed.layers):
        parts = [("self_attn", p, getattr(layer.attn, p)) for p in ATTENTION]
        parts += [("mlp", p, getattr(layer.experts[0], p)) for p in FFN]
        for block, p, w in parts:
            if pairs := _factors(w):
                found[f"{PREFIX}.{i}.{block}.{p}"] = pairs
    if not found:
        raise NotOneAdapter(f"composition {composed.name!r} adapts no projection: it is the base itself")
    rank = max(sum(a.shape[0] for a, _ in pairs) for pairs in found.values())
    out = {}
    for name, pairs in found.items():
        a, b = torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs], dim=1)
        out[name] = F.pad(a, (0, 0, 0, rank - a.shape[0])), F.pad(b, (0, rank - b.shape[1]))
    return out


def adapter_rank(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    return next(iter(factors.values()))[0].shape[0]


def export_adapter(
    composed: ComposedModel, out_dir: str | Path, dtype: str | torch.dtype = "float32", max_rank: int | None = None,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Path:
    """Write `composed` as a PEFT LoRA folder (adapter_config.json, adapter_model.safetensors);
    `factors`: adapter_factors(composed) when already computed. Raises NotOneAdapter, or ValueError
    (nothing written) when its rank exceeds `max_rank`."""
    factors = adapter_factors(composed) if factors is None else factors
    rank = adapter_rank(factors)
    if max_rank is not None and rank > max_rank:
        raise ValueError(f"composition {composed.name!r} is a LoRA of rank {rank} (its adapters' ranks summed), "
                         f"more than max_lora_rank={max_rank} (the serve config's vllm_lora)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dt = parse_dtype(dtype)
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{name}.lora_A.weight"] = a.to(dt).contiguous()
        tensors[f"{name}.lora_B.weight"] = b.to(dt).contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    modules = sorted({name.rsplit(".", 1)[1] for name in factors})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": modules, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "base_model_name_or_path": composed.sources[0] if composed.sources else None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out


def export_base(composed: ComposedModel, out_dir: str | Path, dtype: str | torch.dtype = "float32") -> Path:
    """The base under a low-rank composition, alone, in its own architecture (NotLowRank otherwise)."""
    base = base_of(composed)
    alone = copy.copy(composed)
    alone.layers = base.layers
    alone.name = f"base of {composed.name}"
    return export_dense(alone, out_dir, dtype)


def _not_one_adapter(composed: ComposedModel) -> str | None:
    if any(layer.attn_experts for layer in composed.layers):
        return "its attention is routed per token"
    if moe := [i for i, layer in enumerate(composed.layers) if layer.is_moe]:
        return f"layers {moe[:4]}{'...' if len(moe) > 4 else ''} route tokens over experts (a LoRA-expert MoE)"
    if composed.mixture_routing is not None:
        return "it merges per request"
    try:
        base_of(composed)
    except NotLowRank as e:
        return str(e)
    return None


def _factors(w: Weight) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A [r, in], c * scale * B [out, r]) of each adapter in `w`, fp32; [] for the base itself."""
    if not isinstance(w, LowRank):
        return []
    if w.terms is None:
        return [(w.a.float(), w.scaled_b(torch.float32))]
    return [(a, b * c) for term, c in w.terms if term is not None and c != 0 for a, b in _factors(term)]
