"""Llama-family transformer (Llama, Mistral, Qwen2) with dense or MoE FFN layers.

The module wraps a ComposedModel's tensors without copying them: q/k/v and gate/up run as
one matmul each over the pool's back-to-back tensors, and MoE layers of LoRA experts over
one base run the LoRA-expert kernel. One forward takes a rectangular batch [B, T]: a
prefill chunk is B=1, a decode step is T=1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from mergeserve.composition import ComposedModel

from mergeserve.weights import LowRank
from mergeserve.engine.kv_cache import KVCache
from mergeserve.engine.layers import Batch, RunLayer, attention, real_tokens, rms_norm, signed_sin
from mergeserve.engine.mixture_layers import fixed_routing, routing_counts, separate_layer
import mergeserve.engine.opaque_ops  # noqa: F401 - registers the operators a compiled step calls
from mergeserve.experts.checkpoint import head_dim
from mergeserve.kernels import expert_mlp, linear, lora_moe_ffn, moe_ffn, top_k_experts
from mergeserve.kernels.lowrank import Pack, packed
from mergeserve.kernels.packed import Packed

__all__ = ["Capture", "ModelArgs", "Transformer"]

Block = Callable[..., torch.Tensor]  # one decoder layer of a mode: see Transformer.block


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
        # The last counted forward's token routing: each real token's weight on each expert, summed
        # over the MoE layers, [N, E]; None without token routing (the engine: each response's experts).
        self.token_routing: torch.Tensor | None = None
        # False: the caller counts (count()) the real rows of each forward (a compiled step pads its batches).
        self.counts_in_forward = True
        self.eager_forwards = 0  # tells a compiled step that dynamo ran it eagerly (compiled.py)
        # A compiled copy's key of the eager model whose pieces it calls as opaque operators
        # (opaque_ops.py: dense experts, separate attention); None in the eager model.
        self.eager_key: int | None = None
        # Separate attention: expert e's own layer i keeps its keys/values in cache layer i * E + e.
        seq = composed.mixture_routing
        self.separate = seq is not None and seq.separate
        self.dynamic = seq is not None and seq.attention == "dynamic"  # every layer merged per request
        self.cache_layers = self.args.n_layers * (e if self.separate else 1)
        self.run_layers = [RunLayer.of(layer, pack, self.dynamic) for layer in composed.layers]
        self.expert_runs = [[RunLayer.of(x, pack) for x in layer.expert_layers] if layer.expert_layers else None
                            for layer in composed.layers]
        self.lm_head = packed(composed.lm_head, pack)
        self.norm = composed.norm.float()
        # The composition's decoder layer, chosen once: each expert's own layers (separate), every
        # layer merged per request (dynamic), or shared attention with routed experts.
        self.block: Block = self._separate_block if self.separate else self._dynamic_block if self.dynamic else self._shared_block

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
            if (m := run.dynamic_ffn) is not None:
                ws += [m.gate_up, m.down, *(t for d in (m.gate_up_deltas, m.down_deltas) if d is not None for t in (d.a, d.b))]
        return ws

    def forward(
        self, batch: Batch, cache: KVCache | None = None, capture: Capture | None = None, coefficients: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [B, T, D]; `capture` collects states on the way.
        `coefficients` [L, E], or [L, 2, E] for attention and FFN apart: every token merged with these
        expert weights instead of its request's alpha (a dynamic composition only: what `mergeserve
        tune-merge` trains)."""
        # The residual stream and norms run in fp32 (cheap, and exact enough to keep bf16 weights honest);
        # each linear takes its input in its weight's dtype.
        if not torch.compiler.is_compiling():  # traced away in a compiled graph: counts the forwards run eagerly
            self.eager_forwards += 1
        x = F.embedding(batch.tokens, self.composed.embed).float()  # [B, T, D] ([B, T, D_s] shared, then projected)
        if self.composed.embed_proj is not None:
            x = x @ self.composed.embed_proj.float()
        cos, sin = self.cos[batch.positions].unsqueeze(1), self.sin[batch.positions].unsqueeze(1)  # [B, 1, T, Dh]
        # one mask per distinct window (the cache operator masks for itself)
        masks = {w: None if batch.cache_operator else batch.mask(w) for w in set(self.args.windows)}
        self._check(batch, coefficients)
        block = self.block if coefficients is None else partial(self._coefficient_block, coefficients)
        for i, run in enumerate(self.run_layers):
            x = block(i, run, x, cos, sin, masks[self.args.windows[i]], batch, cache, capture)
            if capture is not None and capture.layers is not None:
                capture.layers.append(x)
        if self.counts_in_forward:
            self.count(batch, counts_alpha=coefficients is None)
        return rms_norm(x, self.norm, self.args.eps)

    def _check(self, batch: Batch, coefficients: torch.Tensor | None) -> None:
        c = self.composed
        if c.mixture_routing is not None and batch.alpha is None and coefficients is None:
            raise ValueError(f"composition {c.name!r} is mixture-routed (one expert mixture per request): the batch needs alpha [B, E]")
        if coefficients is not None and not self.dynamic:
            raise ValueError(f"composition {c.name!r}: merge coefficients need router.attention dynamic")

    # The blocks: decoder layer i of one mode, x [B, T, D] -> [B, T, D].
    def _shared_block(
        self, i: int, run: RunLayer, x: torch.Tensor, cos, sin, mask, batch: Batch, cache: KVCache | None,
        capture: Capture | None,
    ) -> torch.Tensor:
        """Token routing, or a mixture router with merged attention: the shared attention (with
        its experts' deltas routed per token where the layer has them), then the dense or MoE
        FFN (routed per token, or by each row's alpha)."""
        eps = self.args.eps
        x = x + self.attend(i, run, rms_norm(x, run.input_norm, eps), cos, sin, mask, batch, cache, capture and capture.attention)
        return x + self._ffn(i, run, rms_norm(x, run.post_attn_norm, eps), batch, capture and capture.ffn)

    def _separate_block(
        self, i: int, run: RunLayer, x: torch.Tensor, cos, sin, mask, batch: Batch, cache: KVCache | None,
        capture: Capture | None,
    ) -> torch.Tensor:
        """A mixture router with separate attention: each expert's own layer on the rows that chose it."""
        if batch.cache_operator:
            return torch.ops.mergeserve.separate_layer(x, cos, sin, batch.alpha, batch.slots, batch.positions,
                                                       self.eager_key, i, cache.key, batch.chunk_ids)
        return separate_layer(i, self.expert_runs[i], x, cos, sin, mask, batch, cache, self.args.attn_shape, self.args.eps)

    def _dynamic_block(
        self, i: int, run: RunLayer, x: torch.Tensor, cos, sin, mask, batch: Batch, cache: KVCache | None,
        capture: Capture | None,
    ) -> torch.Tensor:
        """A mixture router with attention dynamic: attention and FFN merged per request, each
        token's gate [B * T, E] its row's alpha."""
        gate = batch.per_token(batch.alpha)
        x = x + self.attend(i, run, rms_norm(x, run.input_norm, self.args.eps), cos, sin, mask, batch, cache, gate=gate)
        return x + self._dynamic_ffn(run, x, gate)

    def _coefficient_block(
        self, coefficients: torch.Tensor, i: int, run: RunLayer, x: torch.Tensor, cos, sin, mask, batch: Batch,
        cache: KVCache | None, capture: Capture | None,
    ) -> torch.Tensor:
        """The dynamic layer with one merge for every token (the forward's `coefficients`), layer by layer
        ([L, E]) or module by module ([L, 2, E])."""
        rows = coefficients[i] if coefficients.dim() == 3 else coefficients[i].expand(2, -1)  # [2, E]: attention, FFN
        gate, ffn_gate = (r.expand(batch.tokens.numel(), -1) for r in rows)  # [B * T, E] each
        normed = rms_norm(x, run.input_norm, self.args.eps)
        x = x + self.attend(i, run, normed, cos, sin, mask, batch, cache, capture and capture.attention, gate)
        return x + self._dynamic_ffn(run, x, ffn_gate)

    def _dynamic_ffn(self, run: RunLayer, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The FFN merged per token from the experts' deltas: x [B, T, D], gate [B * T, E] -> [B, T, D]."""
        normed = rms_norm(x, run.post_attn_norm, self.args.eps)
        return run.dynamic_ffn(normed.reshape(-1, normed.shape[-1]), gate).view_as(x)

    @property
    def cache_windows(self) -> tuple[int | None, ...]:
        """Each cache layer's sliding window (separate attention: layer i's experts at i * E + e)."""
        per_layer = self.composed.num_experts if self.separate else 1
        return tuple(w for w in self.args.windows for _ in range(per_layer))

    def count(self, batch: Batch, rows: int | None = None, counts_alpha: bool = True) -> None:
        """Add the last forward's routing to the router statistics: its token-routing picks, and
        under a mixture router (separate or dynamic) every layer's alpha. rows: only the first
        `rows` rows of the batch are real (a compiled step pads decode batches to a bucket)."""
        picks, self._picks = self._picks, []
        if rows is not None:
            t = batch.tokens.shape[1]
            picks = [(i, w[:rows * t], ids[:rows * t]) for i, w, ids in picks]
            batch = Batch(batch.tokens[:rows], batch.positions[:rows], None, alpha=None if batch.alpha is None else batch.alpha[:rows])
        self.token_routing = self._count_picks(picks)
        if counts_alpha and (self.separate or self.dynamic) and batch.alpha is not None:
            picked, weight = routing_counts(batch)  # [E], [E]: the same for every layer
            self.expert_load += picked
            self.expert_weight += weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.composed.head_proj is not None:  # [.., D] -> [.., D_s], the shared head's width
            hidden = hidden.float() @ self.composed.head_proj.float()
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
        flat, real = real_tokens(x, batch)  # [N, D]
        if capture is not None:
            capture.append(flat)
        weights, ids = top_k_experts(flat, run.layer.attn_router, self.top_k, batch.router_bias, self.composed.router_subspace)
        gate = flat.new_zeros(len(flat), self.composed.num_experts).scatter_(1, ids, weights)  # [N, E]
        if real is None:
            return gate
        return gate.new_zeros(real.numel(), gate.shape[1]).index_put_((real,), gate)

    def _ffn(self, i: int, run: RunLayer, x: torch.Tensor, batch: Batch, capture: list | None) -> torch.Tensor:
        layer = run.layer
        if not layer.is_moe:
            return expert_mlp(x, run.ffns[0])
        flat, real = real_tokens(x, batch)  # padding is routed nowhere and costs no expert compute
        if capture is not None:
            capture.append(flat)
        if batch.alpha is None:
            weights, ids = top_k_experts(flat, layer.router, self.top_k, batch.router_bias, self.composed.router_subspace)
        else:
            weights, ids = fixed_routing(batch)
        self._picks.append((i, weights, ids))
        out = self._experts(i, run, flat, weights, ids, batch)
        if real is None:
            return out.view_as(x)
        return torch.zeros_like(x).view(-1, x.shape[-1]).index_put_((real,), out.to(x.dtype)).view_as(x)

    def _experts(
        self, i: int, run: RunLayer, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, batch: Batch,
    ) -> torch.Tensor:
        """The MoE FFN: LoRA experts through their kernel, dense ones grouped; a mix takes both."""
        if run.lora is None:
            return self._dense_experts(i, run, x, weights, ids, batch)
        if run.dense_experts is None:
            return lora_moe_ffn(x, weights, ids, run.lora)
        on_dense = run.dense_experts[ids]  # [N, k]
        return lora_moe_ffn(x, weights.masked_fill(on_dense, 0), ids, run.lora) \
            + self._dense_experts(i, run, x, weights.masked_fill(~on_dense, 0), ids, batch)

    def _dense_experts(
        self, i: int, run: RunLayer, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, batch: Batch,
    ) -> torch.Tensor:
        """Dense experts on the tokens that picked them; in a compiled step one opaque operator
        (opaque_ops.py), where padding rows pick nothing."""
        if not batch.cache_operator:
            return moe_ffn(x, weights, ids, run.ffns)
        padding = batch.per_token(batch.slots < 0).unsqueeze(1)  # [N, 1]
        return torch.ops.mergeserve.dense_experts(x, weights.masked_fill(padding, 0), ids, self.eager_key, i)

    def _count_picks(self, picks: list[tuple[int, torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
        """Token-routing picks (layer, weights, ids) added to the router statistics, all layers at once;
        returns each token's weight on each expert over those layers, [N, E]."""
        if not picks:
            return None
        n_experts = self.expert_load.shape[1]
        layers = torch.tensor([i for i, _, _ in picks])  # [L']
        ids = torch.stack([ids for _, _, ids in picks])  # [L', N, k]
        weights = torch.stack([w for _, w, _ in picks]).detach().double()  # [L', N, k]
        flat = (layers.view(-1, 1, 1) * n_experts + ids).reshape(-1)
        live = (weights.reshape(-1) > 0).double()  # weight-0 picks ran nothing and count nowhere
        size = self.expert_load.numel()
        self.expert_load.view(-1).add_(torch.bincount(flat, live, minlength=size).long())
        self.expert_weight.view(-1).add_(torch.bincount(flat, weights.reshape(-1), minlength=size))
        return token_weights(ids, weights, n_experts)


def token_weights(ids: torch.Tensor, weights: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Each token's routing weight on each expert summed over layers, [N, E], of picks ids and
    weights [L', N, k]."""
    n = ids.shape[1]
    ids, weights = (t.transpose(0, 1).reshape(n, -1) for t in (ids, weights))  # [N, L' * k]
    return torch.zeros(n, n_experts, dtype=torch.float64).scatter_add_(1, ids, weights.double())


def run_tensors(w) -> list[torch.Tensor]:
    """The plain tensors behind a run weight (a packed copy's source; see Transformer.packed)."""
    if isinstance(w, Packed):
        return [w.source]
    if isinstance(w, LowRank):
        return [*run_tensors(w.base), w.a, w.b]
    return [w] if isinstance(w, torch.Tensor) else []
