"""The calibration forward of `hidden` and `centroid` routers: what each router reads on its experts' prompts.

The composition runs through the engine's own forward (engine/model.py), so the states are
exactly those the routers will see when served. The router packages receive this as a
`router.Calibration` (learn/compose.py injects it) and never import the engine.
"""

from __future__ import annotations

from functools import partial

import torch

from mergeserve.composition import ComposedModel
from mergeserve.engine.layers import Batch
from mergeserve.engine.model import Capture, Transformer
from mergeserve.router import SITES, RouterInputs, zero_rows

MAX_PROMPT_TOKENS = 256


def calibration(composed: ComposedModel) -> RouterInputs:
    """The composition's forward for `router_inputs`: its routers become zero placeholders, the bias decides.
    Its weights run unpacked: packing the fused tables for one forward costs more than it saves
    (measured: a BTX build of the demo's experts took 1.3-1.5 s packed, 0.7-1.0 s unpacked)."""
    for layer, rows in zip(composed.layers, zero_rows(composed)):
        layer.router = rows
        if layer.attn_experts:
            layer.attn_router = rows
    return partial(router_inputs, Transformer(composed, max_len=MAX_PROMPT_TOKENS), composed)


@torch.inference_mode()
def router_inputs(
    model: Transformer, composed: ComposedModel, requests: list[tuple[list[str], int]],
) -> list[dict[str, list[torch.Tensor]]]:
    """For each (texts, expert): the router inputs of every token of `texts` per site and layer,
    every router forced to `expert`: site -> L x [tokens, D] (the attention site only with routed
    attention).

    One forward for all requests' texts, right-padded: causal attention keeps the padding out of
    every real token's state, and padded positions are left out. Each token's router bias
    forces its own request's expert.
    """
    ids = []
    for texts, expert in requests:
        tokens = [i for t in texts if (i := composed.tokenizer(t, add_special_tokens=False)["input_ids"][:MAX_PROMPT_TOKENS])]
        if not tokens:
            raise ValueError(f"expert {composed.expert_names[expert]}: its prompts tokenize to nothing")
        ids.append(tokens)
    counts = [sum(len(i) for i in tokens) for tokens in ids]  # real tokens of each request, in row order
    bias = torch.full((sum(counts), composed.num_experts), float("-inf"))  # [real tokens, E]
    for (_, expert), rows in zip(requests, torch.arange(sum(counts)).split(counts)):
        bias[rows, expert] = 0.0
    captured = Capture(ffn=[], attention=[])
    model(Batch.right_padded([i for tokens in ids for i in tokens], bias), capture=captured)
    states = {site: [s.split(counts) for s in got] for site in SITES if (got := getattr(captured, site))}  # L x R
    return [{site: [per_layer[r] for per_layer in layers] for site, layers in states.items()} for r in range(len(requests))]
