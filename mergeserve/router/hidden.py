"""`hidden` gate init: each expert's row points from the rest towards its own domain.

With routed attention the attention router's rows are made the same way from the state it
reads (the input-normed state before attention), every router forced to the expert.

Unlike mergekit-moe, which reads the residual stream before attention of the base
model, this reads the state the router actually sees: the post-attention, normalised
hidden state of the composed model itself, with every layer's FFN set to the expert
whose prompts are running. All tokens of a prompt count, not only the last. That forward
is injected (learn/router_inputs.py runs the engine's).

Row i = scale * d_i / |d_i|^2 with d_i = mean_i - reference_i, so that an expert's
mean domain state scores exactly `scale` logits above the reference state.
The reference is the mean of the expert's negative prompts when given, otherwise the
mean of the other experts' domains.
"""

from __future__ import annotations

import torch

from mergeserve.composition import ComposedModel
from mergeserve.experts import Checkpoint
from mergeserve.router import Calibration, Rows, calibrated
from mergeserve.spec import CompositionSpec


def _means(states: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean router input per site and layer over all tokens: site -> [L, D]."""
    return {site: torch.stack([c.mean(0) for c in layers]) for site, layers in states.items()}


def hidden_rows(composed: ComposedModel, spec: CompositionSpec, base: Checkpoint, calibration: Calibration | None) -> Rows:
    """Rows from the experts' prompts (the base's weights are not read)."""
    inputs = calibrated(composed, spec, calibration)
    negatives = [i for i, e in enumerate(spec.experts) if e.negative_prompts]
    requests = [(e.prompts, i) for i, e in enumerate(spec.experts)] + [(spec.experts[i].negative_prompts, i) for i in negatives]
    states = [_means(s) for s in inputs(requests)]  # each expert's prompts routed to it, then the negatives
    means = states[:len(spec.experts)]  # E x {site: [L, D]}
    negative_means = dict(zip(negatives, states[len(spec.experts):]))
    rows: dict[str, list[torch.Tensor]] = {site: [] for site in means[0]}
    for i, e in enumerate(spec.experts):
        negative = negative_means.get(i)
        for site in rows:
            reference = negative[site] if negative else torch.stack([m[site] for j, m in enumerate(means) if j != i]).mean(0)
            d = means[i][site] - reference  # [L, D]
            rows[site].append(spec.router.scale * d / d.pow(2).sum(-1, keepdim=True).clamp_min(1e-12))
    return {site: list(torch.stack(r, dim=1)) for site, r in rows.items()}  # site -> L x [E, D]
