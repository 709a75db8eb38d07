"""Torch reference MoE dispatch ("align tokens by expert, grouped matmul, weighted sum").

The Python loop runs over experts, never over tokens: each expert sees one
contiguous block of the tokens routed to it. This is the path for dense experts (full
fine-tunes); LoRA experts over one base run in lora_moe.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mergeserve.weights import ExpertFFN, Weight, fuse

from mergeserve.kernels.lowrank import Pack, linear, packed, prepared
from mergeserve.kernels.packed import Packed


@dataclass(eq=False)
class FusedFFN:
    """An FFN as the engine runs it: gate and up as one [2I, D] matmul where they can be."""

    gate_up: Weight | Packed | None  # None: gate and up do not lie back to back; run them apart
    gate: Weight | Packed
    up: Weight | Packed
    down: Weight | Packed

    @classmethod
    def of(cls, e: ExpertFFN, pack: Pack | None = None) -> FusedFFN:
        gate, up, down = (prepared(w) for w in (e.gate_proj, e.up_proj, e.down_proj))
        gate_up = fuse([gate, up])
        if gate_up is not None:  # run fused: the separate views are never used
            return cls(packed(gate_up, pack), gate, up, packed(down, pack))
        return cls(None, packed(gate, pack), packed(up, pack), packed(down, pack))


def router_logits(x: torch.Tensor, router: torch.Tensor, subspace: int = 0) -> torch.Tensor:
    """x [T, D] -> [T, E]: x · row for router [E, D] (subspace 0); with subspace k, router
    [E * k, D] holds k rows per expert and the logit is the norm of x's projection on them,
    ||x · rows_e|| (ComposedModel.router_subspace; k = 1 is |x · row|)."""
    logits = F.linear(x.to(router.dtype), router)  # at the router's precision (fp32)
    if subspace == 0:
        return logits
    return logits.view(*logits.shape[:-1], -1, subspace).norm(dim=-1)


def top_k_experts(
    x: torch.Tensor, router: torch.Tensor, top_k: int, bias: torch.Tensor | None = None, subspace: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax over all experts, keep the top k, renormalise.

    x [T, D], router [E, D] (or [E * subspace, D], see router_logits), bias [T, E] or None
    (added to the logits; -inf bans an expert). Returns weights [T, k] and expert ids [T, k].
    """
    logits = router_logits(x, router, subspace)  # [T, E]
    if bias is not None:
        logits = logits + bias
    top, ids = torch.topk(logits, top_k, dim=-1)  # [T, k]
    # softmax over all, top k, renormalise == softmax over the top k logits (two ops fewer per layer)
    return torch.softmax(top, dim=-1), ids


def expert_mlp(x: torch.Tensor, e: FusedFFN) -> torch.Tensor:
    if e.gate_up is not None:
        g, u = linear(x, e.gate_up).chunk(2, dim=-1)
    else:
        g, u = linear(x, e.gate), linear(x, e.up)
    return linear(F.silu(g) * u, e.down)


def moe_ffn(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: list[FusedFFN]) -> torch.Tensor:
    """x [T, D], weights/ids [T, k] -> output [T, D].

    A pick of weight 0 runs nothing: top-k fills its slots with experts a request
    excluded (or a row of a mixture router with fewer choices), and a composition
    mixing LoRA and dense experts sends the LoRA picks elsewhere with weight 0 here.
    """
    k, n_experts = ids.shape[1], len(experts)
    w = weights.reshape(-1)  # [T*k]
    flat = ids.reshape(-1).masked_fill(w == 0, n_experts)  # [T*k]; weight 0 -> past the last expert
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert, the weight-0 ones last
    sizes = torch.bincount(flat, minlength=n_experts + 1)[:n_experts].tolist()  # the one host sync
    live = order[: sum(sizes)]  # [A] the assignments that run
    token = live // k  # [A] token of each grouped assignment
    xs = x.index_select(0, token)  # [A, D]
    out = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(sizes):
        if n:
            out[start:start + n] = expert_mlp(xs[start:start + n], experts[e])
            start += n
    out.mul_(w[live].unsqueeze(1))
    return torch.zeros_like(x).index_add_(0, token, out)

