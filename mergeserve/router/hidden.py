"""`hidden` gate init: each expert's row points from the rest towards its own domain.

With routed attention the attention router's rows are made the same way from the state it
reads (the input-normed state before attention), every router forced to the expert.

Unlike mergekit-moe, which reads the residual stream before attention of the base
model, this reads the state the router actually sees: the post-attention, normalised
hidden state of the composed model itself, with every layer's FFN set to the expert
whose prompts are running. All tokens of a prompt count, not only the last.

Row i = scale * d_i / |d_i|^2 with d_i = mean_i - reference_i, so that an expert's
mean domain state scores exactly `scale` logits above the reference state.
The reference is the mean of the expert's negative prompts when given, otherwise the
mean of the other experts' domains.
"""

from __future__ import annotations

import torch

from mergeserve.composition import ComposedModel
from mergeserve.engine.layers import Batch
from mergeserve.engine.model import Capture, Transformer
from mergeserve.router import SITES, Rows, zero_rows
from mergeserve.spec import CompositionSpec

MAX_PROMPT_TOKENS = 256


def calibration_model(composed: ComposedModel) -> Transformer:
    """The composition as a model for `router_inputs`: its routers are placeholders, the bias decides."""
    for layer, rows in zip(composed.layers, zero_rows(composed)):
        layer.router = rows
        if layer.attn_experts:
            layer.attn_router = rows
    return Transformer(composed, max_len=MAX_PROMPT_TOKENS)


@torch.inference_mode()
def router_inputs(model: Transformer, composed: ComposedModel, texts: list[str], expert: int) -> dict[str, list[torch.Tensor]]:
    """Router inputs of every token of `texts` per site and layer, every router forced to
    `expert`: site -> L x [tokens, D] (the attention site only with routed attention).

    One forward for all texts, right-padded: causal attention keeps the padding out of
    every real token's state, and padded positions are left out.
    """
    ids = [composed.tokenizer(t, add_special_tokens=False)["input_ids"][:MAX_PROMPT_TOKENS] for t in texts]
    ids = [i for i in ids if i]
    if not ids:
        raise ValueError(f"expert {composed.expert_names[expert]}: its prompts tokenize to nothing")
    bias = torch.full((sum(len(i) for i in ids), composed.num_experts), float("-inf"))  # [real tokens, E]
    bias[:, expert] = 0.0
    captured = Capture(ffn=[], attention=[])
    model(Batch.right_padded(ids, bias), capture=captured)
    return {site: states for site in SITES if (states := getattr(captured, site))}


def _mean_router_inputs(model: Transformer, composed: ComposedModel, texts: list[str], expert: int) -> dict[str, torch.Tensor]:
    """Mean router input per site and layer over all tokens of `texts`, routers forced to `expert`: site -> [L, D]."""
    return {site: torch.stack([c.mean(0) for c in states]) for site, states in router_inputs(model, composed, texts, expert).items()}


def hidden_rows(composed: ComposedModel, spec: CompositionSpec) -> Rows:
    model = calibration_model(composed)
    means = [_mean_router_inputs(model, composed, e.prompts, i) for i, e in enumerate(spec.experts)]  # E x {site: [L, D]}
    rows: dict[str, list[torch.Tensor]] = {site: [] for site in means[0]}
    for i, e in enumerate(spec.experts):
        negative = _mean_router_inputs(model, composed, e.negative_prompts, i) if e.negative_prompts else None
        for site in rows:
            reference = negative[site] if negative else torch.stack([m[site] for j, m in enumerate(means) if j != i]).mean(0)
            d = means[i][site] - reference  # [L, D]
            rows[site].append(spec.router.scale * d / d.pow(2).sum(-1, keepdim=True).clamp_min(1e-12))
    return {site: list(torch.stack(r, dim=1)) for site, r in rows.items()}  # site -> L x [E, D]
