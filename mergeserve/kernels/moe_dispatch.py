"""Torch reference MoE dispatch ("align tokens by expert, grouped matmul, weighted sum").

The Python loop runs over experts, never over tokens: each expert sees one
contiguous block of the tokens routed to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergeserve.merge.composed import ExpertFFN


def route(
    x: torch.Tensor, router: torch.Tensor, top_k: int, bias: torch.Tensor | None = None, absolute: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax over all experts, keep the top k, renormalise.

    x [T, D], router [E, D], bias [T, E] or None (added to the logits; -inf bans an expert).
    absolute: logits are |x · row| (ComposedModel.router_abs), taken before the bias.
    Returns weights [T, k] and expert ids [T, k].
    """
    logits = F.linear(x, router)  # [T, E]
    if absolute:
        logits = logits.abs()
    if bias is not None:
        logits = logits + bias
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    return weights / weights.sum(dim=-1, keepdim=True), ids


def expert_mlp(x: torch.Tensor, e: ExpertFFN) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, e.gate_proj)) * F.linear(x, e.up_proj), e.down_proj)


def moe_ffn(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: list[ExpertFFN],
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D], weights/ids [T, k] -> output [T, D] and tokens per expert [E].

    A pick of weight 0 runs nothing and is not counted: top-k fills its slots with
    experts a request excluded (or a row of a sequence router with fewer choices).
    """
    k, n_experts = ids.shape[1], len(experts)
    w = weights.reshape(-1)  # [T*k]
    flat = ids.reshape(-1).masked_fill(w == 0, n_experts)  # [T*k]; weight 0 -> past the last expert
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert, the weight-0 ones last
    counts = torch.bincount(flat, minlength=n_experts + 1)[:n_experts]  # [E]
    sizes = counts.tolist()
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
    return torch.zeros_like(x).index_add_(0, token, out), counts
