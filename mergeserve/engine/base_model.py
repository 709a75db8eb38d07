"""The forward of a base engine: the base's matmuls run once over the tokens of every composition
on it; each token's adapter terms are chosen by its own composition (engine/tables.py).

Per layer, attention adds sum_e gate[t, e] B_e A_e x over the layer's attention entries and the
FFN runs the LoRA-expert kernel with each token's slots (kernels/lora_moe.mixed_lora_ffn): a
routed token's slots are one-hot picks of its composition's experts, a merged token's single
slot holds its merge's coefficients. Tokens without terms in a layer get zero gates: the base.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from mergeserve.engine.compiled import as_parameters
from mergeserve.engine.kv_cache import KVCache
from mergeserve.engine.layers import Batch, RunLayer, attend, attention, projection, real_tokens, rms_norm, signed_sin
from mergeserve.engine.model import ModelArgs, token_weights
from mergeserve.engine.opaque_ops import register
from mergeserve.engine.tables import (BaseWeights, CompositionTables, Fixed, FixedTable, LayerTables, PerRequest, Routed,
                                     RouterTable, RouterTables)
from mergeserve.kernels import expert_mlp, linear
from mergeserve.kernels.entry_lora import EntryFFN, SparseGate, entry_mixed_ffn, entry_moe_ffn
from mergeserve.kernels.lora_moe import mixed_lora_ffn
from mergeserve.kernels.lowrank import Pack, packed
from mergeserve.kernels.routed_lowrank import RoutedAttention
from mergeserve.composition import Layer

__all__ = ["BaseGraph", "BaseTransformer", "GraphStep", "Row", "StepRouting"]

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

    def __init__(self, rows: list[Row], routers: RouterTables | None = None) -> None:
        """routers: the FFN routers of every composition placed on the engine (None: stacked per step)."""
        counts = torch.tensor([r.tokens for r in rows])
        by_comp: dict[int, list[int]] = {}
        for b, r in enumerate(rows):
            by_comp.setdefault(id(r.comp), []).append(b)
        self.groups = [self._group(rows, bs, counts, len(by_comp) == 1) for bs in by_comp.values()]
        self.num_tokens = int(counts.sum())
        group_of = torch.empty(len(rows), dtype=torch.long)
        for g, bs in enumerate(by_comp.values()):
            group_of[bs] = g
        self.token_group = group_of.repeat_interleave(counts)  # [N] each real token's group
        self.routers, self.token_slot = routers, None  # token_slot [N]: each real token's composition in `routers`
        if routers is not None and all(id(g.comp) in routers.slot for g in self.groups):
            self.token_slot = torch.tensor([routers.slot[id(g.comp)] for g in self.groups])[self.token_group]
        # Token-routing picks to count: (composition, None: every group's tokens; layer, weights, ids).
        self._picks: list[tuple[CompositionTables | None, int, torch.Tensor, torch.Tensor]] = []
        self._expert_bias: dict[int, torch.Tensor | float] = {}
        # Once counted: each real token's weight on each of its composition's experts, summed over
        # the MoE layers, [N, E] (E the most experts of any; zeros past a composition's own).
        self.token_routing: torch.Tensor | None = None

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

    def attention_gate(self, i: int, x: torch.Tensor, size: int, anchor: Fixed | None) -> torch.Tensor | None:
        """Every real token's weights over layer i's attention entries relative to the layer's
        anchor (the terms its weights hold), [N, size]; None where every token runs the anchor."""
        parts = [g.comp.layers[i].attention for g in self.groups]
        if all(_is_anchor(p, anchor) for p in parts):
            return None
        if len(parts) == 1 and isinstance(parts[0], Fixed):  # one composition's fixed terms: no scatter
            row = parts[0].row(size) - (anchor.row(size) if anchor is not None else 0)
            return row.expand(self.num_tokens, -1)
        ids, weights = self.attention_terms(i, x, anchor)
        return x.new_zeros(self.num_tokens, size, dtype=torch.float32).scatter_add_(1, ids, weights)

    def attention_terms(self, i: int, x: torch.Tensor, anchor: Fixed | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every real token's attention terms in layer i beyond the anchor's: entry ids and weights,
        [N, m] each (weight 0 pads a token with fewer terms; the anchor's come in with minus its
        coefficients); None where every token runs the anchor.

        Fixed terms come from the placed compositions' table (RouterTables), indexed by each
        token's composition; only the groups that choose per token or per request (routed
        attention, per-request merging) are filled one by one."""
        parts = [g.comp.layers[i].attention for g in self.groups]
        if all(_is_anchor(p, anchor) for p in parts):
            return None
        ids, weights = self._fixed_terms(i, parts, anchor)
        chosen = [(g, p) for g, p in zip(self.groups, parts) if isinstance(p, (Routed, PerRequest))]
        if not chosen:
            return ids, weights
        k = max(_terms(p) for _, p in chosen)
        more_ids = torch.zeros(self.num_tokens, k, dtype=torch.long)
        more_weights = torch.zeros(self.num_tokens, k)
        for g, part in chosen:
            rows = self._rows(g)[:, 0]
            if isinstance(part, PerRequest):
                more_ids[rows, :len(part.entries)], more_weights[rows, :len(part.entries)] = part.entries, g.alpha
            else:
                w, picked = self._route(g, part, x)
                more_ids[rows, :part.top_k], more_weights[rows, :part.top_k] = part.entries[picked], w
        return torch.cat([ids, more_ids], dim=1), torch.cat([weights, more_weights], dim=1)

    def _fixed_terms(self, i: int, parts: list, anchor: Fixed | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's fixed attention terms less the anchor's, [N, m] ids and weights, from the
        placed compositions' table (else one of the step's groups): an anchored token's own terms
        and the anchor's cancel exactly."""
        table = self.routers.attention[i] if self.token_slot is not None else None
        table, slot = (table, self.token_slot) if table is not None else (FixedTable.of(parts), self.token_group)
        ids, weights = table.ids[slot], table.coef[slot]
        if anchor is None:
            return ids, weights
        n = self.num_tokens
        return torch.cat([ids, anchor.entries.expand(n, -1)], 1), torch.cat([weights, -anchor.coef.expand(n, -1)], 1)

    def ffn_picks(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer i's FFN as an MoE: every token's picks, weights and entry ids [N, K]; None unless
        every token's FFN is one (token-routed, or a mixture router's MoE)."""
        parts = [g.comp.layers[i].ffn for g in self.groups]
        if not all(isinstance(p, Routed) or (isinstance(p, PerRequest) and not p.merged) for p in parts):
            return None
        if all(isinstance(p, Routed) for p in parts):
            return self._route_all(i, parts, x)
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
        if all(isinstance(p, Routed) for p in parts):  # token-routed compositions: routed together
            w, entries = self._route_all(i, parts, x)
            return w, x.new_zeros(*entries.shape, size, dtype=torch.float32).scatter_(2, entries.unsqueeze(-1), 1.0)
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

    def _route_all(self, i: int, parts: list[Routed], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixtral routing of every token by its own composition's router, all at once: weights and
        table entries [N, K] (K the largest top-k; a smaller top-k's extra slots weigh 0)."""
        table = self.routers.ffn[i] if self.token_slot is not None else None
        if table is None:  # no placement-time table: stack the groups' routers for this step
            table = RouterTable.of(parts)
            slot = self.token_group
        else:
            slot = self.token_slot
        e = table.rows.shape[1]
        if table.rows.shape[0] * e <= ROUTER_MATMUL_MAX_ROWS:  # every router on every token: one matmul
            logits = F.linear(x.float(), table.rows.view(-1, x.shape[-1])).view(self.num_tokens, -1, e)
            logits = logits.gather(1, slot.view(-1, 1, 1).expand(-1, 1, e)).squeeze(1)  # [N, E]
        else:  # many compositions: each token's own router rows
            logits = torch.bmm(table.rows[slot], x.float().unsqueeze(-1)).squeeze(-1)  # [N, E, D] @ [N, D, 1]
        logits = logits + self._bias(e)
        k = max(p.top_k for p in parts)
        top, ids = torch.topk(logits, k, dim=-1)  # [N, K]
        if any(p.top_k < k for p in parts):
            unused = torch.arange(k) >= table.top_k[slot].unsqueeze(1)  # [N, K]
            top, ids = top.masked_fill(unused, float("-inf")), ids.masked_fill(unused, 0)
        w = torch.softmax(top, dim=-1)
        self._picks.append((None, i, w, ids))
        return w, table.entries[slot].gather(1, ids)

    def _bias(self, e: int) -> torch.Tensor | float:
        """Every token's router bias over E = e experts [N, e]: its request's, and -inf past its
        composition's own experts; 0 where there is none of either."""
        if e not in self._expert_bias:
            bias: torch.Tensor | float = 0.0
            if any(g.bias is not None or g.comp.num_experts < e for g in self.groups):
                bias = torch.zeros(self.num_tokens, e)
                for g in self.groups:
                    rows = self._rows(g)[:, 0]
                    n = g.comp.num_experts
                    if g.bias is not None:
                        bias[rows, :n] = g.bias
                    bias[rows, n:] = float("-inf")
            self._expert_bias[e] = bias
        return self._expert_bias[e]

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
        per_comp: dict[int, tuple[CompositionTables, list]] = {}
        for comp, i, w, ids in self._picks:
            if comp is not None:
                per_comp.setdefault(id(comp), (comp, []))[1].append((torch.tensor([i]), w.unsqueeze(0), ids.unsqueeze(0)))
        every = [(i, w, ids) for comp, i, w, ids in self._picks if comp is None]
        if every:  # picks of every token at once: split by group, all layers together
            layers = torch.tensor([i for i, _, _ in every])  # [L']
            w_all, ids_all = torch.stack([w for _, w, _ in every]), torch.stack([ids for _, _, ids in every])  # [L', N, K]
            for g in self.groups:
                rows = slice(None) if g.tokens is None else g.tokens
                per_comp.setdefault(id(g.comp), (g.comp, []))[1].append((layers, w_all[:, rows], ids_all[:, rows]))
        width = max([g.comp.num_experts for g in self.groups] + [int(ids.max()) + 1 for _, _, _, ids in self._picks])
        self.token_routing = torch.zeros(self.num_tokens, width, dtype=torch.float64) if self._picks else None
        groups = {id(g.comp): g for g in self.groups}
        for comp, picks in per_comp.values():
            e = comp.num_experts
            flat = torch.cat([(layers.view(-1, 1, 1) * e + ids).reshape(-1) for layers, _, ids in picks])
            weights = torch.cat([w.reshape(-1) for _, w, _ in picks]).double()
            size = comp.expert_load.numel()
            comp.expert_load.view(-1).add_(torch.bincount(flat, (weights > 0).double(), minlength=size).long())
            comp.expert_weight.view(-1).add_(torch.bincount(flat, weights, minlength=size))
            rows = self._rows(groups[id(comp)])[:, 0]
            for _, w, ids in picks:  # [L', n, k] each
                self.token_routing[rows] += token_weights(ids, w, width)
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
            qkv, o = _attention_weights(run, lt)
            x = x + attention(h, qkv, run.qkv_bias, o, self.args.attn_shape, cos, sin,
                              masks[self.args.windows[i]], batch, cache, i, routed)
            x = x + self._ffn(i, run, lt, rms_norm(x, run.post_attn_norm, eps), batch, routing)
        routing.count_picks()
        return rms_norm(x, self.norm, eps)

    def _attention_gate(
        self, i: int, h: torch.Tensor, batch: Batch, routing: StepRouting, lt: LayerTables,
    ) -> torch.Tensor | SparseGate | None:
        """Every token's gate over layer i's attention entries, [B * T, entries] (zero rows for
        padding), or each token's own entries over a table of many (tables.DENSE_MAX_ENTRIES);
        None when no token has terms here."""
        flat, real = real_tokens(h, batch)
        gate = self._real_attention_gate(i, flat, routing, lt)
        if gate is None or real is None:
            return gate
        if isinstance(gate, SparseGate):
            return SparseGate(*(t.new_zeros(real.numel(), t.shape[1]).index_put_((real,), t) for t in (gate.ids, gate.weights)))
        return gate.new_zeros(real.numel(), gate.shape[1]).index_put_((real,), gate)

    def _real_attention_gate(self, i: int, flat: torch.Tensor, routing: StepRouting, lt: LayerTables) -> torch.Tensor | SparseGate | None:
        """_attention_gate of the real tokens flat [N, D], row after row: [N, entries] or a SparseGate."""
        if isinstance(lt.attention, RoutedAttention):
            return routing.attention_gate(i, flat, _entries(lt.attention), lt.anchor)
        terms = routing.attention_terms(i, flat, lt.anchor)
        return None if terms is None else SparseGate(*terms)

    def _ffn(self, i: int, run: RunLayer, lt: LayerTables, x: torch.Tensor, batch: Batch, routing: StepRouting) -> torch.Tensor:
        flat, real = real_tokens(x, batch)
        many = isinstance(lt.ffn, EntryFFN)  # a table of many entries: slice out those in use
        if many and (picks := routing.ffn_picks(i, flat)) is not None:
            out = entry_moe_ffn(flat, *picks, lt.ffn)
        elif lt.ffn is not None and (slots := routing.ffn_slots(i, flat, lt.ffn.num_experts)) is not None:
            out = entry_mixed_ffn(flat, *slots, lt.ffn) if many else mixed_lora_ffn(flat, *slots, lt.ffn)
        else:
            out = expert_mlp(flat, run.ffns[0])
        if real is None:
            return out.view_as(x).to(x.dtype)
        return torch.zeros_like(x).view(-1, x.shape[-1]).index_put_((real,), out.to(x.dtype)).view_as(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head).float()

    # The pieces a compiled step (BaseGraph) calls by operator (opaque_ops.py), on its real tokens.
    def graph_projection(self, i: int, part: int, h: torch.Tensor, step: GraphStep) -> torch.Tensor:
        """Layer i's q/k/v projection (part 0: h is the normed input of the real tokens [N, D]; the
        gate is kept for part 1) or o projection (part 1: h is attention's output), each token with
        its composition's terms, as the eager forward runs them: [N, width] fp32."""
        run, lt = self.runs[i], step.tables[i]
        if part == 0:
            step.gates[i] = self._real_attention_gate(i, h, step.routing, lt) if lt.attention is not None else None
        qkv, o = _attention_weights(run, lt)
        w, bias = (qkv, run.qkv_bias) if part == 0 else (o, None)
        terms = None if lt.attention is None else lt.attention.qkv if part == 0 else lt.attention.o
        return projection(h, w, bias, terms, step.gates[i]).float()

    def graph_ffn(self, i: int, h: torch.Tensor, step: GraphStep) -> torch.Tensor:
        """Layer i's FFN with every token's terms, h [B, T, D] normed -> [B, T, D]."""
        return self._ffn(i, self.runs[i], step.tables[i], h, step.batch, step.routing)


@dataclass(eq=False)
class GraphStep:
    """What a compiled base step's operators run on: the step's routing and tables, its real rows
    (a decode batch is padded to a bucket after them), and each layer's attention gate between
    its q/k/v and o."""

    routing: StepRouting
    tables: list[LayerTables]
    batch: Batch  # the real rows
    gates: dict[int, torch.Tensor | SparseGate | None] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.batch.tokens.shape[0]

    @property
    def tokens(self) -> int:
        """Real tokens (a prefill's rows are right-padded; the graph packs them)."""
        return self.batch.tokens.numel() if self.batch.lengths is None else int(self.batch.lengths.sum())


class BaseGraph(torch.nn.Module):
    """A base engine's forward as a compiled step traces it. Which compositions a step mixes, and
    the attention weights most of them share (the anchor), change with every placement: so the
    projections and FFNs are operators over the eager model's packed weights and tables, reading
    the step the serving thread sets (opaque_ops.base_step), and the graph holds what lies between
    them (embedding, norms, rotary, residuals) and calls the cache operator. One graph serves any mix."""

    def __init__(self, eager: BaseTransformer) -> None:
        super().__init__()
        self.args, self.cos, self.sin = eager.args, eager.cos, eager.sin
        self.key = register(eager)
        base = eager.base
        norms = [(layer.input_norm.float(), layer.post_attn_norm.float()) for layer in base.layers]
        self.embed, self.norm, self.norms = as_parameters([base.embed, eager.norm, norms])
        n_heads, n_kv, dh = self.args.attn_shape
        self.qkv_width = (n_heads + 2 * n_kv) * dh
        self.eager_forwards = 0  # tells a compiled step that dynamo ran it eagerly (compiled.py)
        self._picks: list = []  # the compiled step clears it after a warm-up; the step's routing counts picks

    def forward(self, batch: Batch, cache: KVCache) -> torch.Tensor:
        """Hidden states after the final norm, [B, T, D] (batch.cache_operator: the cache is an operator)."""
        if not torch.compiler.is_compiling():
            self.eager_forwards += 1
        x = F.embedding(batch.tokens, self.embed).float()  # [B, T, D]
        b, t, d = x.shape
        cos, sin = self.cos[batch.positions].unsqueeze(1), self.sin[batch.positions].unsqueeze(1)
        eps, ops = self.args.eps, torch.ops.mergeserve
        for i, (input_norm, post_attn_norm) in enumerate(self.norms):
            h = rms_norm(x, input_norm, eps).view(b * t, d)
            qkv = ops.base_projection(h, self.key, i, 0, self.qkv_width).view(b, t, -1)
            y = attend(qkv, self.args.attn_shape, cos, sin, None, batch, cache, i)  # [B, T, H * Dh]
            x = x + ops.base_projection(y.view(b * t, -1), self.key, i, 1, d).view(b, t, d)
            x = x + ops.base_ffn(rms_norm(x, post_attn_norm, eps), self.key, i)
        return rms_norm(x, self.norm, eps)


# Up to this many router rows in all (compositions x experts) every token is scored by every router
# in one matmul; past it each token's own rows are gathered (a hundred compositions).
ROUTER_MATMUL_MAX_ROWS = 256


def _attention_weights(run: RunLayer, lt: LayerTables) -> tuple:
    """Layer weights q/k/v and o as a step runs them: with the anchor's terms folded in, where there is one."""
    return (lt.qkv, lt.o) if lt.anchor is not None else (run.qkv, run.o_proj)


def _is_anchor(part, anchor: Fixed | None) -> bool:
    """Whether a layer part's terms are exactly those its layer's weights hold."""
    if anchor is None:
        return part is None
    return isinstance(part, Fixed) and part.key == anchor.key


def _terms(part) -> int:
    """How many terms a token of this attention part carries."""
    if part is None:
        return 0
    return part.top_k if isinstance(part, Routed) else len(part.entries)


def _entries(deltas) -> int:
    """Entries of a layer's RoutedAttention (its gate's width)."""
    d = deltas.qkv or deltas.o
    a = d.a.source if hasattr(d.a, "source") else d.a
    return a.shape[0] // d.rank
