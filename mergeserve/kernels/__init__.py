"""Batched expert dispatch: route tokens, group them by expert, one matmul per expert group."""

from mergeserve.kernels.moe_dispatch import expert_mlp, moe_ffn, route

__all__ = ["expert_mlp", "moe_ffn", "route"]
