"""Forward pieces for mixture-routed compositions: per-row expert weights alpha [B, E], fixed per request.

separate attention: a layer's output is sum_e alpha_e * block_e(x), block_e expert e's own
decoder layer (norms, attention, FFN). Each expert runs once per layer on the sub-batch of
rows that chose it; its keys/values live in cache layer i * E + e (a "virtual layer"),
which only those rows write and read.
merged attention: the shared attention, then the MoE FFN with each row's alpha as the
routing weights of all its tokens.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mergeserve.engine.kv_cache import KVCache
from mergeserve.engine.layers import Batch, RunLayer, attention, rms_norm
from mergeserve.kernels import expert_mlp


def separate_layer(
    i: int, blocks: list[RunLayer], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    mask: torch.Tensor | None, batch: Batch, cache: KVCache | None, shape: tuple[int, int, int], eps: float,
) -> torch.Tensor:
    """Layer i: x [B, T, D] -> sum_e alpha[:, e] * block_e(x), [B, T, D]; padding rows' values are
    don't-care. blocks: each expert's own layer i (dense, no attention deltas); shape: attention's
    (heads, kv heads, head dim)."""
    alpha = batch.alpha  # [B, E]
    n_experts = alpha.shape[1]
    out = torch.zeros_like(x)
    for e, block in enumerate(blocks):
        rows = alpha[:, e].nonzero().squeeze(1)  # [b]
        if rows.numel() == 0:
            continue
        h = x[rows]  # [b, T, D]
        a = rms_norm(h, block.input_norm, eps)
        sub_mask = None if mask is None else mask[rows]
        h = h + attention(a, block.qkv, block.qkv_bias, block.o_proj, shape, cos[rows], sin[rows], sub_mask,
                          sub_batch(batch, rows), cache, i * n_experts + e)
        h = h + expert_mlp(rms_norm(h, block.post_attn_norm, eps), block.ffns[0])
        out.index_add_(0, rows, alpha[rows, e].view(-1, 1, 1) * h)
    return out


def sub_batch(batch: Batch, rows: torch.Tensor) -> Batch:
    """The rows `rows` of `batch`."""
    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[rows]

    return replace(
        batch, tokens=batch.tokens[rows], positions=batch.positions[rows], slots=pick(batch.slots),
        lengths=pick(batch.lengths), alpha=batch.alpha[rows], first_slot=None,
    )


def routing_counts(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's router statistics under alpha: each row's real tokens count once for every expert
    it chose. Picks [E] (int64) and the routing weight they carried [E] (float64)."""
    alpha = batch.alpha  # [B, E]
    tokens = batch.lengths if batch.lengths is not None else torch.full((alpha.shape[0],), batch.tokens.shape[1])
    return ((alpha > 0).long() * tokens.unsqueeze(1)).sum(0), (alpha.double() * tokens.unsqueeze(1)).sum(0)


def fixed_routing(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and expert ids of every real token, [N, k]: its row's nonzero alpha entries."""
    alpha = batch.alpha  # [B, E]
    # A compiled step's shapes cannot follow the data: there every expert is a pick, the unchosen at weight 0.
    k = alpha.shape[1] if batch.cache_operator else int((alpha > 0).sum(1).max())
    weights, ids = (batch.per_token(t) for t in torch.topk(alpha, k, dim=1))  # [B * T, k]
    real = batch.real()
    if real is None:
        return weights, ids
    return weights[real.view(-1)], ids[real.view(-1)]
