"""Per-token mixtures of low-rank deltas over one shared weight: routed attention's projections.

Expert e's weight is W + B_e A_e. A token with gate g [E] (its routing weights, zero for the
experts it did not pick) gets W x + sum_e g_e B_e (A_e x). The delta is linear in g, so two
matmuls serve any k and E:
- one matmul by every expert's A stacked ([E * r, in]) gives each x A_e^T;
- the gate scales each expert's block of r columns;
- one matmul by every expert's B side by side ([out, E * r]) sums the scaled deltas.
A composition's few to tens of experts make E * r a few hundred columns: less than a tenth
of the base projection's work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mergeserve.weights import ExpertFFN, LowRank, Weight, row_blocks

from mergeserve.kernels.lora_moe import is_over, shared_base
from mergeserve.kernels.lowrank import Pack, linear
from mergeserve.kernels.packed import Packed


@dataclass(eq=False)
class RoutedLowRank:
    a: torch.Tensor | Packed  # [E * r, in]: expert e's A in rows [e r, (e + 1) r)
    b: torch.Tensor | Packed  # [out, E * r]: expert e's scale * B in columns [e r, (e + 1) r)
    rank: int  # r, the largest expert's (smaller ranks are zero-padded)

    def __call__(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x [N, in], gate [N, E] -> sum_e gate[:, e] B_e A_e x, [N, out]."""
        n = x.shape[0]
        xa = linear(x, self.a).view(n, -1, self.rank)  # [N, E, r]
        return linear((xa * gate.to(xa.dtype).unsqueeze(-1)).view(n, -1), self.b)

    def packed(self, pack: Pack) -> RoutedLowRank:
        return RoutedLowRank(pack.factors(self.a), pack.factors(self.b), self.rank)

    @classmethod
    def stack(cls, experts: list[list[Weight]], dtype: torch.dtype) -> RoutedLowRank | None:
        """Per expert, the weights that run side by side as one projection (q, k, v; or o alone),
        each a LowRank or the base itself (rank 0). None when no expert adapts any of them."""
        sides = [_side_by_side(ws, dtype) for ws in experts]  # E x (A [r_e, in], B [out, r_e])
        r = max(a.shape[0] for a, _ in sides)
        if r == 0:
            return None
        a = torch.cat([F.pad(a, (0, 0, 0, r - a.shape[0])) for a, _ in sides])
        b = torch.cat([F.pad(b, (0, r - b.shape[1])) for _, b in sides], dim=1)
        return cls(a, b, r)


def _side_by_side(ws: list[Weight], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of weights whose outputs are concatenated: A stacked, B block-diagonal."""
    a = [w.a.to(dtype) if isinstance(w, LowRank) else torch.zeros(0, w.shape[1], dtype=dtype) for w in ws]
    b = [w.scaled_b(dtype) if isinstance(w, LowRank) else torch.zeros(w.shape[0], 0, dtype=dtype) for w in ws]
    return torch.cat(a), torch.block_diag(*b)


@dataclass(eq=False)
class RoutedAttention:
    """One layer's routed attention deltas: q/k/v fused, and o."""

    qkv: RoutedLowRank | None
    o: RoutedLowRank | None

    @classmethod
    def build(cls, attns: list, dtype: torch.dtype, pack: Pack | None = None) -> RoutedAttention:
        """attns: each expert's composition.Attention over the layer's base attention."""
        qkv = RoutedLowRank.stack([[a.q_proj, a.k_proj, a.v_proj] for a in attns], dtype)
        o = RoutedLowRank.stack([[a.o_proj] for a in attns], dtype)
        if pack is not None:
            qkv, o = (d.packed(pack) if d is not None else None for d in (qkv, o))
        return cls(qkv, o)


@dataclass(eq=False)
class DynamicFFN:
    """The FFN of `router.attention: dynamic`, merged per token from LoRA experts over one base
    FFN: with gate g, (W_d + sum g_e dD_e) (silu((W_g + sum g_e dG_e) x) * (W_u + sum g_e dU_e) x).
    The weights are never materialised: the base projections plus routed deltas."""

    gate_up: torch.Tensor | Packed  # [2I, D]: the base's gate rows, then its up rows
    down: torch.Tensor | Packed  # [D, I]
    gate_up_deltas: RoutedLowRank | None
    down_deltas: RoutedLowRank | None

    def __call__(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x [N, D], gate [N, E] -> [N, D]."""
        gu = linear(x, self.gate_up)  # [N, 2I]
        if self.gate_up_deltas is not None:
            gu = gu + self.gate_up_deltas(x, gate)
        g, u = gu.chunk(2, dim=-1)
        act = F.silu(g) * u  # [N, I]
        out = linear(act, self.down)
        return out if self.down_deltas is None else out + self.down_deltas(act, gate)

    @classmethod
    def build(cls, experts: list[ExpertFFN], pack: Pack | None = None) -> DynamicFFN:
        """experts: LoRA experts over one base FFN (or the base itself)."""
        gate, up, down = (shared_base(experts, p) for p in ("gate_proj", "up_proj", "down_proj"))
        bases = {"gate_proj": gate, "up_proj": up, "down_proj": down}
        if any(b is None or not all(is_over(getattr(e, p), b) for e in experts) for p, b in bases.items()):
            raise ValueError("per-request merging needs every expert's FFN to be the base's or LoRA factors over it")
        gate_up, dtype = row_blocks([gate, up]), gate.dtype
        gu = RoutedLowRank.stack([[e.gate_proj, e.up_proj] for e in experts], dtype)
        d = RoutedLowRank.stack([[e.down_proj] for e in experts], dtype)
        if pack is None:
            return cls(gate_up, down, gu, d)
        return cls(pack(gate_up), pack(down), *(x.packed(pack) if x is not None else None for x in (gu, d)))
