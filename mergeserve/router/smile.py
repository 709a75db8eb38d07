"""`smile` router (Tang et al. 2024, "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts"):
training-free, from the experts' weights alone.

Expert i's logit for a router input x is the norm of x's projection on the top-k right
singular vectors of its weight delta, ||V_i,k^T x|| (k = `router.subspace`, default 4):
how much of x lies in the input directions the fine-tune changed. Arrow is the case k = 1.
The vectors come from the LoRA factors (a QR of each factor, no dense delta) or from a
dense expert's delta, over the projections that read the router's input ([Δgate; Δup] for
the FFN router, [Δq; Δk; Δv] for a routed-attention router). `router.scale` multiplies
them, as for arrow: a unit x inside the subspace scores `scale`.
"""

from __future__ import annotations

from mergeserve.composition import ComposedModel
from mergeserve.experts import Checkpoint
from mergeserve.router import Calibration, Rows
from mergeserve.router.arrow import subspace_rows
from mergeserve.spec import CompositionSpec


def smile_rows(composed: ComposedModel, spec: CompositionSpec, base: Checkpoint, calibration: Calibration | None) -> Rows:
    return subspace_rows(composed, spec, base, k=spec.router.subspace)
