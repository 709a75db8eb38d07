"""Export a token-routed MoE of LoRA experts for mergeserve's vLLM plugin (vllm_plugin/): the base, the
experts' factors and the routers, with no dense expert copy.

The checkpoint is the base's own Llama/Mistral layout with, per layer, `mlp.router` [E, D] and
the stacked factors of vllm_plugin/lora_moe.py (`mlp.gate_a` [E, r, D], `mlp.gate_b` [E, I, r], ...;
each expert's LoRA scale folded into its B, ranks zero-padded to the largest). The shared
attention (BTX: the experts' average) is materialised into q/k/v/o, so it costs nothing over the
base. config.json names the plugin's architecture and adds `num_local_experts`,
`num_experts_per_tok` and `moe_lora_rank`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from mergeserve.composition import ComposedModel
from mergeserve.engine.tables import FFN, BaseWeights, NotLowRank, base_of
from mergeserve.export.hf import DEFAULT_SHARD_BYTES, is_tied, parse_dtype, shared_tensors, write_checkpoint
from mergeserve.vllm_plugin import ARCHITECTURE
from mergeserve.weights import LowRank, Weight

FAMILIES = ("llama", "mistral")  # what vLLM's Llama layers (the plugin's) run as they are


class NotLoraMoE(ValueError):
    """The composition is not a token-routed MoE of LoRA experts the plugin serves; the message says why."""


def lora_moe_tensors(composed: ComposedModel) -> dict[str, Weight]:
    """Every tensor of the plugin's checkpoint by name (attention as merged weights, materialised
    when written). Raises NotLoraMoE."""
    base = _checked_base(composed)
    tensors = shared_tensors(composed, is_tied(composed))
    rank = max(w.rank for layer in composed.layers for e in layer.experts for w in vars(e).values() if isinstance(w, LowRank))
    for i, (layer, under) in enumerate(zip(composed.layers, base.layers)):
        p = f"model.layers.{i}.mlp."
        for proj in FFN:
            tensors[p + f"{proj}.weight"] = getattr(under.experts[0], proj)
        tensors[p + "router"] = layer.router.float()
        for proj, name in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            a, b = zip(*(_factors(getattr(e, proj), rank) for e in layer.experts))
            tensors[p + f"{name}_a"], tensors[p + f"{name}_b"] = torch.stack(a), torch.stack(b)
    return tensors


def export_lora_moe(
    composed: ComposedModel, out_dir: str | Path, dtype: str | torch.dtype = "float32",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write the plugin's checkpoint of `composed` (NotLoraMoE where the plugin cannot serve it)."""
    tensors = lora_moe_tensors(composed)
    config = copy.deepcopy(composed.config)
    config.architectures = [ARCHITECTURE]
    config.tie_word_embeddings = is_tied(composed)
    config.num_local_experts = composed.num_experts
    config.num_experts_per_tok = composed.top_k
    config.moe_lora_rank = tensors["model.layers.0.mlp.gate_a"].shape[1]
    return write_checkpoint(out_dir, config, tensors, composed, parse_dtype(dtype), max_shard_bytes)


def _checked_base(composed: ComposedModel) -> BaseWeights:
    """The base under `composed`'s experts (engine/tables.base_of); NotLoraMoE naming why the plugin
    cannot serve it."""
    why = None
    if composed.config.model_type not in FAMILIES:
        why = f"its base is {composed.config.model_type}; the plugin runs {', '.join(FAMILIES)} bases"
    elif composed.mixture_routing is not None:
        why = "it routes whole requests (a mixture router), which vLLM cannot run per request"
    elif composed.router_subspace:
        why = "its router scores subspaces (arrow, SMILE); the plugin runs plain router rows"
    elif any(layer.attn_experts for layer in composed.layers):
        why = "its attention is routed per token, which the plugin does not run yet; serve it in mergeserve"
    elif not all(layer.is_moe for layer in composed.layers):
        why = "not every layer is an MoE"
    elif any(isinstance(w, LowRank) and w.terms is not None for layer in composed.layers for e in layer.experts
             for w in vars(e).values()):
        why = "an expert is itself a merge of adapters"
    else:
        try:
            return base_of(composed)
        except NotLowRank as e:
            why = f"its experts are not LoRA factors over one base FFN (dense experts: the Mixtral export): {e}"
    raise NotLoraMoE(f"composition {composed.name!r} is not a LoRA-expert MoE the vLLM plugin serves: {why}")


def _factors(w: Weight, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, in], scale * B [out, rank]) in fp32, zero-padded; zeros for the base itself."""
    out, inp = w.shape
    if not isinstance(w, LowRank):
        return torch.zeros(rank, inp), torch.zeros(out, rank)
    return F.pad(w.a.float(), (0, 0, 0, rank - w.rank)), F.pad(w.scaled_b(torch.float32), (0, rank - w.rank))
