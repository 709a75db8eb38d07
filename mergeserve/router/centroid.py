"""`centroid` gate init: each expert's row is the direction of its domain's router inputs.

Per layer, an expert's centroid is the mean of its prompts' router inputs, each token's
state normalised to unit length first, so that no token weighs more for its norm. The
states are read as in `hidden`: post-attention and normalised, in the composed model
itself, with every layer's FFN set to the expert whose prompts run.

Logits are `scale` times the cosine to each centroid. The engine's logits are x · row
without normalising x, so row = scale * unit centroid / r, with r the mean router-input
norm of that layer over all prompts: a token of typical norm gets scale * cos(x, c) and
logits lie near [-scale, scale]. Centroids of different domains are close in direction
(hidden states share a large common component), so margins are a fraction of `scale`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergeserve.composition import ComposedModel
from mergeserve.experts import Checkpoint
from mergeserve.router import Calibration, Rows, calibrated
from mergeserve.spec import CompositionSpec


def _centroids_and_norms(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the mean of the unit-normalised states [L, D] and the mean state norm [L]."""
    norms = [s.norm(dim=-1, keepdim=True) for s in states]  # L x [tokens, 1]
    centroids = torch.stack([(s / n.clamp_min(1e-12)).mean(0) for s, n in zip(states, norms)])
    return centroids, torch.stack([n.mean() for n in norms])


def centroid_rows(composed: ComposedModel, spec: CompositionSpec, base: Checkpoint, calibration: Calibration | None) -> Rows:
    """Rows from the experts' prompts (the base's weights are not read)."""
    forward = calibrated(composed, spec, calibration)
    inputs = forward([(e.prompts, i) for i, e in enumerate(spec.experts)])  # E x {site: L x [tokens, D]}
    rows = {}
    for site in inputs[0]:
        stats = [_centroids_and_norms(x[site]) for x in inputs]
        centroids = torch.stack([c for c, _ in stats], dim=1)  # [L, E, D]
        norm = torch.stack([n for _, n in stats]).mean(0)  # [L] typical router-input norm
        rows[site] = list(spec.router.scale * F.normalize(centroids, dim=-1) / norm[:, None, None])  # L x [E, D]
    return rows
