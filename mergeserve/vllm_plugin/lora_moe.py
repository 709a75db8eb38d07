"""The LoRA-expert MoE MLP's math as the vLLM model runs it, without vLLM (so tests check it alone).

Every expert is the base FFN plus its LoRA factors. The base's gate/up and down projections run
once per token (vLLM's parallel linear layers, outside this module); each token's experts add
their low-rank terms:
    act_e = silu(g + B_g,e A_g,e x) * (u + B_u,e A_u,e x)     (g, u: the base's projections of x)
    out   = W_d (sum_e w_e act_e) + sum_e w_e B_d,e A_d,e act_e
with w the renormalised softmax over each token's top-k router logits (zero for the experts it
did not pick). With a few experts (BTX's three to eight), every expert's terms run for every
token as batched matmuls (no gathers, no data-dependent shapes: torch.compile keeps one graph),
weighted by the dense gate. The LoRA scales are folded into the B factors at export.

Tensor parallelism: gate/up's rows and down's columns are split over the ranks (intermediate
dimension I), and so are the B factors of gate and up ([E, I, r]) and the A factor of down
([E, r, I]); the other factors are replicated. Each rank's down terms are partial sums, added to
its partial base down projection before the one all-reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Exported tensor names under `model.layers.{i}.mlp.`, their layout, and the dimension split
# over tensor-parallel ranks (None: replicated).
FACTORS = {
    "router": ("[E, D]", None),
    "gate_a": ("[E, r, D]", None),
    "gate_b": ("[E, I, r]", 1),
    "up_a": ("[E, r, D]", None),
    "up_b": ("[E, I, r]", 1),
    "down_a": ("[E, r, I]", 2),
    "down_b": ("[E, D, r]", None),
}


def route(x: torch.Tensor, router: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mixtral routing in fp32 as a dense gate [T, E]: the softmax over each token's top-k logits."""
    logits = x.float() @ router.float().t()  # [T, E]
    top, ids = torch.topk(logits, top_k, dim=-1)
    return torch.zeros_like(logits).scatter_(1, ids, torch.softmax(top, dim=-1))


def expert_terms(
    x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, gate: torch.Tensor, f: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D]; g, u [T, I] the base's gate and up projections of x; gate [T, E]; f the factors
    (FACTORS' names). Returns the base down projection's input [T, I] and the down terms [T, D]."""
    w = gate.to(x.dtype)
    gates = g.unsqueeze(1) + torch.einsum("ter,eir->tei", torch.einsum("td,erd->ter", x, f["gate_a"]), f["gate_b"])
    ups = u.unsqueeze(1) + torch.einsum("ter,eir->tei", torch.einsum("td,erd->ter", x, f["up_a"]), f["up_b"])
    act = F.silu(gates) * ups  # [T, E, I]
    h = torch.einsum("tei,te->ti", act, w)
    down = torch.einsum("ter,edr->td", torch.einsum("tei,eri->ter", act, f["down_a"]) * w.unsqueeze(-1), f["down_b"])
    return h, down


def shard(t: torch.Tensor, dim: int | None, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s part of an exported factor: a contiguous 1/world of dimension `dim`."""
    if dim is None or world == 1:
        return t
    size = t.shape[dim] // world
    return t.narrow(dim, rank * size, size)
