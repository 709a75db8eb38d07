"""Llama-family transformer (Llama, Mistral, Qwen2) with dense or MoE FFN layers.

The module wraps a ComposedModel's tensors without copying them. One forward takes a
rectangular batch [B, T]: a prefill chunk is B=1, a decode step is T=1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from mergeserve.engine.kv_cache import KVCache
from mergeserve.engine.sequence_layers import fixed_routing, separate_layer
from mergeserve.experts.checkpoint import head_dim
from mergeserve.kernels import expert_mlp, moe_ffn, route
from mergeserve.merge.composed import ComposedModel, Layer


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    sliding_window: int | None

    @classmethod
    def from_config(cls, config) -> ModelArgs:
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (silu only)")
        window = getattr(config, "sliding_window", None)
        if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None
        return cls(
            dim=config.hidden_size, n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads, head_dim=head_dim(config), eps=config.rms_norm_eps,
            sliding_window=window,
        )


@dataclass
class Batch:
    """Where the tokens of one forward sit: per row a cache slot and the positions of its tokens.

    Rows may be right-padded: row b holds lengths[b] real tokens, and its padding repeats
    the last real position (so it adds no keys) and writes its keys to the scratch slot.
    """

    tokens: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]
    slots: torch.Tensor | None  # [B]; None runs without a cache (whole sequences, causal)
    router_bias: torch.Tensor | None = None  # [real tokens, E] added to every MoE layer's router logits
    lengths: torch.Tensor | None = None  # [B]; None: no padding
    alpha: torch.Tensor | None = None  # [B, E] each row's expert weights under a sequence router

    @classmethod
    def right_padded(
        cls, sequences: list[list[int]], router_bias: torch.Tensor | None = None, alpha: torch.Tensor | None = None,
    ) -> Batch:
        """Whole sequences from position 0, padded on the right, for a forward without cache."""
        width = max(len(s) for s in sequences)
        tokens = torch.tensor([s + [0] * (width - len(s)) for s in sequences])  # [B, T]
        lengths = torch.tensor([len(s) for s in sequences])
        return cls(tokens, torch.arange(width).expand_as(tokens), None, router_bias, lengths, alpha)

    def real(self) -> torch.Tensor | None:
        """Which tokens are not padding, [B, T]; None when none are."""
        if self.lengths is None:
            return None
        return torch.arange(self.tokens.shape[1]) < self.lengths.unsqueeze(1)

    def write_slots(self, scratch: int) -> torch.Tensor:
        """Cache slot of every token, [B, T]: the row's own, or `scratch` for padding."""
        slots = self.slots.unsqueeze(1).expand_as(self.tokens)
        real = self.real()
        return slots if real is None else torch.where(real, slots, scratch)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Transformer(torch.nn.Module):
    def __init__(self, composed: ComposedModel, max_len: int):
        super().__init__()
        self.composed = composed
        self.args = ModelArgs.from_config(composed.config)
        self.top_k = composed.top_k
        # cos/sin for every position, computed once by transformers' rotary code (handles rope scaling).
        rotary = LlamaRotaryEmbedding(composed.config)
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(max_len).unsqueeze(0))
        self.cos, self.sin = cos[0], sin[0]  # [max_len, Dh]
        e = composed.num_experts
        # Router statistics: picks of each expert and the routing weight those picks carried.
        self.expert_load = torch.zeros(len(composed.layers), e, dtype=torch.int64)  # [L, E]
        self.expert_weight = torch.zeros(len(composed.layers), e, dtype=torch.float64)  # [L, E]
        # Separate attention: expert e's own layer i keeps its keys/values in cache layer i * E + e.
        seq = composed.sequence_router
        self.separate = seq is not None and seq.separate
        self.cache_layers = self.args.n_layers * (e if self.separate else 1)

    def forward(
        self, batch: Batch, cache: KVCache | None = None, capture: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [B, T, D].

        capture, when given, receives each MoE layer's router input [real tokens, D]
        (the post-attention, normalised state the router sees).
        """
        c = self.composed
        x = F.embedding(batch.tokens, c.embed)  # [B, T, D]
        cos, sin = self.cos[batch.positions].unsqueeze(1), self.sin[batch.positions].unsqueeze(1)  # [B, 1, T, Dh]
        mask = self._mask(batch)
        if c.sequence_router is not None and batch.alpha is None:
            raise ValueError(f"composition {c.name!r} routes per sequence: the batch needs alpha [B, E]")
        for i, layer in enumerate(c.layers):
            if self.separate:
                x = separate_layer(self, i, layer, x, cos, sin, mask, batch, cache)
                continue
            h = rms_norm(x, layer.input_norm, self.args.eps)
            x = x + self._attention(i, layer, h, cos, sin, mask, batch, cache)
            h = rms_norm(x, layer.post_attn_norm, self.args.eps)
            x = x + self._ffn(i, layer, h, batch, capture)
        return rms_norm(x, c.norm, self.args.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.composed.lm_head)

    def _mask(self, batch: Batch) -> torch.Tensor:
        """Boolean [B, 1, T, S]: query at position p sees keys at positions j <= p (within the window)."""
        keys = torch.arange(int(batch.positions.max()) + 1)  # [S]
        q = batch.positions.unsqueeze(-1)  # [B, T, 1]
        allowed = keys <= q
        if self.args.sliding_window:
            allowed &= keys > q - self.args.sliding_window
        return allowed.unsqueeze(1)

    def _attention(self, i: int, layer: Layer, x: torch.Tensor, cos, sin, mask, batch: Batch, cache: KVCache | None):
        a, args = layer.attn, self.args
        b, t, _ = x.shape
        q = F.linear(x, a.q_proj, a.q_bias).view(b, t, args.n_heads, args.head_dim).transpose(1, 2)
        k = F.linear(x, a.k_proj, a.k_bias).view(b, t, args.n_kv_heads, args.head_dim).transpose(1, 2)
        v = F.linear(x, a.v_proj, a.v_bias).view(b, t, args.n_kv_heads, args.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin  # [B, H, T, Dh]
        k = k * cos + rotate_half(k) * sin  # [B, KVH, T, Dh]
        if cache is not None:
            cache.write(i, batch.write_slots(cache.scratch_slot), batch.positions, k, v)
            k, v = cache.read(i, batch.slots, mask.shape[-1])  # [B, KVH, S, Dh]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # [B, H, T, Dh]
        return F.linear(out.transpose(1, 2).reshape(b, t, -1), a.o_proj)

    def _ffn(self, i: int, layer: Layer, x: torch.Tensor, batch: Batch, capture: list | None) -> torch.Tensor:
        if not layer.is_moe:
            return expert_mlp(x, layer.experts[0])
        flat = x.reshape(-1, x.shape[-1])  # [B*T, D]
        real = batch.real()
        if real is not None:  # padding is routed nowhere and costs no expert compute
            real = real.reshape(-1)
            flat = flat[real]  # [N, D]
        if capture is not None:
            capture.append(flat)
        if batch.alpha is None:
            weights, ids = route(flat, layer.router, self.top_k, batch.router_bias, self.composed.router_abs)
        else:
            weights, ids = fixed_routing(batch)
        out, counts = moe_ffn(flat, weights, ids, layer.experts)
        self.expert_load[i] += counts
        self.expert_weight[i].index_add_(0, ids.reshape(-1), weights.reshape(-1).double())
        if real is None:
            return out.view_as(x)
        return torch.zeros_like(x).view(-1, x.shape[-1]).index_put_((real,), out).view_as(x)
