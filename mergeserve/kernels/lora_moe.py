"""MoE FFN of LoRA experts over one shared base FFN: about one dense FFN per token, whatever k and E.

Expert e's FFN is (W_d + dD_e) (silu((W_g + dG_e) x) * (W_u + dU_e) x), each delta B A.
- The base gate/up run once for all tokens ([2I, D], one matmul).
- All experts' gate/up A are stacked ([E * 2r, D]): one matmul gives every x A^T.
- The low-rank terms of each (token, expert) assignment are then batched by one of three
  strategies, chosen by the batch's shape (no per-token Python, no host sync but in `grouped`):
  `masked`: each pick's x A^T kept in its own expert's block of an [E * r] row, zeros
  elsewhere, times all experts' B stacked ([E * r, I]): plain matmuls over factor tables read
  once, which a WeightPacker can pack (few experts: decode and prefill);
  `gathered`: each assignment's own B gathered and applied by bmm (T * k < E, E > 8: decode
  over many experts, reading only the routed factors);
  `grouped`: assignments sorted by expert, one segment matmul per expert that has any
  (large batches over many experts: prefill).
- The base down projection runs once, on the routing-weighted sum of the experts'
  activations; the experts' down deltas are added: sum_k w_k B_e (A_e act_k).

Ranks may differ: factors are zero-padded to the largest rank (zero rows add nothing).
An expert that is the base itself (every projection the base's own tensor) has rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mergeserve.weights import ExpertFFN, LowRank, Weight, row_blocks

from mergeserve.kernels.lowrank import Pack, linear
from mergeserve.kernels.packed import Packed, pack_private

MASKED_MAX_EXPERTS = 8  # beyond this, reading every expert's factors per token costs more than gathering
GROUPED_MIN_TOKENS = 64  # batches this large over many experts go expert by expert


FACTOR_TABLES = ("a_in", "b_gate", "b_up", "a_down", "b_down")


@dataclass(eq=False)
class FusedTables:
    """The masked strategy's matmuls with base and factors side by side (each packed)."""

    gate_up_a: Packed  # [2I + E * 2r, D]: base gate, base up, then every expert's A_gate / A_up
    b_gate_up: Packed  # [2I, 2 E r]: blockdiag(B_gate, B_up)
    down_b: Packed  # [D, I + E r]: base down, then every expert's B_down


@dataclass(eq=False)
class LoraExperts:
    """One MoE layer's LoRA experts over one base FFN, factors stacked (scale folded into B).

    Weights are in F.linear's [out, in] convention, so each may be packed for oneDNN.
    """

    gate_up: torch.Tensor | Packed  # [2I, D] base gate rows, then base up rows
    down: torch.Tensor | Packed  # [D, I]
    a_in: torch.Tensor | Packed  # [E * 2r, D]: per expert its gate A (r rows), then its up A
    b_gate: torch.Tensor | Packed  # [I, E * r]: column block e is expert e's scale * B_gate
    b_up: torch.Tensor | Packed  # [I, E * r]
    a_down: torch.Tensor | Packed  # [E * r, I]
    b_down: torch.Tensor | Packed  # [D, E * r]
    member: torch.Tensor  # [E] bool: the expert runs here (False: a dense expert, zero factors)
    rank: int
    fused: FusedTables | None = None  # base and factors in shared matmuls (packed builds only)

    @property
    def num_experts(self) -> int:
        return self.member.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.per_expert("a_down").dtype

    def packed(self, pack: Pack) -> LoraExperts:
        """The tables as `pack` runs them (packed for oneDNN, or int8). With few experts (the masked strategy reads every table
        whole) base and factors are also fused into shared matmuls: four oneDNN calls per layer
        instead of seven. The fused copies are this composition's own; the plain factor tables
        stay beside them (small with so few experts) for the other strategies' per-expert views."""
        a_down = pack.factors(self.a_down)
        # Many experts, or factors that do not pack (int8 keeps them apart from its bases: a row of
        # the fused tables would share one scale between base and factor columns).
        if self.num_experts > MASKED_MAX_EXPERTS or not isinstance(a_down, Packed):
            keep = isinstance(a_down, Packed)  # many experts: the other strategies read the plain tables
            factors = {n: getattr(self, n) if keep else pack.factors(getattr(self, n)) for n in FACTOR_TABLES}
            return LoraExperts(**{**vars(self), **factors, "gate_up": pack(self.gate_up), "down": pack(self.down)})
        fused = FusedTables(
            gate_up_a=pack_private(torch.cat([self.gate_up, self.a_in])),
            b_gate_up=pack_private(torch.block_diag(self.b_gate, self.b_up)),
            down_b=pack_private(torch.cat([self.down, self.b_down], dim=1)),
        )
        return LoraExperts(**{**vars(self), "a_down": a_down, "fused": fused})

    def per_expert(self, name: str) -> torch.Tensor:
        """A B table as [E, r, out] (each expert's B^T) or an A table as [E, r, in]: a view of the plain table."""
        t = getattr(self, name)
        t = t.source if isinstance(t, Packed) else t
        e, r = self.num_experts, self.rank
        return t.view(e, r, -1) if name in ("a_in", "a_down") else t.view(-1, e, r).permute(1, 2, 0)

    @classmethod
    def build(cls, experts: list[ExpertFFN]) -> LoraExperts | None:
        """Stack the experts that are LoRA deltas of one base FFN; None when no expert is."""
        bases = [shared_base(experts, p) for p in ("gate_proj", "up_proj", "down_proj")]
        if any(b is None for b in bases) or not any(isinstance(w, LowRank) for e in experts for w in vars(e).values()):
            return None
        member = [all(is_over(getattr(e, p), b) for p, b in zip(("gate_proj", "up_proj", "down_proj"), bases)) for e in experts]
        base_gate, base_up, base_down = bases
        dtype = base_gate.dtype
        r = max(w.rank for e in experts for w in vars(e).values() if isinstance(w, LowRank))
        factors = [[_padded(getattr(e, p), r, dtype) if m else None for p in ("gate_proj", "up_proj", "down_proj")]
                   for e, m in zip(experts, member)]
        zeros = (torch.zeros(r, base_gate.shape[1], dtype=dtype), torch.zeros(base_gate.shape[0], r, dtype=dtype))
        zeros_down = (torch.zeros(r, base_down.shape[1], dtype=dtype), torch.zeros(base_down.shape[0], r, dtype=dtype))
        gate = [f[0] or zeros for f in factors]
        up = [f[1] or zeros for f in factors]
        down = [f[2] or zeros_down for f in factors]
        return cls(
            gate_up=row_blocks([base_gate, base_up]), down=base_down,
            a_in=torch.cat([torch.cat([g[0], u[0]]) for g, u in zip(gate, up)]),
            b_gate=torch.cat([g[1] for g in gate], dim=1), b_up=torch.cat([u[1] for u in up], dim=1),
            a_down=torch.cat([d[0] for d in down]), b_down=torch.cat([d[1] for d in down], dim=1),
            member=torch.tensor(member), rank=r,
        )


def shared_base(experts: list[ExpertFFN], proj: str) -> torch.Tensor | None:
    """The base tensor of `proj` that the LoRA experts share; None when they share none."""
    for e in experts:
        if isinstance(w := getattr(e, proj), LowRank):
            return w.base
    plain = [getattr(e, proj) for e in experts]  # no expert adapts proj: it is LoRA-able only if all share it
    return plain[0] if all(p.data_ptr() == plain[0].data_ptr() for p in plain) else None


def is_over(w: Weight, base: torch.Tensor) -> bool:
    """Whether `w` is `base` itself or a low-rank delta over it."""
    t = w.base if isinstance(w, LowRank) else w
    return t.data_ptr() == base.data_ptr() and t.shape == base.shape


def _padded(w: Weight, r: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A [r, in], scale * B [out, r]) zero-padded to rank r; None for the base itself (rank 0)."""
    if not isinstance(w, LowRank):
        return None
    a, b = w.a.to(dtype), w.scaled_b(dtype)
    return F.pad(a, (0, 0, 0, r - w.rank)), F.pad(b, (0, r - w.rank))


def choose_strategy(tokens: int, k: int, experts: int) -> str:
    if experts <= MASKED_MAX_EXPERTS:
        return "masked"
    return "gathered" if tokens * k < experts or tokens < GROUPED_MIN_TOKENS else "grouped"


def lora_moe_ffn(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, lx: LoraExperts, strategy: str | None = None,
) -> torch.Tensor:
    """x [T, D], weights/ids [T, k] -> [T, D]. Picks of experts that are not members must come with weight 0."""
    t, k = ids.shape
    e, r = lx.num_experts, lx.rank
    strategy = strategy or choose_strategy(t, k, e)
    x, weights = x.to(lx.dtype), weights.to(lx.dtype)  # the residual stream may be fp32 over bf16 weights
    if strategy == "masked":
        return mixed_lora_ffn(x, weights, x.new_zeros(t, k, e).scatter_(2, ids.unsqueeze(-1), 1.0), lx)
    g, u = linear(x, lx.gate_up).chunk(2, dim=-1)  # [T, I] each: the base, once per token
    xa = linear(x, lx.a_in).view(t, e, 2, r)  # [T, E, 2, r]: every x A^T (gate, up)
    if strategy == "grouped":
        return _grouped(x, g, u, xa, weights, ids, lx)
    sel = xa[torch.arange(t).unsqueeze(1), ids]  # [T, k, 2, r]
    dg = (sel[:, :, 0].unsqueeze(2) @ lx.per_expert("b_gate")[ids]).squeeze(2)  # [T, k, 1, r] @ [T, k, r, I]
    du = (sel[:, :, 1].unsqueeze(2) @ lx.per_expert("b_up")[ids]).squeeze(2)
    act = F.silu(g.unsqueeze(1) + dg) * (u.unsqueeze(1) + du)  # [T, k, I]
    w = weights.unsqueeze(-1)  # [T, k, 1]
    out = linear(_weighted_sum(act, weights), lx.down)  # [T, D]: the base down once, on the weighted sum
    ad = (lx.per_expert("a_down")[ids] @ act.unsqueeze(-1)).squeeze(-1) * w  # [T, k, r, I] @ [T, k, I, 1] -> [T, k, r]
    return out + (ad.unsqueeze(2) @ lx.per_expert("b_down")[ids]).squeeze(2).sum(1)  # [T, k, 1, r] @ [T, k, r, D]


def mixed_lora_ffn(x: torch.Tensor, weights: torch.Tensor, coef: torch.Tensor, lx: LoraExperts) -> torch.Tensor:
    """The masked strategy, for any mixture of the experts' deltas in each of a token's k slots:
    x [T, D], weights [T, k] (each slot's output weight), coef [T, k, E] -> [T, D].

    Slot j of token t runs the FFN (W + sum_e coef[t, j, e] dW_e); the slots' outputs are summed
    with `weights`. A routed pick is a one-hot row (an MoE); a merge of experts inside one FFN
    (per-request or fixed) is a single slot whose row holds the merge's coefficients.

    Each slot's x A^T is kept in the blocks of its experts, scaled by their coefficients, then
    every expert's B runs at once. With `fused` tables (packed builds) the base and the factors
    share each matmul: [W_gate; W_up; A_in] x, blockdiag(B_gate, B_up) z, and [W_down | B_down] [h; z_down]."""
    x, weights, coef = x.to(lx.dtype), weights.to(lx.dtype), coef.to(lx.dtype)
    t, k, e = coef.shape
    r = lx.rank
    n_inter = lx.a_down.shape[1]  # I
    w = weights.unsqueeze(-1)  # [T, k, 1]
    fused = lx.fused
    if fused is not None:
        gu, xa = linear(x, fused.gate_up_a).split([2 * n_inter, 2 * e * r], dim=-1)  # [T, 2I], [T, E * 2r]
    else:
        gu, xa = linear(x, lx.gate_up), linear(x, lx.a_in)
    z = xa.view(t, 1, e, 2, r) * coef[..., None, None]  # [T, k, E, 2, r]: each slot's experts, scaled
    if fused is not None:
        dgu = linear(z.transpose(2, 3).reshape(t, k, 2 * e * r), fused.b_gate_up)  # [T, k, 2I]
    else:
        dgu = torch.cat([linear(z[:, :, :, i].reshape(t, k, e * r), b) for i, b in enumerate((lx.b_gate, lx.b_up))], -1)
    g, u = (gu.unsqueeze(1) + dgu).chunk(2, dim=-1)  # [T, k, I] each
    act = F.silu(g) * u  # [T, k, I]
    h = _weighted_sum(act, weights)  # [T, I]: the routing-weighted activations, for the base down
    ad = linear(act, lx.a_down).view(t, k, e, r)  # [T, k, E, r]: every expert's A on each pick
    z_down = (ad * (coef * w).unsqueeze(-1)).sum(1).view(t, e * r)  # [T, E * r]: weighted, each slot's experts
    if fused is not None:
        return linear(torch.cat([h, z_down], dim=-1), fused.down_b)
    return linear(h, lx.down) + linear(z_down, lx.b_down)


def _weighted_sum(act: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[:, k] * act[:, k] for act [T, k, I], weights [T, k]: k fused multiply-adds.
    bf16 `(w * act).sum(1)` measured 5x slower at prefill (490 vs 97 us, 247 tokens, k = 2)."""
    h = act[:, 0] * weights[:, :1]
    for j in range(1, act.shape[1]):
        h = torch.addcmul(h, act[:, j], weights[:, j:j + 1])
    return h


def _grouped(x, g, u, xa, weights, ids, lx: LoraExperts) -> torch.Tensor:
    """Assignments sorted by expert; one segment matmul per expert that has any."""
    t, k = ids.shape
    flat, w = ids.reshape(-1), weights.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)
    sizes = torch.bincount(flat, minlength=lx.num_experts).tolist()
    token = order // k  # [A]
    b_gate, b_up, a_down, b_down = (lx.per_expert(n) for n in ("b_gate", "b_up", "a_down", "b_down"))
    hidden = x.new_zeros(t, g.shape[1])  # [T, I]: sum_k w_k act_k
    delta = torch.zeros_like(x)  # [T, D]: sum_k w_k B_d (A_d act_k)
    start = 0
    for e, n in enumerate(sizes):
        if not n:
            continue
        tok, we = token[start:start + n], w[order[start:start + n]].unsqueeze(1)  # [n], [n, 1]
        start += n
        a = xa[tok, e]  # [n, 2, r]
        act = F.silu(g[tok] + a[:, 0] @ b_gate[e]) * (u[tok] + a[:, 1] @ b_up[e])  # [n, I]
        hidden.index_add_(0, tok, we * act)
        delta.index_add_(0, tok, we * ((act @ a_down[e].T) @ b_down[e]))
    return linear(hidden, lx.down) + delta
