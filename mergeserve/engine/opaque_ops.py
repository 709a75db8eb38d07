"""The parts of a step whose shapes follow the data, as operators a compiled graph calls whole.

Dense experts run on the tokens that picked them (groups sized by the routing), and separate
attention runs each expert's own layer on the rows that chose it. Traced, either would break
the graph inside the layer loop; as a `torch.library` operator each is one opaque call whose
output is shaped like its input, and the rest of the step (attention, norms, routers, LoRA
experts) compiles around it. The operators run the eager model's own pieces, with its packed
weights, found by key like the KV cache (kv_cache.cache_attention): operators take ints and
tensors only. Padding rows of a bucket (slot -1) run nothing and return zeros.

A base engine's step (engine/base_model.py) mixes compositions row by row, and which ones
changes every step: its projections and FFNs are operators over the eager model, with the
step's routing and tables that the serving thread sets around the call (`base_step`).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from mergeserve.kernels import moe_ffn

if TYPE_CHECKING:
    from mergeserve.engine.layers import Batch

# Every eager model whose pieces a compiled graph calls, by key (a weak map: a model goes with
# its engine).
_MODELS: weakref.WeakValueDictionary[int, torch.nn.Module] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def register(model: torch.nn.Module) -> int:
    """The key under which the operators find `model` (a Transformer) while it lives."""
    key = next(_KEYS)
    _MODELS[key] = model
    return key


@torch.library.custom_op("mergeserve::dense_experts", mutates_args=())
def dense_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, model: int, layer: int) -> torch.Tensor:
    """Layer `layer`'s dense experts over x [T, D] with picks weights/ids [T, k] (weight 0 runs
    nothing): [T, D] in x's dtype."""
    return moe_ffn(x, weights, ids, _MODELS[model].run_layers[layer].ffns).to(x.dtype)


@dense_experts.register_fake
def _(x, weights, ids, model, layer):
    return x.new_empty(x.shape)


@torch.library.custom_op("mergeserve::separate_layer", mutates_args=())
def separate_layer(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, alpha: torch.Tensor, slots: torch.Tensor,
    positions: torch.Tensor, model: int, layer: int, cache: int, chunk_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Layer `layer` of separate attention for a compiled step's batch: x [B, T, D], cos/sin
    [B, 1, T, Dh], alpha [B, E], slots [B] (-1: padding, after the real rows), positions [B, T]
    (a decode step's T = 1) -> [B, T, D]. A packed prefill (chunk_ids [1, N], alpha [N, E],
    slots [N]: Batch.packed) runs row by row, its chunks unpacked."""
    from mergeserve.engine.layers import Batch, unpack

    if chunk_ids is None:
        return _separate_rows(x, cos, sin, Batch(positions, positions, slots, alpha=alpha), model, layer, cache)
    rows = Batch.unpacked(positions, slots, chunk_ids, alpha)
    real = rows.real()  # [C, T]
    cos, sin = (unpack(c[0, 0], real).unsqueeze(1) for c in (cos, sin))  # [C, 1, T, Dh]
    out = _separate_rows(unpack(x[0], real), cos, sin, rows, model, layer, cache)  # [C, T, D]
    return out[real].unsqueeze(0)


def _separate_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: Batch, model: int, layer: int,
                   cache: int) -> torch.Tensor:
    """separate_layer over the rows of `batch` that have a slot (Batch.slotted); zeros for the rest."""
    from mergeserve.engine.kv_cache import _CACHES
    from mergeserve.engine.mixture_layers import separate_layer as run_layer

    out = x.new_zeros(x.shape)
    if (sub := batch.slotted()) is None:
        return out
    # key_len: each expert's sub-batch reads as many keys as the mask has (mixture_layers.sub_batch)
    sub = replace(sub, key_len=int(sub.positions.max()) + 1)
    m, n = _MODELS[model], len(sub.slots)
    out[:n] = run_layer(layer, m.expert_runs[layer], x[:n], cos[:n], sin[:n], sub.mask(m.args.windows[layer]), sub,
                        _CACHES[cache], m.args.attn_shape, m.args.eps)
    return out


@separate_layer.register_fake
def _(x, cos, sin, alpha, slots, positions, model, layer, cache, chunk_ids=None):
    return x.new_empty(x.shape)


# The step each base engine's compiled graph is running, by model key: set around the call by the
# serving thread (BaseRunner), and thread-local so that the compile thread's warm-ups (padding
# rows only) see no step and run no terms.
_STEPS = threading.local()


@contextlib.contextmanager
def base_step(model: int, step: Any) -> Iterator[None]:
    """`step` (a base_model.GraphStep) is what model `model`'s operators run on until the block ends."""
    steps = _STEPS.__dict__.setdefault("by_model", {})
    steps[model] = step
    try:
        yield
    finally:
        del steps[model]


def _step(model: int) -> Any:
    return _STEPS.__dict__.get("by_model", {}).get(model)


@torch.library.custom_op("mergeserve::base_projection", mutates_args=())
def base_projection(x: torch.Tensor, model: int, layer: int, part: int, width: int) -> torch.Tensor:
    """Layer `layer`'s q/k/v projection (part 0, of its normed input x [N, D]: the batch's tokens
    row after row) or o projection (part 1, of the attention output), each real token with its
    composition's terms: [N, width] fp32, zero for padding rows and where no step is set."""
    out = x.new_zeros(x.shape[0], width, dtype=torch.float32)
    step = _step(model)
    if step is not None and step.tokens:
        out[:step.tokens] = _MODELS[model].graph_projection(layer, part, x[:step.tokens], step)
    return out


@base_projection.register_fake
def _(x, model, layer, part, width):
    return x.new_empty(x.shape[0], width, dtype=torch.float32)


@torch.library.custom_op("mergeserve::base_ffn", mutates_args=())
def base_ffn(x: torch.Tensor, model: int, layer: int) -> torch.Tensor:
    """Layer `layer`'s FFN of every real row, with its composition's terms: x [B, T, D] -> [B, T, D]
    (a packed prefill's [1, N, D]), zero for padding rows and where no step is set."""
    from mergeserve.engine.layers import unpack

    out = x.new_zeros(x.shape)
    step = _step(model)
    if step is None or not step.rows:
        return out
    if step.batch.lengths is None:  # rows, padded to a bucket after the real ones
        out[:step.rows] = _MODELS[model].graph_ffn(layer, x[:step.rows], step)
        return out
    real = step.batch.real()  # a packed prefill (Batch.packed): its chunks unpacked into the step's rows
    return _MODELS[model].graph_ffn(layer, unpack(x[0], real), step)[real].unsqueeze(0)


@base_ffn.register_fake
def _(x, model, layer):
    return x.new_empty(x.shape)
