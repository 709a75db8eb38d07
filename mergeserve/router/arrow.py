"""`arrow` gate init (Ostapenko et al. 2024): training-free, from the experts' weights alone.

An expert's prototype in a layer is the top right singular vector v of its weight delta,
the direction of router-input space that its fine-tune changes most. For a LoRA expert the
delta is B·A, and its SVD comes from a QR of each factor (no dense delta is formed); for a
dense expert it is expert - base.
gate_proj and up_proj both read the router input x [D] (down_proj reads the [I] state,
so it has no say); their deltas are stacked as one fused input projection [Δgate; Δup]
[2I, D], so v maximises |Δgate x|² + |Δup x|² over unit x, and an adapter on only one
of the two still gets its own direction.

logit_i = scale * |x · v_i|: the absolute value because v's sign is arbitrary
(ComposedModel.router_subspace = 1, applied by the engine), then softmax -> top-k -> renormalise,
which equals peft's top-k -> softmax(|x · v| / temperature): scale is peft's
1 / router_temperature, and scale=1 its default. x is the router input as the engine
has it (normed, not unit), as in peft. An expert whose delta is zero in a layer (the
base itself as an expert) gets a zero row: logit 0 for every token. With routed attention,
the attention router's prototypes come the same way from the fused [Δq; Δk; Δv] deltas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergeserve.composition import ComposedModel

from mergeserve.weights import LowRank, dense, fuse
from mergeserve.experts import Checkpoint
from mergeserve.router import Calibration, Rows
from mergeserve.spec import CompositionSpec

# Randomised SVD subspace: exact for deltas of rank <= 32 (rank-16 LoRA on gate and up).
SUBSPACE = 32
POWER_ITERS = 2
# A delta below this fraction of the base weights' norm is rounding, not a fine-tune.
ZERO_DELTA = 1e-6


def arrow_rows(composed: ComposedModel, spec: CompositionSpec, base: Checkpoint, calibration: Calibration | None) -> Rows:
    return subspace_rows(composed, spec, base, k=1)  # logits |x · v|: the rows are meaningful only up to sign


def subspace_rows(composed: ComposedModel, spec: CompositionSpec, base: Checkpoint, k: int) -> Rows:
    """scale times each expert's top-k right singular vectors, [E * k, D] per layer and router site;
    the engine's logits are then the norm of x's projection on them (ComposedModel.router_subspace)."""
    composed.router_subspace = k
    sites = {"ffn": lambda layer, n: _subspaces(layer.experts, ("gate_proj", "up_proj"), base, f"model.layers.{n}.mlp.", k)}
    if composed.layers[0].attn_experts:  # routed attention: q/k/v read the attention router's input
        sites["attention"] = lambda layer, n: _subspaces(layer.attn_experts, ("q_proj", "k_proj", "v_proj"), base, f"model.layers.{n}.self_attn.", k)
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws from the global generator
        torch.manual_seed(spec.router.seed)
        return {site: [spec.router.scale * rows(layer, n) for n, layer in enumerate(composed.layers)] for site, rows in sites.items()}


def _subspaces(experts: list, projections: tuple[str, ...], base: Checkpoint, prefix: str, k: int) -> torch.Tensor:
    """Each expert's top-k right singular vectors over the input projections that read the router's input: [E * k, D]."""
    base_ws = [base.tensors[prefix + f"{x}.weight"] for x in projections]
    base_in = torch.cat(base_ws)  # [sum out, D]
    out = []
    for e in experts:
        fused = fuse([getattr(e, x) for x in projections], copy=True)  # [Δgate; Δup] = B' A' for a LoRA expert
        if isinstance(fused, LowRank) and fused.base.data_ptr() == base_ws[0].data_ptr():
            out.append(factor_subspace(fused.a, fused.b, base_in, k))
        else:
            out.append(subspace(dense(fused) - base_in, base_in, k))
    return torch.cat(out)


def subspace(delta: torch.Tensor, base: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k right singular vectors of `delta` [out, D] as rows [k, D]; zeros when `delta` is ~0 next to `base`."""
    if delta.norm() <= ZERO_DELTA * base.norm():
        return torch.zeros(k, delta.shape[1])
    _, _, v = torch.svd_lowrank(delta, q=min(max(SUBSPACE, k), *delta.shape), niter=POWER_ITERS)
    return F.pad(v[:, :k].T, (0, 0, 0, k - min(k, v.shape[1])))


def factor_subspace(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k right singular vectors of delta = b @ a ([out, r] @ [r, D]) from its factors, exactly,
    as rows [k, D] (zero rows past the rank): a^T = Qa Ra and b = Qb Rb give
    delta = Qb (Rb Ra^T) Qa^T, so the SVD of the small r x r middle, U S V^T, gives delta's
    right singular vectors as Qa V."""
    a, b = a.double(), b.double()
    qa, ra = torch.linalg.qr(a.T)  # [D, r], [r, r]
    qb, rb = torch.linalg.qr(b)  # [out, r], [r, r]
    _, s, vh = torch.linalg.svd(rb @ ra.T)
    kept = int((s > ZERO_DELTA * base.double().norm()).sum().clamp_max(k))  # only directions the delta has
    v = (qa @ vh[:kept].T).T.float()  # [kept, D]
    return F.pad(v, (0, 0, 0, k - kept))
