"""Batched expert dispatch: pick each token's top-k experts, then run dense experts grouped by expert
(moe_dispatch.py) and LoRA experts over one base through the LoRA-expert kernel (lora_moe.py)."""

from mergeserve.kernels.lora_moe import LoraExperts, lora_moe_ffn
from mergeserve.kernels.lowrank import linear
from mergeserve.kernels.moe_dispatch import FusedFFN, expert_mlp, moe_ffn, router_logits, top_k_experts

__all__ = ["FusedFFN", "LoraExperts", "expert_mlp", "linear", "lora_moe_ffn", "moe_ffn", "router_logits", "top_k_experts"]
