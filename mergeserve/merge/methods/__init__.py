"""Task-vector merge methods, one module each, and the one entry point `merge_tensor`.

Every method is `merge(base, experts, weights, params, generator) -> Tensor`: fp32, the
base's shape. Adding a method is adding a file here, a line in `METHODS`, and its parameters'
model in spec/merge.py (tests/test_merge_methods.py checks that the two agree).
"""

from __future__ import annotations

import re
import zlib
from typing import Callable

import torch
from torch import Generator, Tensor

from mergeserve.experts import Checkpoint
from mergeserve.merge.average import delta_sum, mean
from mergeserve.merge import coefficients
from mergeserve.merge.methods import consensus, dare_linear, dare_ties, linear, slerp, task_arithmetic, ties
from mergeserve.spec import CompositionSpec
from mergeserve.spec.merge import FisherMerge, TaskVectorMerge
from mergeserve.weights import LowRank, Weight

MergeFn = Callable[[Tensor, list[Tensor], list[float], TaskVectorMerge, Generator], Tensor]

METHODS: dict[str, MergeFn] = {
    "linear": linear.merge,
    "task_arithmetic": task_arithmetic.merge,
    "ties": ties.merge,
    "dare_linear": dare_linear.merge,
    "dare_ties": dare_ties.merge,
    "slerp": slerp.merge,
    "consensus": consensus.merge,
}


def merge_tensor(
    name: str, base: Tensor, experts: list[Tensor], weights: list[float], params: TaskVectorMerge
) -> Tensor:
    """Merge the tensor `name` of the experts onto `base` as `params` (and its overrides) say.

    `base` itself, uncopied, when every expert shares its storage (LoRA leaves embeddings alone).
    """
    if all(t.data_ptr() == base.data_ptr() and t.shape == base.shape for t in experts):
        return base
    params = params_for(name, params)
    if params.method not in METHODS:
        raise ValueError(f"unknown merge method {params.method!r}; known: {sorted(METHODS)}")
    generator = generator_for(name, params.seed, base.device)
    return METHODS[params.method](base.float(), [t.float() for t in experts], weights, params, generator)


def spec_merger(spec: CompositionSpec, base: Checkpoint, experts: list[Checkpoint]) -> Callable[[str], Tensor]:
    """Merges one named tensor of the experts as the spec's merge section says, each layer's
    expert weights from its learned coefficients file when it names one."""
    weights, params, table = [e.weight for e in spec.experts], spec.merge, None
    if isinstance(params, FisherMerge):
        return _fisher_merger(spec, base, experts)
    if getattr(params, "coefficients", None):
        table = coefficients.load(params.coefficients, [e.name for e in spec.experts], base.config.num_hidden_layers)
        params = params.model_copy(update={"lambda_": 1.0})  # the coefficients are lambda * weight, learned

    # Linear and task-arithmetic merges of adapters over the base stay low-rank, kept as factors:
    # base + sum_i c_i B_i A_i, c_i = w_i / sum w (linear) or lambda w_i (task arithmetic).
    factored = params.method in ("linear", "task_arithmetic") and table is None and not params.overrides

    def merged(key: str) -> Tensor:
        if factored and (adapters := _over_base(key, base, experts)) is not None:
            if params.method == "linear":
                return mean(adapters, weights)
            return delta_sum(adapters, [params.lambda_ * w for w in weights])
        w = coefficients.weights_for(key, table, weights)
        return merge_tensor(key, base.tensors[key], [e.tensors[key] for e in experts], w, params)

    return merged


def _over_base(key: str, base: Checkpoint, experts: list[Checkpoint]) -> list[Weight] | None:
    """The experts' `key` where each is the base's own tensor or LoRA factors over it (a linear merge
    of them stays low-rank); None where any expert holds a dense tensor of its own."""
    own = base.stored.get(key)
    ws = [e.weight(key) for e in experts]
    if own is None or not any(isinstance(w, LowRank) for w in ws):
        return None
    if all((w.base if isinstance(w, LowRank) else w).data_ptr() == own.data_ptr() for w in ws):
        return ws
    return None


def _fisher_merger(spec: CompositionSpec, base: Checkpoint, experts: list[Checkpoint]) -> Callable[[str], Tensor]:
    from mergeserve.merge import fisher

    weights = [e.weight for e in spec.experts]
    files = fisher.FisherFiles(spec.merge.fisher, [e.name for e in spec.experts], [e.source for e in spec.experts])

    def merged(key: str) -> Tensor:
        tensors = [e.tensors[key] for e in experts]
        if all(t.data_ptr() == base.tensors[key].data_ptr() for t in tensors):
            return base.tensors[key]
        fishers = files.get(key)
        if fishers is None:  # a tensor outside the layers' weights (norms): the weighted average
            return METHODS["linear"](base.tensors[key].float(), [t.float() for t in tensors], weights, spec.merge, None)
        return fisher.merge(base.tensors[key].float(), [t.float() for t in tensors], weights, fishers)

    return merged


def params_for(name: str, params: TaskVectorMerge) -> TaskVectorMerge:
    """`params` with the fields of the first override whose `match` finds `name` in place (the
    spec only lets an override set fields its method has)."""
    for override in params.overrides:
        if re.search(override.match, name):
            return params.model_copy(update={f: getattr(override, f) for f in override.model_fields_set - {"match"}})
    return params


def generator_for(name: str, seed: int, device: torch.device) -> Generator:
    # Seeded by (seed, name) and not by call order: a tensor's DARE masks are the same
    # whichever tensors were merged before it. 32 bits, as the CPU generator (mt19937)
    # ignores the rest; the crc32 of a name started from different seeds differs.
    return torch.Generator(device).manual_seed(zlib.crc32(name.encode(), seed & 0xFFFFFFFF))
