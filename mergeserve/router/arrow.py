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
(ComposedModel.router_abs, applied by the engine), then softmax -> top-k -> renormalise,
which equals peft's top-k -> softmax(|x · v| / temperature): scale is peft's
1 / router_temperature, and scale=1 its default. x is the router input as the engine
has it (normed, not unit), as in peft. An expert whose delta is zero in a layer (the
base itself as an expert) gets a zero row: logit 0 for every token.
"""

from __future__ import annotations

import torch

from mergeserve.composition import ComposedModel, Layer, LowRank, dense, fuse
from mergeserve.experts import Checkpoint
from mergeserve.spec import CompositionSpec

# Randomised SVD subspace: exact for deltas of rank <= 32 (rank-16 LoRA on gate and up).
SUBSPACE = 32
POWER_ITERS = 2
# A delta below this fraction of the base weights' norm is rounding, not a fine-tune.
ZERO_DELTA = 1e-6


def arrow_rows(composed: ComposedModel, spec: CompositionSpec, base: Checkpoint) -> list[torch.Tensor]:
    composed.router_abs = True  # the rows are prototypes, meaningful only up to sign
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws from the global generator
        torch.manual_seed(spec.router.seed)
        return [spec.router.scale * _prototypes(layer, base, n) for n, layer in enumerate(composed.layers)]


def _prototypes(layer: Layer, base: Checkpoint, n: int) -> torch.Tensor:
    """Each expert's prototype in layer `n`: [E, D]."""
    p = f"model.layers.{n}.mlp."
    base_in = torch.cat([base.tensors[p + "gate_proj.weight"], base.tensors[p + "up_proj.weight"]])  # [2I, D]
    out = []
    for e in layer.experts:
        fused = fuse([e.gate_proj, e.up_proj], copy=True)  # [Δgate; Δup] = B' A' for a LoRA expert
        if isinstance(fused, LowRank) and fused.base.data_ptr() == base.tensors[p + "gate_proj.weight"].data_ptr():
            out.append(factor_prototype(fused.a, fused.b, base_in))
        else:
            out.append(prototype(dense(fused) - base_in, base_in))
    return torch.stack(out)


def prototype(delta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of `delta` [out, D], unit; zeros when `delta` is ~0 next to `base`."""
    if delta.norm() <= ZERO_DELTA * base.norm():
        return torch.zeros(delta.shape[1])
    _, _, v = torch.svd_lowrank(delta, q=min(SUBSPACE, *delta.shape), niter=POWER_ITERS)
    return v[:, 0]  # [D]


def factor_prototype(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of delta = b @ a ([out, r] @ [r, D]) from its factors, exactly:
    a^T = Qa Ra and b = Qb Rb give delta = Qb (Rb Ra^T) Qa^T, so the SVD of the small
    r x r middle, U S V^T, gives delta's right singular vectors as Qa V."""
    a, b = a.double(), b.double()
    qa, ra = torch.linalg.qr(a.T)  # [D, r], [r, r]
    qb, rb = torch.linalg.qr(b)  # [out, r], [r, r]
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    if s.numel() == 0 or s[0] <= ZERO_DELTA * base.double().norm():
        return torch.zeros(a.shape[1])
    return (qa @ vh[0]).float()  # [D]
