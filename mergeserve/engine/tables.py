"""Compositions over one base as tables: what lets one engine per base serve them all.

A composition is *low-rank over its base* when every tensor it runs is the base's own, or the
base plus LoRA factors of the pool's adapters chosen per token, per request or once:
- BTX's averaged attention is base + (1/E) sum_e B_e A_e: fixed terms;
- a token-routed FFN (or routed attention) picks its experts' deltas per token;
- per-request merging (router.attention: dynamic) mixes them by the request's alpha;
- a single adapter, or a linear merge of adapters, is a fixed set of terms.

`FactorTables` (one per base engine) stacks the factors of every adapter placed on the engine,
layer by layer: attention deltas in one table, FFN deltas in another, each entry an adapter's
projections (shared by every composition that uses it, counted by reference).
`CompositionTables` is one composition's part: per layer, which entries it uses and how they are
weighted (router rows, fixed coefficients, or the request's alpha). Adding a composition adds
its router rows and entry references; it copies no base tensor.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch.nn.utils.rnn import pad_sequence

from mergeserve.composition import Attention, ComposedModel, Layer
from mergeserve.kernels.entry_lora import EntryAttention, EntryFFN
from mergeserve.kernels.lora_moe import MASKED_MAX_EXPERTS, LoraExperts
from mergeserve.kernels.lowrank import FACTOR_DTYPE, Pack
from mergeserve.kernels.packed import Packed
from mergeserve.kernels.routed_lowrank import RoutedAttention
from mergeserve.weights import ExpertFFN, LowRank, Weight, row_blocks

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# Up to this many entries a layer's factors are stacked into tables that every token runs whole
# (dense gates, the masked FFN kernel: plain matmuls); past it they stay the adapters' own
# tensors and each forward slices out the entries its tokens use (kernels/entry_lora.py).
DENSE_MAX_ENTRIES = MASKED_MAX_EXPERTS
FFN = ("gate_proj", "up_proj", "down_proj")


class NotLowRank(ValueError):
    """The composition is not the base plus adapter terms; the message says which part is not."""


# --- how a layer part weighs its entries ----------------------------------------------------------

@dataclass(eq=False)
class Fixed:
    """The same terms for every token: sum_i coef_i * entry_i (BTX's averaged attention, a single
    adapter, a linear merge of adapters)."""

    entries: torch.Tensor  # [m] table entries
    coef: torch.Tensor  # [m] fp32

    @cached_property
    def key(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The terms themselves: equal keys, the same weights (entries are stable while referenced)."""
        return tuple(self.entries.tolist()), tuple(self.coef.tolist())

    def row(self, size: int) -> torch.Tensor:
        """The terms as one gate row over a table of `size` entries, [size]."""
        return torch.zeros(size).index_put_((self.entries,), self.coef, accumulate=True)


@dataclass(eq=False)
class Routed:
    """Per token: the top-k of the composition's experts by its router rows (renormalised softmax)."""

    entries: torch.Tensor  # [E] the table entry of each expert
    router: torch.Tensor  # [E, D] fp32
    top_k: int


@dataclass(eq=False)
class PerRequest:
    """Per request: the experts weighted by the request's alpha [E] (a mixture router's choice).
    merged: one FFN with the deltas mixed inside it (dynamic); else an MoE of the chosen experts."""

    entries: torch.Tensor  # [E]
    merged: bool


Part = Fixed | Routed | PerRequest | None  # None: the base's own


@dataclass(eq=False)
class LayerPlan:
    attention: Part
    ffn: Part


@dataclass(eq=False)
class CompositionTables:
    """One composition as a base engine runs it: per layer its plan over the engine's tables."""

    composed: ComposedModel  # its routers, tokenizer, mixture routing and names; its base tensors are the engine's
    layers: list[LayerPlan]
    keys: list[tuple[tuple, tuple]]  # per layer, (attention keys, FFN keys) it holds in the FactorTables
    mixture_router: object | None = None  # engine.mixture_router.MixtureRouter, set by the engine that places it
    # Router statistics, as an engine of its own keeps them: token picks and their weight [L, E];
    # requests that chose each expert under a mixture router [E].
    expert_load: torch.Tensor = field(init=False)
    expert_weight: torch.Tensor = field(init=False)
    expert_requests: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        shape = (len(self.layers), self.num_experts)
        self.expert_load = torch.zeros(shape, dtype=torch.int64)
        self.expert_weight = torch.zeros(shape, dtype=torch.float64)
        self.expert_requests = torch.zeros(self.num_experts, dtype=torch.int64)

    @property
    def name(self) -> str:
        return self.composed.name

    @property
    def num_experts(self) -> int:
        return self.composed.num_experts


@dataclass(eq=False)
class RouterTable:
    """The token routers of one layer part for several compositions side by side: tokens of any mix
    of them are routed at once, each by its own composition's rows (slot c)."""

    rows: torch.Tensor  # [C, E, D] fp32: slot c's router rows (zeros past its experts, or where it routes nothing here)
    entries: torch.Tensor  # [C, E] the table entry of each of slot c's experts
    top_k: torch.Tensor  # [C]

    @classmethod
    def of(cls, parts: list[Part]) -> RouterTable:
        """Slot c: parts[c] (its rows where it is Routed)."""
        routed = [p for p in parts if isinstance(p, Routed)]
        e, d = max(p.router.shape[0] for p in routed), routed[0].router.shape[1]
        rows, entries = torch.zeros(len(parts), e, d), torch.zeros(len(parts), e, dtype=torch.long)
        top_k = torch.ones(len(parts), dtype=torch.long)
        for c, p in enumerate(parts):
            if isinstance(p, Routed):
                rows[c, :len(p.router)], entries[c, :len(p.entries)], top_k[c] = p.router, p.entries, p.top_k
        return cls(rows, entries, top_k)


@dataclass(eq=False)
class FixedTable:
    """The fixed terms of one layer part for several compositions side by side (slot c): entry ids
    and coefficients [C, m], weight 0 padding (and all of a slot without fixed terms there)."""

    ids: torch.Tensor  # [C, m] long
    coef: torch.Tensor  # [C, m] fp32

    @classmethod
    def of(cls, parts: list[Part]) -> FixedTable:
        fixed = [p if isinstance(p, Fixed) else None for p in parts]
        none, zero = torch.zeros(0, dtype=torch.long), torch.zeros(0)
        return cls(pad_sequence([p.entries if p else none for p in fixed], batch_first=True),
                   pad_sequence([p.coef if p else zero for p in fixed], batch_first=True))


class RouterTables:
    """Per layer, the FFN routers and the fixed attention terms of every composition placed on a
    base engine, side by side: built when a composition is placed or removed, so no step stacks them."""

    def __init__(self, placed: list[CompositionTables]) -> None:
        self.slot = {id(c): j for j, c in enumerate(placed)}
        layers = len(placed[0].layers) if placed else 0
        self.ffn: list[RouterTable | None] = []
        self.attention: list[FixedTable | None] = []
        for i in range(layers):
            parts = [c.layers[i].ffn for c in placed]
            self.ffn.append(RouterTable.of(parts) if any(isinstance(p, Routed) for p in parts) else None)
            parts = [c.layers[i].attention for c in placed]
            self.attention.append(FixedTable.of(parts) if any(isinstance(p, Fixed) for p in parts) else None)


# --- recognising a low-rank composition -----------------------------------------------------------

@dataclass(frozen=True)
class BaseWeights:
    """The base tensors a base engine runs; compositions over it hold exactly these."""

    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor
    layers: list[Layer]  # plain: base attention (no deltas), one ExpertFFN of the base's own projections

    def key(self) -> tuple[int, ...]:
        """Storage addresses of every base tensor: equal keys, one base."""
        ts = [self.embed, self.norm, self.lm_head]
        for layer in self.layers:
            ts += [layer.input_norm, layer.post_attn_norm, *(getattr(layer.attn, p) for p in ATTENTION)]
            ts += [b for b in (layer.attn.q_bias, layer.attn.k_bias, layer.attn.v_bias) if b is not None]
            ts += [getattr(layer.experts[0], p) for p in FFN]
        return tuple(t.data_ptr() for t in ts)


def base_of(composed: ComposedModel) -> BaseWeights:
    """The base under a composition (raises NotLowRank when a tensor is neither the base's nor
    base plus adapter terms)."""
    if composed.router_subspace:
        raise NotLowRank("its router scores subspaces (arrow, SMILE): a base engine runs plain router rows")
    seq = composed.mixture_routing
    if seq is not None and seq.separate:
        raise NotLowRank("router.attention: separate runs each expert's own layers")
    if not _has_factors(composed):
        raise NotLowRank("it holds no adapter factors: a dense model runs in an engine of its own")
    layers = []
    for i, layer in enumerate(composed.layers):  # (a mixture router's expert_layers score prompts only)
        attn = Attention(*(_base([getattr(layer.attn, p)], f"layer {i} {p}") for p in ATTENTION),
                         layer.attn.q_bias, layer.attn.k_bias, layer.attn.v_bias)
        ffn = ExpertFFN(*(_base([getattr(e, p) for e in layer.experts], f"layer {i} {p}") for p in FFN))
        layers.append(Layer(layer.input_norm, attn, layer.post_attn_norm, [ffn]))
    return BaseWeights(composed.embed, composed.norm, composed.lm_head, layers)


def _has_factors(composed: ComposedModel) -> bool:
    for layer in composed.layers:
        parts = [layer.attn, *layer.experts, *(layer.attn_experts or [])]
        if any(isinstance(w, LowRank) for part in parts for w in vars(part).values()):
            return True
    return False


def _base(ws: list[Weight], where: str) -> torch.Tensor:
    """The one tensor under `ws` (each that tensor or LoRA factors over it)."""
    bases = [w.base if isinstance(w, LowRank) else w for w in ws]
    if any(b.data_ptr() != bases[0].data_ptr() or b.shape != bases[0].shape for b in bases):
        raise NotLowRank(f"{where}: its experts are dense tensors of their own, not LoRA factors over one base")
    return bases[0]


def plan(composed: ComposedModel, base: BaseWeights, tables: FactorTables) -> CompositionTables:
    """`composed` as tables over `base`: its entries are added to `tables` (NotLowRank where it cannot be)."""
    if base_of(composed).key() != base.key():
        raise NotLowRank("it runs tensors of its own beyond adapter factors (merged shared layers, dense experts)")
    layers, keys = [], []
    for i, layer in enumerate(composed.layers):
        attention, attn_keys = _attention_plan(i, layer, composed, tables)
        ffn, ffn_keys = _ffn_plan(i, layer, composed, tables)
        layers.append(LayerPlan(attention, ffn))
        keys.append((attn_keys, ffn_keys))
    return CompositionTables(composed, layers, keys)


def _attention_plan(i: int, layer: Layer, composed: ComposedModel, tables: FactorTables) -> tuple[Part, tuple]:
    if layer.attn_experts:
        parts = [tuple(getattr(a, p) for p in ATTENTION) for a in layer.attn_experts]
        entries = tables.attention[i].add(parts)
        if layer.attn_router is not None:
            return Routed(entries, layer.attn_router.float(), composed.top_k), tuple(_key(p) for p in parts)
        return PerRequest(entries, merged=True), tuple(_key(p) for p in parts)
    ws = [getattr(layer.attn, p) for p in ATTENTION]
    if not any(isinstance(w, LowRank) for w in ws):
        return None, ()
    parts, coef = _terms(ws, f"layer {i} attention")
    return tables.hold_fixed(i, Fixed(tables.attention[i].add(parts), coef)), tuple(_key(p) for p in parts)


def _ffn_plan(i: int, layer: Layer, composed: ComposedModel, tables: FactorTables) -> tuple[Part, tuple]:
    if layer.is_moe:
        parts = [tuple(getattr(e, p) for p in FFN) for e in layer.experts]
        entries = tables.ffn[i].add(parts)
        keys = tuple(_key(p) for p in parts)
        if composed.mixture_routing is not None:
            return PerRequest(entries, merged=composed.mixture_routing.attention == "dynamic"), keys
        if layer.router is None:
            raise NotLowRank(f"layer {i} has experts and no router")
        return Routed(entries, layer.router.float(), composed.top_k), keys
    ws = [getattr(layer.experts[0], p) for p in FFN]
    if not any(isinstance(w, LowRank) for w in ws):
        return None, ()
    if all(not isinstance(w, LowRank) or w.terms is None for w in ws):  # one adapter's own factors
        parts, coef = [tuple(w if isinstance(w, LowRank) else None for w in ws)], torch.ones(1)
    else:
        parts, coef = _terms(ws, f"layer {i} FFN")
    return Fixed(tables.ffn[i].add(parts), coef), tuple(_key(p) for p in parts)


def _terms(ws: list[Weight], where: str) -> tuple[list[tuple], torch.Tensor]:
    """The adapters a merged part sums and their coefficients: side by side projections of one
    merge (q, k, v, o) must name the same inputs with the same coefficients."""
    terms = [w.terms if isinstance(w, LowRank) else None for w in ws]
    known = [t for t in terms if t is not None]
    if not known or any(isinstance(w, LowRank) and w.terms is None for w in ws):
        raise NotLowRank(f"{where}: LoRA factors that are not a merge of the pool's adapters")
    n = len(known[0])
    if any(len(t) != n or [c for _, c in t] != [c for _, c in known[0]] for t in known):
        raise NotLowRank(f"{where}: its projections merge different adapters")
    parts = [tuple(t[j][0] if t is not None else None for t in terms) for j in range(n)]
    return parts, torch.tensor([c for _, c in known[0]], dtype=torch.float32)


def _key(part: tuple) -> tuple[int, ...]:
    """An entry's identity: its projections' factor storages (0 for the base's own)."""
    return tuple(0 if w is None or not isinstance(w, LowRank) else w.a.data_ptr() for w in part)


# --- the stacked factors ----------------------------------------------------------------------------

@dataclass(eq=False)
class EntryTable:
    """One layer part's entries (each an adapter's projections, None for the base's own) and their
    reference counts. Entry indices are stable while referenced; a freed index is reused."""

    base: tuple[torch.Tensor, ...]  # the base's projections of this part
    parts: list[tuple | None] = field(default_factory=list)
    refs: list[int] = field(default_factory=list)
    index: dict[tuple, int] = field(default_factory=dict)
    version: int = 0  # bumped whenever the set of entries changes (the stacked tables are rebuilt)

    def add(self, parts: list[tuple]) -> torch.Tensor:
        """Reference `parts` (adding the new ones); their entry indices [len(parts)]."""
        out = []
        for part in parts:
            part = tuple(w if isinstance(w, LowRank) else None for w in part)
            key = _key(part)
            j = self.index.get(key)
            if j is None:
                j = self.parts.index(None) if None in self.parts else len(self.parts)
                if j == len(self.parts):
                    self.parts.append(None)
                    self.refs.append(0)
                self.parts[j], self.index[key] = part, j
                self.version += 1
            self.refs[j] += 1
            out.append(j)
        return torch.tensor(out, dtype=torch.long)

    def release(self, keys: tuple) -> None:
        for key in keys:
            j = self.index[key]
            self.refs[j] -= 1
            if self.refs[j] == 0:
                del self.index[key]
                self.parts[j] = None
                self.version += 1

    @property
    def size(self) -> int:
        return len(self.parts)

    def weights(self, j: int) -> list[Weight]:
        """Entry j's projections: its LoRA factors, or the base's own (a freed entry adds nothing)."""
        part = self.parts[j] or (None,) * len(self.base)
        return [w if w is not None else b for w, b in zip(part, self.base)]


@dataclass(eq=False)
class LayerTables:
    """One layer's stacked factors as the forward runs them (rebuilt when entries change)."""

    attention: RoutedAttention | EntryAttention | None  # over the attention entries; None: no entries
    ffn: LoraExperts | EntryFFN | None  # over the FFN entries; None: no entries
    # The attention terms most placed compositions share (BTX's average over the same experts),
    # folded into this layer's q/k/v and o weights: their tokens run no deltas, and every other
    # token's gate is taken relative to it. None: the base's own weights.
    anchor: Fixed | None = None
    qkv: torch.Tensor | Packed | None = None  # [q + k + v, D]: base + anchor terms
    o: torch.Tensor | Packed | None = None  # [D, H * Dh]


class FactorTables:
    """Every adapter placed on one base engine, per layer: attention entries and FFN entries, and
    the fixed attention terms each placed composition holds (the anchor's candidates)."""

    def __init__(self, base: BaseWeights, pack: Pack | None = None) -> None:
        self.base, self.pack = base, pack
        self.attention = [EntryTable(tuple(getattr(layer.attn, p) for p in ATTENTION)) for layer in base.layers]
        self.ffn = [EntryTable(tuple(getattr(layer.experts[0], p) for p in FFN)) for layer in base.layers]
        self.fixed: list[Counter] = [Counter() for _ in base.layers]  # per layer: Fixed.key -> compositions holding it
        self._built: list[tuple[tuple, LayerTables]] = []  # per layer: (versions and anchor key, tables)

    def hold_fixed(self, i: int, part: Fixed) -> Fixed:
        self.fixed[i][part.key] += 1
        return part

    def release(self, comp: CompositionTables) -> None:
        for i, (attn_keys, ffn_keys) in enumerate(comp.keys):
            if isinstance(part := comp.layers[i].attention, Fixed):
                self.fixed[i][part.key] -= 1
                self.fixed[i] += Counter()  # drops the keys no one holds
            self.attention[i].release(attn_keys)
            self.ffn[i].release(ffn_keys)

    def layers(self) -> list[LayerTables]:
        """The stacked tables of every layer, rebuilding only what changed in each."""
        if len(self._built) != len(self.attention):
            self._built = [((-1, -1, None), LayerTables(None, None))] * len(self.attention)
        for i, (attn, ffn) in enumerate(zip(self.attention, self.ffn)):
            (va, vf, anchor), built = self._built[i]
            now = (attn.version, ffn.version, self._anchor_key(i, anchor))
            if now == (va, vf, anchor):
                continue
            deltas = built.attention if va == attn.version else self._deltas(attn)
            experts = built.ffn if vf == ffn.version else self._experts(ffn)
            if now[2] == anchor:  # the anchor's entries are held, so its folded weights still hold
                self._built[i] = (now, LayerTables(deltas, experts, built.anchor, built.qkv, built.o))
            else:
                self._built[i] = (now, self._anchored(i, LayerTables(deltas, experts), now[2]))
        return [built for _, built in self._built]

    def _anchor_key(self, i: int, current: tuple | None) -> tuple | None:
        """The fixed attention terms most compositions hold (ties keep the current anchor)."""
        held = self.fixed[i]
        if not held:
            return None
        most = max(held.values())
        return current if held.get(current) == most else max(held, key=held.get)

    def _anchored(self, i: int, lt: LayerTables, key: tuple | None) -> LayerTables:
        """`lt` with the terms of `key` folded into copies of the layer's attention weights."""
        if key is None:
            return lt
        entries, coef = key
        table = self.attention[i]
        folded = []
        for p, base in enumerate(table.base):  # W + sum_j c_j B_j A_j, accumulated in fp32
            w = base.float()
            for j, c in zip(entries, coef):
                if isinstance(d := table.weights(j)[p], LowRank):
                    w = torch.addmm(w, d.scaled_b(torch.float32), d.a.float(), alpha=c)
            folded.append(w.to(base.dtype))
        pack = self.pack.private if self.pack is not None else (lambda t: t)
        anchor = Fixed(torch.tensor(entries, dtype=torch.long), torch.tensor(coef, dtype=torch.float32))
        return LayerTables(lt.attention, lt.ffn, anchor, pack(torch.cat(folded[:3])), pack(folded[3]))

    @staticmethod
    def _deltas(attn: EntryTable) -> RoutedAttention | EntryAttention | None:
        if not attn.size:
            return None
        entries = [attn.weights(j) for j in range(attn.size)]
        if attn.size > DENSE_MAX_ENTRIES:
            return EntryAttention.of(entries, attn.base[0].dtype)
        # Thin matmuls over the whole table: in FACTOR_DTYPE, unpacked (no fast bf16 path for them, kernels/lowrank.py).
        return RoutedAttention.build([Attention(*e) for e in entries], FACTOR_DTYPE)

    def _experts(self, ffn: EntryTable) -> LoraExperts | EntryFFN | None:
        entries = [ffn.weights(j) for j in range(ffn.size)]
        if not any(isinstance(w, LowRank) for e in entries for w in e):
            return None
        pack = self.pack if self.pack is not None else (lambda t: t)
        if ffn.size > DENSE_MAX_ENTRIES:
            gate, up, down = ffn.base
            return EntryFFN.of(pack(row_blocks([gate, up])), pack(down), entries, gate.dtype)
        experts = LoraExperts.build([ExpertFFN(*e) for e in entries])
        return experts.packed(pack) if self.pack is not None else experts
