"""The transformer's building blocks that every forward shares: the batch layout, a decoder
layer's weights as the forward runs them, RMS norm, rotary embeddings and attention over the KV
cache. Model, mixture routers and router calibration import these; this module imports nothing
from merge, router or engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mergeserve.composition import Layer

from mergeserve.weights import Weight, fuse
from mergeserve.kernels import FusedFFN, LoraExperts
from mergeserve.kernels.lowrank import Pack, linear, packed, prepared
from mergeserve.kernels.packed import Packed
from mergeserve.kernels.routed_lowrank import DynamicFFN, RoutedAttention

__all__ = [
    "Batch", "RunLayer", "attention", "first_of_run", "next_token_targets", "padded_groups", "real_tokens", "rms_norm", "rope",
    "signed_sin", "unpack",
]


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
    alpha: torch.Tensor | None = None  # [B, E] each row's expert weights under a mixture router
    # Keys each row attends over, max position + 1; given by callers that know it (no host sync).
    key_len: int | None = None
    # The rows' slots are first_slot, first_slot + 1, ...: the cache is read as a view, not copied.
    first_slot: int | None = None
    # Attention over the cache through the cache_attention operator (kv_cache.py), which masks
    # and finds the keys itself: a compiled step's batches, whose graphs never see the cache.
    cache_operator: bool = False
    # A compiled prefill's chunks packed into one row, tokens [1, N]: the chunk of each token
    # [1, N] (the row of `unpacked`). Its slots [N] and alpha [N, E] are each token's row's: no
    # dimension of the graph's inputs counts chunks, so any number of them runs in one graph.
    chunk_ids: torch.Tensor | None = None

    @classmethod
    def right_padded(
        cls, sequences: list[list[int]], router_bias: torch.Tensor | None = None, alpha: torch.Tensor | None = None,
    ) -> Batch:
        """Whole sequences from position 0, padded on the right, for a forward without cache."""
        width = max(len(s) for s in sequences)
        tokens = torch.tensor([s + [0] * (width - len(s)) for s in sequences])  # [B, T]
        lengths = torch.tensor([len(s) for s in sequences])
        return cls(tokens, torch.arange(width).expand_as(tokens), None, router_bias, lengths, alpha, key_len=width)

    def packed(self) -> Batch:
        """This right-padded batch's real tokens as one row, for the compiled prefill graph: its token
        dimension is the one that varies (any chunks, one graph), and the operators that need rows
        (the cache's, separate attention's) unpack them by `chunk_ids`."""
        real = (self.real() if self.lengths is not None else torch.ones_like(self.tokens, dtype=torch.bool)).view(-1)
        rows = torch.arange(len(self.tokens)).repeat_interleave(self.tokens.shape[1])  # [B * T]

        def per_token(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else self.per_token(t)[real]

        return Batch(self.tokens.view(-1)[real].unsqueeze(0), self.positions.view(-1)[real].unsqueeze(0), per_token(self.slots),
                     self.router_bias, alpha=per_token(self.alpha), key_len=self.key_len, cache_operator=True,
                     chunk_ids=rows[real].unsqueeze(0))

    @classmethod
    def unpacked(cls, positions: torch.Tensor, slots: torch.Tensor, chunk_ids: torch.Tensor,
                 alpha: torch.Tensor | None = None) -> Batch:
        """The right-padded rows of a packed batch (positions and chunk_ids [1, N], slots [N], alpha
        [N, E]), each row's padding repeating its last position: the operators' view of it."""
        lengths = torch.bincount(chunk_ids[0])  # [C]
        first = lengths.cumsum(0) - lengths  # [C]: each row's first token
        real = torch.arange(int(lengths.max())) < lengths.unsqueeze(1)  # [C, T]
        rows = unpack(positions[0], real)  # [C, T], 0 at padding
        rows = torch.where(real, rows, rows.max(1, keepdim=True).values)
        return cls(rows, rows, slots[first], lengths=lengths, alpha=None if alpha is None else alpha[first])

    def slotted(self) -> Batch | None:
        """The leading rows that have a cache slot, as the operators run them (a compiled step puts its
        padding rows, slot -1, after the real ones; their keys read as views where the slots run
        consecutively); None when no row has one."""
        n = int((self.slots >= 0).sum())
        if n == 0:
            return None

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:n]

        slots = self.slots[:n]
        return Batch(self.tokens[:n], self.positions[:n], slots, lengths=pick(self.lengths), alpha=pick(self.alpha),
                     first_slot=first_of_run(slots.tolist()))

    def per_token(self, per_row: torch.Tensor) -> torch.Tensor:
        """per_row [B, ...] for each token, [B * T, ...] row after row (a packed batch's are per token already)."""
        if self.chunk_ids is not None:
            return per_row
        return per_row.repeat_interleave(self.tokens.shape[1], dim=0)

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

    def num_keys(self) -> int:
        return self.key_len if self.key_len is not None else int(self.positions.max()) + 1

    def mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """Boolean [B, 1, T, S]: query at position p sees keys at positions j <= p (within the window).
        None where every query sees every key (one row decoding one token): attention needs no mask."""
        b, t = self.tokens.shape
        if b == 1 and t == 1 and not sliding_window:
            return None
        keys = torch.arange(self.num_keys())  # [S]
        q = self.positions.unsqueeze(-1)  # [B, T, 1]
        allowed = keys <= q
        if sliding_window:
            allowed &= keys > q - sliding_window
        return allowed.unsqueeze(1)


def first_of_run(slots: list[int]) -> int | None:
    """The first slot when `slots` are consecutive (Batch.first_slot: the cache is read as a view), else None."""
    return slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else None


def unpack(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Packed rows x [N, ...] into right-padded rows [B, T, ...] (zeros at padding); real [B, T]."""
    out = x.new_zeros(*real.shape, *x.shape[1:])
    out[real] = x
    return out


def real_tokens(x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The states of the real (not padding) tokens [N, D], and which of the B * T they are (None: all)."""
    flat = x.reshape(-1, x.shape[-1])  # [B*T, D]
    real = batch.real()
    if real is None:
        return flat, None
    real = real.reshape(-1)
    return flat[real], real


def padded_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length so each right-padded group has at most `max_tokens` tokens
    (a single longer sequence makes a group of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] * (len(groups[-1]) + 1) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


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
    dynamic_ffn: DynamicFFN | None = None  # attention dynamic: the FFN merged per request from the experts' deltas

    @classmethod
    def of(cls, layer: Layer, pack: Pack | None = None, dynamic: bool = False) -> RunLayer:
        """`pack`: a WeightPacker for the full-size weights (None: run them as they are).
        dynamic: the experts' FFNs are merged per request (router.attention: dynamic)."""
        a = layer.attn
        # Builders lay q/k/v back to back, so this is a view; anything else is concatenated once.
        qkv = fuse([prepared(w) for w in (a.q_proj, a.k_proj, a.v_proj)], copy=True)
        bias = None if a.q_bias is None else torch.cat([a.q_bias, a.k_bias, a.v_bias])
        deltas = RoutedAttention.build(layer.attn_experts, a.o_proj.dtype, pack) if layer.attn_experts else None
        if dynamic:
            return cls(layer, packed(qkv, pack), bias, packed(prepared(a.o_proj), pack), [], None, None,
                       layer.input_norm.float(), layer.post_attn_norm.float(), deltas, DynamicFFN.build(layer.experts, pack))
        lora = LoraExperts.build(layer.experts) if layer.is_moe else None
        if lora is not None and pack is not None:
            lora = lora.packed(pack)
        dense = None if lora is None or bool(lora.member.all()) else ~lora.member
        ffns = [FusedFFN.of(e, pack) for e in layer.experts] if lora is None or dense is not None else []
        return cls(
            layer, packed(qkv, pack), bias, packed(prepared(a.o_proj), pack), ffns, lora, dense,
            layer.input_norm.float(), layer.post_attn_norm.float(), deltas,
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """The sin table with its first half negated, for `rope` ([..., Dh])."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, H, T, Dh]; cos and signed_sin(sin) [B, 1, T, Dh].

    Llama's x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1): the same as
    roll(x, Dh/2) * (-sin1, sin2), in three ops instead of seven.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


def attention(
    x: torch.Tensor, qkv: Weight, bias: torch.Tensor | None, o_proj: Weight, shape: tuple[int, int, int],
    cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, batch: Batch, cache, layer: int,
    routed: tuple[RoutedAttention, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Self-attention of x [B, T, D] with fused q/k/v projections; keys and values go through
    `cache` (a KVCache, layer `layer`) when given. shape: (heads, kv heads, head dim);
    sin: signed_sin of the sin table. routed: the experts' attention deltas and each token's
    gate over them [B * T, E], added to the q/k/v and o projections."""
    b, t, _ = x.shape
    deltas, gate = routed if routed is not None else (None, None)
    qkv_out = projection(x.reshape(b * t, -1), qkv, bias, deltas and deltas.qkv, gate)
    y = attend(qkv_out.view(b, t, -1), shape, cos, sin, mask, batch, cache, layer).to(x.dtype)  # [B, T, H * Dh]
    return projection(y.view(b * t, -1), o_proj, None, deltas and deltas.o, gate).view(b, t, -1)


def projection(x: torch.Tensor, w: Weight, bias: torch.Tensor | None, terms, gate) -> torch.Tensor:
    """x [N, D] through w, plus the experts' low-rank terms (a RoutedLowRank, or None) by each
    token's gate: [N, out]."""
    out = linear(x, w, bias)
    return out if terms is None or gate is None else out + terms(x, gate)


def attend(
    qkv: torch.Tensor, shape: tuple[int, int, int], cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
    batch: Batch, cache, layer: int,
) -> torch.Tensor:
    """Attention over projected q/k/v [B, T, (H + 2 KVH) * Dh], rotated here: [B, T, H * Dh] fp32."""
    n_heads, n_kv, dh = shape
    b, t, _ = qkv.shape
    # Attention itself runs in fp32 whatever the weights: CPU SDPA in bf16 is ~4x slower (measured).
    qkv = qkv.float().view(b, t, n_heads + 2 * n_kv, dh).transpose(1, 2)  # [B, H + 2 KVH, T, Dh]
    qk, v = qkv.split([n_heads + n_kv, n_kv], dim=1)
    q, k = rope(qk, cos, sin).split([n_heads, n_kv], dim=1)
    if cache is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    elif batch.cache_operator:  # a compiled step: the cache stays out of the graph
        out = torch.ops.mergeserve.cache_attention(q, k, v, cache.key, layer, batch.slots, batch.positions, batch.chunk_ids)
    else:
        out = cache.attend(layer, q, k, v, batch.slots, batch.positions, batch.write_slots(cache.scratch_slot),
                           batch.num_keys(), batch.first_slot, mask)
    return out.transpose(1, 2).reshape(b, t, -1)


def next_token_targets(
    batch: Batch, spans: list[tuple[int, int] | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of a right-padded Batch: which positions predict a real token [B, T-1] (position t predicts
    token t+1), those tokens [N], the prompt of each [N], and predictions per prompt [B] (at least 1).
    spans: per prompt, the tokens [start, end) to predict (a chat's user content, not its template);
    None, or a span that holds no predicted token: every token after the first."""
    predicted = batch.real()[:, 1:]
    if spans is not None and any(span is not None for span in spans):
        position = torch.arange(1, batch.tokens.shape[1]).unsqueeze(0)  # [1, T-1]: the predicted token's
        start = torch.tensor([span[0] if span else 0 for span in spans]).unsqueeze(1)  # [B, 1]
        end = torch.tensor([span[1] if span else batch.tokens.shape[1] for span in spans]).unsqueeze(1)
        inside = predicted & (position >= start) & (position < end)
        predicted = torch.where(inside.any(1, keepdim=True), inside, predicted)
    targets = batch.tokens[:, 1:][predicted]
    row = torch.arange(len(predicted)).unsqueeze(1).expand_as(predicted)[predicted]
    counts = torch.bincount(row, minlength=len(predicted)).clamp_min(1)
    return predicted, targets, row, counts
