"""Llama-family transformer (Llama, Mistral, Qwen2) with dense or MoE FFN layers.

The module wraps a ComposedModel's tensors without copying them: q/k/v and gate/up run as
one matmul each over the pool's back-to-back tensors, and MoE layers of LoRA experts over
one base run the LoRA-expert kernel. One forward takes a rectangular batch [B, T]: a
prefill chunk is B=1, a decode step is T=1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from mergeserve.composition import ComposedModel, Layer, LowRank, Weight, fuse
from mergeserve.engine.kv_cache import KVCache
from mergeserve.engine.layers import Batch, attention, rms_norm, signed_sin
from mergeserve.engine.sequence_layers import count_routing, fixed_routing, separate_layer
from mergeserve.experts.checkpoint import head_dim
from mergeserve.kernels import FusedFFN, LoraExperts, expert_mlp, linear, lora_moe_ffn, moe_ffn, route
from mergeserve.kernels.lowrank import Pack, packed, prepared
from mergeserve.kernels.packed import Packed
from mergeserve.kernels.routed_lowrank import MergedFFN, RoutedAttention

__all__ = ["Capture", "ModelArgs", "RunLayer", "Transformer"]


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    windows: tuple[int | None, ...]  # per layer: its sliding window, or None for full attention

    @classmethod
    def from_config(cls, config) -> ModelArgs:
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (silu only)")
        return cls(
            dim=config.hidden_size, n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads, head_dim=head_dim(config), eps=config.rms_norm_eps,
            windows=layer_windows(config),
        )

    @property
    def attn_shape(self) -> tuple[int, int, int]:
        return self.n_heads, self.n_kv_heads, self.head_dim


def layer_windows(config) -> tuple[int | None, ...]:
    """Each layer's sliding window. Qwen2 slides only with use_sliding_window, and only in the
    layers from max_window_layers on: transformers records that as config.layer_types; Mistral
    slides in every layer when it has a sliding_window."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return tuple(window if t == "sliding_attention" else None for t in types)
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None
    return (window,) * config.num_hidden_layers


@dataclass(eq=False)
class RunLayer:
    """A Layer as the forward runs it: fused projections, prepared factors, the LoRA-expert tables."""

    layer: Layer
    qkv: Weight | Packed
    qkv_bias: torch.Tensor | None
    o_proj: Weight | Packed
    ffns: list[FusedFFN]
    lora: LoraExperts | None  # the MoE's LoRA experts over one base FFN; None: all dense
    dense_experts: torch.Tensor | None  # [E] bool: experts on the grouped dense path (mixed compositions)
    input_norm: torch.Tensor  # [D] fp32: the residual stream is fp32 whatever the weights
    post_attn_norm: torch.Tensor  # [D] fp32
    attn_deltas: RoutedAttention | None = None  # routed attention: the experts' deltas over `qkv`/`o_proj`
    merged_ffn: MergedFFN | None = None  # per-request merging: the FFN merged from the experts' deltas

    @classmethod
    def of(cls, layer: Layer, pack: Pack | None = None, merge_per_request: bool = False) -> RunLayer:
        """`pack`: a WeightPacker for the full-size weights (None: run them as they are).
        merge_per_request: the experts' FFNs are merged per request (router.attention: dynamic)."""
        a = layer.attn
        # Builders lay q/k/v back to back, so this is a view; anything else is concatenated once.
        qkv = fuse([prepared(w) for w in (a.q_proj, a.k_proj, a.v_proj)], copy=True)
        bias = None if a.q_bias is None else torch.cat([a.q_bias, a.k_bias, a.v_bias])
        deltas = RoutedAttention.build(layer.attn_experts, a.o_proj.dtype, pack) if layer.attn_experts else None
        if merge_per_request:
            return cls(layer, packed(qkv, pack), bias, packed(prepared(a.o_proj), pack), [], None, None,
                       layer.input_norm.float(), layer.post_attn_norm.float(), deltas, MergedFFN.build(layer.experts, pack))
        lora = LoraExperts.build(layer.experts) if layer.is_moe else None
        if lora is not None and pack is not None:
            lora = lora.packed(pack)
        dense = None if lora is None or bool(lora.member.all()) else ~lora.member
        ffns = [FusedFFN.of(e, pack) for e in layer.experts] if lora is None or dense is not None else []
        return cls(
            layer, packed(qkv, pack), bias, packed(prepared(a.o_proj), pack), ffns, lora, dense,
            layer.input_norm.float(), layer.post_attn_norm.float(), deltas,
        )


@dataclass
class Capture:
    """States a forward hands out, per layer, in the lists that are not None."""

    ffn: list[torch.Tensor] | None = None  # each MoE layer's router input [real tokens, D] (post-attention, normed)
    attention: list[torch.Tensor] | None = None  # the attention router's input (input-normed), routed attention only
    layers: list[torch.Tensor] | None = None  # the residual stream after each layer, [B, T, D]


class Transformer(torch.nn.Module):
    def __init__(self, composed: ComposedModel, max_len: int, pack: Pack | None = None):
        """`pack`: packs the full-size weights for the decode path (a WeightPacker); None runs them as they are."""
        super().__init__()
        self.composed = composed
        self.args = ModelArgs.from_config(composed.config)
        self.top_k = composed.top_k
        # cos/sin for every position, computed once by transformers' rotary code (handles rope scaling).
        rotary = LlamaRotaryEmbedding(composed.config)
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(max_len).unsqueeze(0))
        self.cos, self.sin = cos[0], signed_sin(sin[0])  # [max_len, Dh], fp32 like attention; see layers.rope
        e = composed.num_experts
        # Router statistics: picks of each expert and the routing weight those picks carried.
        self.expert_load = torch.zeros(len(composed.layers), e, dtype=torch.int64)  # [L, E]
        self.expert_weight = torch.zeros(len(composed.layers), e, dtype=torch.float64)  # [L, E]
        self._picks: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # this forward's (layer, weights, ids)
        # Separate attention: expert e's own layer i keeps its keys/values in cache layer i * E + e.
        seq = composed.sequence_routing
        self.separate = seq is not None and seq.separate
        self.dynamic = seq is not None and seq.attention == "dynamic"  # every layer merged per request
        self.cache_layers = self.args.n_layers * (e if self.separate else 1)
        self.run_layers = [RunLayer.of(layer, pack, self.dynamic) for layer in composed.layers]
        self.expert_runs = [[RunLayer.of(x, pack) for x in layer.expert_layers] if layer.expert_layers else None
                            for layer in composed.layers]
        self.lm_head = packed(composed.lm_head, pack)
        self.norm = composed.norm.float()
        # [L, E], or [L, 2, E] for attention and FFN apart: every token merged with these expert weights
        # instead of its request's alpha (a dynamic composition only: what `mergeserve tune-merge` trains).
        self.merge_coefficients: torch.Tensor | None = None

    def held(self) -> list[torch.Tensor]:
        """Tensors the forward keeps beyond the composition's own (fused copies, stacked LoRA factors)."""
        return [self.cos, self.sin, *(t for w in self._run_weights() for t in run_tensors(w))]

    def packed(self) -> list[Packed]:
        """The packed copies this forward runs (shared with other engines over the same tensors)."""
        found: dict[int, Packed] = {}
        for w in self._run_weights():
            inner = w.base if isinstance(w, LowRank) else w
            if isinstance(inner, Packed):
                found[id(inner)] = inner
        return list(found.values())

    def _run_weights(self) -> list:
        runs = [*self.run_layers, *(r for rs in self.expert_runs if rs for r in rs)]
        ws = [self.lm_head]
        for run in runs:
            ws += [run.qkv, run.o_proj, *(w for f in run.ffns for w in (f.gate_up, f.gate, f.up, f.down) if w is not None)]
            if run.lora is not None:
                ws += list(vars(run.lora).values()) + (list(vars(run.lora.fused).values()) if run.lora.fused else [])
            if run.attn_deltas is not None:
                ws += [t for d in (run.attn_deltas.qkv, run.attn_deltas.o) if d is not None for t in (d.a, d.b)]
            if (m := run.merged_ffn) is not None:
                ws += [m.gate_up, m.down, *(t for d in (m.gate_up_deltas, m.down_deltas) if d is not None for t in (d.a, d.b))]
        return ws

    def forward(self, batch: Batch, cache: KVCache | None = None, capture: Capture | None = None) -> torch.Tensor:
        """Hidden states after the final norm, [B, T, D]; `capture` collects states on the way."""
        c = self.composed
        # The residual stream and norms run in fp32 (cheap, and exact enough to keep bf16 weights honest);
        # each linear takes its input in its weight's dtype.
        x = F.embedding(batch.tokens, c.embed).float()  # [B, T, D]
        cos, sin = self.cos[batch.positions].unsqueeze(1), self.sin[batch.positions].unsqueeze(1)  # [B, 1, T, Dh]
        masks = {w: batch.mask(w) for w in set(self.args.windows)}  # one mask per distinct window
        merged = self.merge_coefficients
        if c.sequence_routing is not None and batch.alpha is None and merged is None:
            raise ValueError(f"composition {c.name!r} routes per sequence: the batch needs alpha [B, E]")
        # Per-request merging: every token's gate over the experts is its row's alpha, [B * T, E].
        gate = batch.alpha.repeat_interleave(batch.tokens.shape[1], dim=0) if self.dynamic and merged is None else None
        for i, run in enumerate(self.run_layers):
            mask = masks[self.args.windows[i]]
            if self.separate:
                x = separate_layer(self, i, self.expert_runs[i], x, cos, sin, mask, batch, cache)
                continue
            ffn_gate = gate
            if merged is not None:  # one merge for every token, layer by layer ([L, E]) or module by module ([L, 2, E])
                rows = merged[i] if merged.dim() == 3 else merged[i].expand(2, -1)  # [2, E]: attention, FFN
                gate, ffn_gate = (r.expand(batch.tokens.numel(), -1) for r in rows)
            normed = rms_norm(x, run.input_norm, self.args.eps)
            x = x + self.attend(i, run, normed, cos, sin, mask, batch, cache, capture and capture.attention, gate)
            normed = rms_norm(x, run.post_attn_norm, self.args.eps)
            if run.merged_ffn is not None:
                if merged is None:
                    count_routing(self, i, batch)
                x = x + run.merged_ffn(normed.reshape(-1, normed.shape[-1]), ffn_gate).view_as(x)
            else:
                x = x + self._ffn(i, run, normed, batch, capture and capture.ffn)
            if capture is not None and capture.layers is not None:
                capture.layers.append(x)
        self._count_picks()
        return rms_norm(x, self.norm, self.args.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head).float()

    def attend(
        self, cache_layer: int, run: RunLayer, x: torch.Tensor, cos, sin, mask, batch: Batch, cache: KVCache | None,
        capture: list | None = None, gate: torch.Tensor | None = None,
    ):
        """gate: every token's weights over the experts' attention deltas [B * T, E]; None routes them
        with the layer's attention router (where the layer has deltas)."""
        routed = None
        if run.attn_deltas is not None:
            routed = (run.attn_deltas, gate if gate is not None else self._attention_gate(run, x, batch, capture))
        return attention(x, run.qkv, run.qkv_bias, run.o_proj, self.args.attn_shape, cos, sin, mask, batch, cache, cache_layer, routed)

    def _attention_gate(self, run: RunLayer, x: torch.Tensor, batch: Batch, capture: list | None) -> torch.Tensor:
        """Each token's routing weights over the experts' attention deltas, [B * T, E] (zero rows for padding)."""
        flat, real = self._real_tokens(x, batch)  # [N, D]
        if capture is not None:
            capture.append(flat)
        weights, ids = route(flat, run.layer.attn_router, self.top_k, batch.router_bias, self.composed.router_subspace)
        gate = flat.new_zeros(len(flat), self.composed.num_experts).scatter_(1, ids, weights)  # [N, E]
        if real is None:
            return gate
        return gate.new_zeros(real.numel(), gate.shape[1]).index_put_((real,), gate)

    @staticmethod
    def _real_tokens(x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The states of the real (not padding) tokens [N, D], and which of the B * T they are (None: all)."""
        flat = x.reshape(-1, x.shape[-1])  # [B*T, D]
        real = batch.real()
        if real is None:
            return flat, None
        real = real.reshape(-1)
        return flat[real], real

    def _ffn(self, i: int, run: RunLayer, x: torch.Tensor, batch: Batch, capture: list | None) -> torch.Tensor:
        layer = run.layer
        if not layer.is_moe:
            return expert_mlp(x, run.ffns[0])
        flat, real = self._real_tokens(x, batch)  # padding is routed nowhere and costs no expert compute
        if capture is not None:
            capture.append(flat)
        if batch.alpha is None:
            weights, ids = route(flat, layer.router, self.top_k, batch.router_bias, self.composed.router_subspace)
        else:
            weights, ids = fixed_routing(batch)
        self._picks.append((i, weights, ids))
        out = self._experts(run, flat, weights, ids)
        if real is None:
            return out.view_as(x)
        return torch.zeros_like(x).view(-1, x.shape[-1]).index_put_((real,), out.to(x.dtype)).view_as(x)

    def _experts(self, run: RunLayer, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The MoE FFN: LoRA experts through their kernel, dense ones grouped; a mix takes both."""
        if run.lora is None:
            return moe_ffn(x, weights, ids, run.ffns)
        if run.dense_experts is None:
            return lora_moe_ffn(x, weights, ids, run.lora)
        on_dense = run.dense_experts[ids]  # [N, k]
        return lora_moe_ffn(x, weights.masked_fill(on_dense, 0), ids, run.lora) \
            + moe_ffn(x, weights.masked_fill(~on_dense, 0), ids, run.ffns)

    def _count_picks(self) -> None:
        """The router statistics of this forward, added once for all layers."""
        if not self._picks:
            return
        n_experts = self.expert_load.shape[1]
        layers = torch.tensor([i for i, _, _ in self._picks])  # [L']
        ids = torch.stack([ids for _, _, ids in self._picks])  # [L', N, k]
        weights = torch.stack([w for _, w, _ in self._picks]).detach().double()  # [L', N, k]
        self._picks = []
        flat = (layers.view(-1, 1, 1) * n_experts + ids).reshape(-1)
        live = (weights.reshape(-1) > 0).double()  # weight-0 picks ran nothing and count nowhere
        size = self.expert_load.numel()
        self.expert_load.view(-1).add_(torch.bincount(flat, live, minlength=size).long())
        self.expert_weight.view(-1).add_(torch.bincount(flat, weights.reshape(-1), minlength=size))


def run_tensors(w) -> list[torch.Tensor]:
    """The plain tensors behind a run weight (a packed copy's source; see Transformer.packed)."""
    if isinstance(w, Packed):
        return [w.source]
    if isinstance(w, LowRank):
        return [*run_tensors(w.base), w.a, w.b]
    return [w] if isinstance(w, torch.Tensor) else []
