"""LoRA terms over a table of many adapters, read from the adapters' own factors.

A base engine with many compositions holds many adapters (a pool of a hundred), and each token
uses two or three of them. Stacking every adapter's factors into one table would copy the pool
(a GB for a hundred rank-16 adapters of a 135M model) and make every token read all of it. Here
each projection keeps a list of the entries' own tensors; a forward slices out the entries its
tokens use (U of them: at most tokens x picks, usually far fewer) and runs them as one dense
table, with each token's gate zero outside its own entries. A dense [N, U r] matmul beats
gathering each token's factors and multiplying them one by one (torch.bmm of matrix-vector
products): measured on an AMX Xeon, one thread, 16 tokens x 2 of 100 rank-16 adapters, 576 -> 1536,
bf16: 0.41 ms against 0.67 ms per projection, copies included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mergeserve.kernels.lora_moe import LoraExperts, mixed_lora_ffn
from mergeserve.kernels.lowrank import linear
from mergeserve.kernels.packed import Packed
from mergeserve.weights import LowRank, Weight


@dataclass(eq=False)
class EntryFactors:
    """One projection's factors for each entry of a table: A [r, in] and B^T [r, out], the adapters'
    own tensors (cast once where their dtype is not the compute dtype; zero-padded to a common
    rank where ranks differ; zeros for an entry that does not adapt this projection). The pool
    keeps B as the transpose of a contiguous [r, out], so B^T's rows are contiguous."""

    a: list[torch.Tensor]
    bt: list[torch.Tensor]
    scale: list[float]
    rank: int

    @classmethod
    def of(cls, ws: list[Weight], dtype: torch.dtype, rank: int | None = None) -> EntryFactors:
        """ws: each entry's weight of this projection (a LowRank, or the base itself)."""
        r = rank if rank is not None else max((w.rank for w in ws if isinstance(w, LowRank)), default=0)
        out, inp = ws[0].shape
        zero_a, zero_bt = torch.zeros(r, inp, dtype=dtype), torch.zeros(r, out, dtype=dtype)
        a, bt, scale = [], [], []
        for w in ws:
            if not isinstance(w, LowRank):
                a.append(zero_a), bt.append(zero_bt), scale.append(1.0)
                continue
            wa, wbt = w.a.to(dtype), w.b.t().to(dtype)  # the adapter's own tensors where dtype and rank match
            a.append(wa if w.rank == r else F.pad(wa, (0, 0, 0, r - w.rank)))
            bt.append(wbt if w.rank == r else F.pad(wbt, (0, 0, 0, r - w.rank)))
            scale.append(w.scale)
        return cls(a, bt, scale, r)

    def scales(self, entries: list[int]) -> torch.Tensor:
        """The entries' LoRA scales, [U] fp32 (applied to the gates: no scaled copy of any B)."""
        return torch.tensor([self.scale[j] for j in entries])

    def b_of(self, entries: list[int]) -> torch.Tensor:
        """The entries' B side by side, [out, U r] (unscaled; a transposed view of their B^T stacked)."""
        return torch.cat([self.bt[j] for j in entries]).t()


class SparseGate:
    """Each token's few entries and their weights, [N, m] each (weight 0 pads), and the same as a
    dense gate over the entries any token uses."""

    def __init__(self, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self.ids, self.weights = ids, weights
        self._dense: tuple[list[int], torch.Tensor] | None = None

    def dense(self) -> tuple[list[int], torch.Tensor]:
        """(the entries in use [U], each token's gate over them [N, U]), computed once."""
        if self._dense is None:
            used, local = torch.unique(self.ids, return_inverse=True)
            gate = self.weights.new_zeros(self.ids.shape[0], len(used)).scatter_add_(1, local, self.weights)
            self._dense = used.tolist(), gate
        return self._dense


@dataclass(eq=False)
class EntryTerms:
    """Projections that share an input and whose outputs lie side by side (q, k, v; or o alone)."""

    parts: list[EntryFactors]

    def __call__(self, x: torch.Tensor, gate: SparseGate) -> torch.Tensor:
        """x [N, in] -> sum over each token's entries of weight * scale * B A x, [N, sum of outs]."""
        used, dense = gate.dense()
        n, u = x.shape[0], len(used)
        xa = linear(x, torch.cat([p.a[j] for p in self.parts for j in used]))  # [N, sum_p U r_p]: one copy of the A's
        out = []
        for z, p in zip(xa.split([u * p.rank for p in self.parts], dim=-1), self.parts):
            z = z.view(n, u, p.rank) * (dense * p.scales(used)).to(z.dtype).unsqueeze(-1)
            out.append(linear(z.reshape(n, -1), p.b_of(used)))
        return torch.cat(out, dim=-1) if len(out) > 1 else out[0]


@dataclass(eq=False)
class EntryAttention:
    """A layer's attention entries, as RoutedAttention's face: q/k/v terms, and o."""

    qkv: EntryTerms
    o: EntryTerms

    @classmethod
    def of(cls, entries: list[list[Weight]], dtype: torch.dtype) -> EntryAttention:
        """entries: per entry its (q, k, v, o) weights."""
        q, k, v, o = (EntryFactors.of([e[p] for e in entries], dtype) for p in range(4))
        return cls(EntryTerms([q, k, v]), EntryTerms([o]))


@dataclass(eq=False)
class EntryFFN:
    """A layer's FFN entries over the base FFN: the LoRA-expert MoE's tables, sliced per forward."""

    gate_up: torch.Tensor | Packed  # [2I, D]: the base's gate rows, then its up rows
    down: torch.Tensor | Packed  # [D, I]
    gate: EntryFactors
    up: EntryFactors
    down_factors: EntryFactors

    @property
    def num_experts(self) -> int:
        return len(self.gate.a)

    @classmethod
    def of(cls, gate_up, down, entries: list[list[Weight]], dtype: torch.dtype) -> EntryFFN:
        """entries: per entry its (gate, up, down) weights; one rank for all three (LoraExperts')."""
        r = max((w.rank for e in entries for w in e if isinstance(w, LowRank)), default=0)
        gate, up, d = (EntryFactors.of([e[p] for e in entries], dtype, r) for p in range(3))
        return cls(gate_up, down, gate, up, d)

    def used(self, entries: list[int]) -> tuple[LoraExperts, torch.Tensor]:
        """The entries in use as a LoraExperts table of U experts (expert u: entries[u]), and the
        scale [U] that each expert's coefficients must carry (its B are unscaled)."""
        factors = (self.gate, self.up, self.down_factors)
        scales = [f.scales(entries) for f in factors]
        b = [f.b_of(entries) for f in factors]
        if not (torch.equal(scales[0], scales[1]) and torch.equal(scales[0], scales[2])):  # scale each B apart
            b = [bf * s.to(bf.dtype).repeat_interleave(f.rank) for bf, s, f in zip(b, scales, factors)]
            scales[0] = torch.ones(len(entries))
        a_in = torch.cat([t for j in entries for t in (self.gate.a[j], self.up.a[j])])  # per expert: gate A, up A
        a_down = torch.cat([self.down_factors.a[j] for j in entries])
        member = torch.ones(len(entries), dtype=torch.bool)
        return LoraExperts(self.gate_up, self.down, a_in, b[0], b[1], a_down, b[2], member, self.gate.rank), scales[0]


def entry_moe_ffn(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, table: EntryFFN) -> torch.Tensor:
    """The LoRA-expert MoE over the entries the tokens pick: x [T, D], weights and entry ids [T, k]."""
    used, local = torch.unique(ids, return_inverse=True)
    lx, scale = table.used(used.tolist())
    coef = torch.zeros(*ids.shape, len(used)).scatter_(2, local.unsqueeze(-1), scale[local].unsqueeze(-1))  # [T, k, U]
    return mixed_lora_ffn(x, weights, coef, lx)


def entry_mixed_ffn(x: torch.Tensor, weights: torch.Tensor, coef: torch.Tensor, table: EntryFFN) -> torch.Tensor:
    """mixed_lora_ffn over the entries any slot weighs: coef [T, k, entries]."""
    used = coef.ne(0).any(dim=1).any(dim=0).nonzero().view(-1)
    if len(used) == 0:
        used = torch.zeros(1, dtype=torch.long)
    lx, scale = table.used(used.tolist())
    return mixed_lora_ffn(x, weights, coef[:, :, used] * scale, lx)
