"""The forward of a base engine: the base's matmuls run once over the tokens of every composition
on it; each token's adapter terms are chosen by its own composition (engine/tables.py).

Per layer, attention adds sum_e gate[t, e] B_e A_e x over the layer's attention entries and the
FFN runs the LoRA-expert kernel with each token's slots (kernels/lora_moe.mixed_lora_ffn): a
routed token's slots are one-hot picks of its composition's experts, a merged token's single
slot holds its merge's coefficients. Tokens without terms in a layer get zero gates: the base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from mergeserve.engine.kv_cache import KVCache
from mergeserve.engine.layers import Batch, RunLayer, attention, real_tokens, rms_norm, signed_sin
from mergeserve.engine.model import ModelArgs
from mergeserve.engine.tables import BaseWeights, CompositionTables, Fixed, LayerTables, PerRequest, Routed
from mergeserve.kernels import expert_mlp, linear
from mergeserve.kernels.lora_moe import MASKED_MAX_EXPERTS, lora_moe_ffn, mixed_lora_ffn
from mergeserve.kernels.lowrank import Pack, packed
from mergeserve.kernels.routed_lowrank import SparseGate
from mergeserve.composition import Layer

__all__ = ["BaseTransformer", "Row", "StepRouting"]

# Up to this many entries every token runs against the whole table (dense gates, the masked FFN
# kernel: plain matmuls); past it each token reads only its own entries' factors.
DENSE_MAX_ENTRIES = MASKED_MAX_EXPERTS


@dataclass(eq=False)
class Row:
    """One row of a forward: its composition, real tokens, and its request's routing inputs."""

    comp: CompositionTables
    tokens: int
    alpha: torch.Tensor | None = None  # [E] a mixture router's choice
    bias: tuple[float, ...] | None = None  # [E] the request's router bias


@dataclass(eq=False)
class _Group:
    """The real tokens of one composition in a forward."""

    comp: CompositionTables
    tokens: torch.Tensor | None  # [n] their indices among the forward's real tokens; None: all of them
    alpha: torch.Tensor | None  # [n, E]
    bias: torch.Tensor | None  # [n, E]


class StepRouting:
    """Which composition each real token of a forward belongs to, and the weights of its terms per layer."""

    def __init__(self, rows: list[Row]) -> None:
        counts = torch.tensor([r.tokens for r in rows])
        by_comp: dict[int, list[int]] = {}
        for b, r in enumerate(rows):
            by_comp.setdefault(id(r.comp), []).append(b)
        self.groups = [self._group(rows, bs, counts, len(by_comp) == 1) for bs in by_comp.values()]
        self.num_tokens = int(counts.sum())
        self._picks: list[tuple[CompositionTables, int, torch.Tensor, torch.Tensor]] = []  # (comp, layer, weights, ids)

    @staticmethod
    def _group(rows: list[Row], bs: list[int], counts: torch.Tensor, alone: bool) -> _Group:
        comp = rows[bs[0]].comp
        n = counts[bs]
        tokens = None
        if not alone:
            starts = torch.cumsum(counts, 0) - counts  # [B] first real token of each row
            tokens = torch.cat([torch.arange(int(starts[b]), int(starts[b]) + int(counts[b])) for b in bs])
        alpha = None
        if all(rows[b].alpha is not None for b in bs):
            alpha = torch.stack([rows[b].alpha for b in bs]).float().repeat_interleave(n, dim=0)
        bias = None
        if any(rows[b].bias is not None for b in bs):
            zeros = (0.0,) * comp.num_experts
            bias = torch.tensor([rows[b].bias or zeros for b in bs]).repeat_interleave(n, dim=0)
        return _Group(comp, tokens, alpha, bias)

    def attention_gate(self, i: int, x: torch.Tensor, size: int) -> torch.Tensor | None:
        """Every real token's weights over layer i's attention entries, [N, size]; None: all base."""
        if len(self.groups) == 1 and isinstance(part := self.groups[0].comp.layers[i].attention, Fixed):
            return part.row(size).expand(self.num_tokens, -1)  # one composition's fixed terms: no scatter
        terms = self.attention_terms(i, x)
        if terms is None:
            return None
        ids, weights = terms
        return x.new_zeros(self.num_tokens, size, dtype=torch.float32).scatter_add_(1, ids, weights)

    def attention_terms(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every real token's attention terms in layer i: entry ids and weights, [N, m] each (weight 0
        pads a token with fewer terms); None where no token has any."""
        parts = [g.comp.layers[i].attention for g in self.groups]
        if all(p is None for p in parts):
            return None
        m = max(p.top_k if isinstance(p, Routed) else len(p.entries) for p in parts if p is not None)
        ids = torch.zeros(self.num_tokens, m, dtype=torch.long)
        weights = x.new_zeros(self.num_tokens, m, dtype=torch.float32)
        for g, part in zip(self.groups, parts):
            rows = self._rows(g)[:, 0]
            if isinstance(part, Fixed):
                ids[rows, :len(part.entries)], weights[rows, :len(part.entries)] = part.entries, part.coef
            elif isinstance(part, PerRequest):
                ids[rows, :len(part.entries)], weights[rows, :len(part.entries)] = part.entries, g.alpha
            elif part is not None:
                w, picked = self._route(g, part, x)
                ids[rows, :part.top_k], weights[rows, :part.top_k] = part.entries[picked], w
        return ids, weights

    def ffn_picks(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer i's FFN as an MoE: every token's picks, weights and entry ids [N, K]; None unless
        every token's FFN is one (token-routed, or a mixture router's MoE)."""
        parts = [g.comp.layers[i].ffn for g in self.groups]
        if not all(isinstance(p, Routed) or (isinstance(p, PerRequest) and not p.merged) for p in parts):
            return None
        k = max(self._slots(p, g) for p, g in zip(parts, self.groups))
        weights = x.new_zeros(self.num_tokens, k, dtype=torch.float32)
        ids = torch.zeros(self.num_tokens, k, dtype=torch.long)
        for g, part in zip(self.groups, parts):
            w, picked = self._picked(i, g, part, x)
            rows = self._rows(g)[:, 0]
            weights[rows, :w.shape[1]], ids[rows, :w.shape[1]] = w, part.entries[picked]
        return weights, ids

    def _picked(self, i: int, g: _Group, part: Routed | PerRequest, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A group's FFN picks as an MoE: weights and expert ids [n, k] (counted for token routing)."""
        if isinstance(part, PerRequest):  # the request's chosen experts, weighted by alpha
            return torch.topk(g.alpha, self._slots(part, g), dim=1)
        w, ids = self._route(g, part, x)
        self._picks.append((g.comp, i, w, ids))
        return w, ids

    def ffn_slots(self, i: int, x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every real token's FFN slots over layer i's FFN entries: output weights [N, K] and delta
        coefficients [N, K, size]; None where no token has FFN terms (the base FFN alone)."""
        parts = [g.comp.layers[i].ffn for g in self.groups]
        if all(p is None for p in parts):
            return None
        if len(parts) == 1 and isinstance(parts[0], Routed):  # one token-routed composition: no index tensors
            w, ids = self._route(self.groups[0], parts[0], x)
            self._picks.append((self.groups[0].comp, i, w, ids))
            return w, x.new_zeros(*ids.shape, size, dtype=torch.float32).scatter_(2, parts[0].entries[ids].unsqueeze(-1), 1.0)
        k = max(self._slots(p, g) for p, g in zip(parts, self.groups))
        weights = x.new_zeros(self.num_tokens, k, dtype=torch.float32)
        coef = x.new_zeros(self.num_tokens, k, size, dtype=torch.float32)
        for g, part in zip(self.groups, parts):
            rows = self._rows(g)
            if part is None or isinstance(part, Fixed) or (isinstance(part, PerRequest) and part.merged):
                weights[rows, 0] = 1.0
                if isinstance(part, Fixed):
                    coef[rows, 0, part.entries] += part.coef
                elif part is not None:
                    coef[rows, 0, part.entries] += g.alpha
                continue
            w, ids = self._picked(i, g, part, x)
            slots = torch.arange(w.shape[1])
            weights[rows[:, 0], :w.shape[1]] = w
            coef.index_put_((rows, slots, part.entries[ids]), torch.ones_like(w), accumulate=True)
        return weights, coef

    @staticmethod
    def _slots(part, g: _Group) -> int:
        if isinstance(part, Routed):
            return part.top_k
        if isinstance(part, PerRequest) and not part.merged:
            return int((g.alpha > 0).sum(1).max())
        return 1

    def _rows(self, g: _Group) -> torch.Tensor:
        """The group's token indices as a column [n, 1], for indexing beside entry ids."""
        return (torch.arange(self.num_tokens) if g.tokens is None else g.tokens).unsqueeze(1)

    @staticmethod
    def _route(g: _Group, part: Routed, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixtral routing of the group's tokens over its experts: weights [n, k], expert ids [n, k]."""
        h = x if g.tokens is None else x[g.tokens]
        logits = F.linear(h.float(), part.router)  # [n, E]
        if g.bias is not None:
            logits = logits + g.bias
        top, ids = torch.topk(logits, part.top_k, dim=-1)
        return torch.softmax(top, dim=-1), ids

    def count_picks(self) -> None:
        """The forward's token-routing statistics, added to each composition's counters."""
        for comp in {id(c): c for c, _, _, _ in self._picks}.values():
            picks = [(i, w, ids) for c, i, w, ids in self._picks if c is comp]
            e = comp.num_experts
            flat = torch.cat([(i * e + ids).reshape(-1) for i, _, ids in picks])
            weights = torch.cat([w.reshape(-1) for _, w, _ in picks]).double()
            size = comp.expert_load.numel()
            comp.expert_load.view(-1).add_(torch.bincount(flat, (weights > 0).double(), minlength=size).long())
            comp.expert_weight.view(-1).add_(torch.bincount(flat, weights, minlength=size))
        self._picks = []


class BaseTransformer(torch.nn.Module):
    """The base model of a base engine; the compositions' terms come in with each forward."""

    def __init__(self, base: BaseWeights, config, max_len: int, pack: Pack | None = None) -> None:
        super().__init__()
        self.base = base
        self.args = ModelArgs.from_config(config)
        rotary = LlamaRotaryEmbedding(config)
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(max_len).unsqueeze(0))
        self.cos, self.sin = cos[0], signed_sin(sin[0])  # [max_len, Dh]
        self.runs = [RunLayer.of(Layer(layer.input_norm, layer.attn, layer.post_attn_norm, layer.experts), pack)
                     for layer in base.layers]
        self.lm_head = packed(base.lm_head, pack)
        self.norm = base.norm.float()
        self.cache_layers = self.args.n_layers

    def forward(self, batch: Batch, routing: StepRouting, tables: list[LayerTables], cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states after the final norm, [B, T, D]."""
        x = F.embedding(batch.tokens, self.base.embed).float()  # [B, T, D]
        cos, sin = self.cos[batch.positions].unsqueeze(1), self.sin[batch.positions].unsqueeze(1)
        masks = {w: batch.mask(w) for w in set(self.args.windows)}
        eps = self.args.eps
        for i, (run, lt) in enumerate(zip(self.runs, tables)):
            h = rms_norm(x, run.input_norm, eps)
            routed = None
            if lt.attention is not None:
                gate = self._attention_gate(i, h, batch, routing, lt)
                routed = None if gate is None else (lt.attention, gate)
            x = x + attention(h, run.qkv, run.qkv_bias, run.o_proj, self.args.attn_shape, cos, sin,
                              masks[self.args.windows[i]], batch, cache, i, routed)
            x = x + self._ffn(i, run, lt, rms_norm(x, run.post_attn_norm, eps), batch, routing)
        routing.count_picks()
        return rms_norm(x, self.norm, eps)

    def _attention_gate(
        self, i: int, h: torch.Tensor, batch: Batch, routing: StepRouting, lt: LayerTables,
    ) -> torch.Tensor | SparseGate | None:
        """Every token's gate over layer i's attention entries, [B * T, entries] (zero rows for
        padding), or each token's own entries past DENSE_MAX_ENTRIES; None when no token has terms here."""
        flat, real = real_tokens(h, batch)
        size = _entries(lt.attention)
        if size <= DENSE_MAX_ENTRIES:
            gate = routing.attention_gate(i, flat, size)
            if gate is None or real is None:
                return gate
            return gate.new_zeros(real.numel(), size).index_put_((real,), gate)
        terms = routing.attention_terms(i, flat)
        if terms is None:
            return None
        ids, weights = terms
        if real is not None:
            ids = ids.new_zeros(real.numel(), ids.shape[1]).index_put_((real,), ids)
            weights = weights.new_zeros(real.numel(), weights.shape[1]).index_put_((real,), weights)
        return SparseGate(ids, weights)

    def _ffn(self, i: int, run: RunLayer, lt: LayerTables, x: torch.Tensor, batch: Batch, routing: StepRouting) -> torch.Tensor:
        flat, real = real_tokens(x, batch)
        picks = None
        if lt.ffn is not None and lt.ffn.num_experts > DENSE_MAX_ENTRIES:
            picks = routing.ffn_picks(i, flat)  # an MoE over many entries: each token reads its own
        if picks is not None:
            out = lora_moe_ffn(flat, *picks, lt.ffn)
        elif lt.ffn is not None and (slots := routing.ffn_slots(i, flat, lt.ffn.num_experts)) is not None:
            out = mixed_lora_ffn(flat, *slots, lt.ffn)
        else:
            out = expert_mlp(flat, run.ffns[0])
        if real is None:
            return out.view_as(x).to(x.dtype)
        return torch.zeros_like(x).view(-1, x.shape[-1]).index_put_((real,), out.to(x.dtype)).view_as(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head).float()


def _entries(deltas) -> int:
    """Entries of a layer's RoutedAttention (its gate's width)."""
    d = deltas.qkv or deltas.o
    a = d.a.source if hasattr(d.a, "source") else d.a
    return a.shape[0] // d.rank
