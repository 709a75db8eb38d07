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
from mergeserve.kernels.lowrank import Pack
from mergeserve.router import SITES, RouterInputs, zero_rows

MAX_PROMPT_TOKENS = 256


def calibration(composed: ComposedModel, pack: Pack | None = None) -> RouterInputs:
    """The composition's forward for `router_inputs`: its routers become zero placeholders, the bias decides.
    pack: the pool's WeightPacker, so the base's weights run packed as they serve (and are packed once)."""
    for layer, rows in zip(composed.layers, zero_rows(composed)):
        layer.router = rows
        if layer.attn_experts:
            layer.attn_router = rows
    return partial(router_inputs, Transformer(composed, max_len=MAX_PROMPT_TOKENS, pack=pack), composed)


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
