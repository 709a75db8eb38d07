"""Top-k request routing over whole models, above the engines: one request decoded by several
engines in lockstep, each token drawn from the weighted mixture of their next-token
distributions (Branch-Train-Merge's ensemble).

The coordinator makes a request's sequences, one per engine (the lead's, which samples and
emits, and a follower on every other engine that only contributes its distribution), ties them
into a MixGroup (engine/mixing.py) and admits each to its engine. From there the engines decode
them in lockstep through the group. A request's SamplingParams carry no engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mergeserve.engine.mixing import MixGroup
from mergeserve.engine.sequence import SamplingParams

if TYPE_CHECKING:
    from mergeserve.engine.base_engine import Placed
    from mergeserve.engine.engine import Engine

__all__ = ["Mixture", "add_mixed", "generate_mixed"]


@dataclass(frozen=True, eq=False)
class Mixture:
    """Draw each token from the mixture of the lead's distribution and these engines' (same
    tokenizer), weighted by softmax(log_weights), the lead's first."""

    engines: tuple[Engine | Placed, ...]
    log_weights: tuple[float, ...]  # [1 + len(engines)]


def add_mixed(lead: Engine | Placed, request_id: str, prompt_ids: list[int], params: SamplingParams, mix: Mixture) -> None:
    """Admit a request that `lead` decodes as the mixture `mix` (thread-safe: each engine's inbox)."""
    engines = (lead, *mix.engines)
    if len(mix.log_weights) != len(engines):
        raise ValueError(f"a mixture of {len(engines)} engines needs {len(engines)} weights, got {len(mix.log_weights)}")
    if params.prompt_logprobs is not None:
        raise ValueError("prompt logprobs of a mixed request are not computed")
    if (short := min(e.max_model_len for e in engines)) <= len(prompt_ids):
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in a mixed member's max_model_len={short}")
    follow = SamplingParams(max_tokens=params.max_tokens, ignore_eos=True)  # followers never sample
    members = [lead.sequence(request_id, prompt_ids, params)] + [e.sequence(request_id, prompt_ids, follow) for e in mix.engines]
    group = MixGroup(members, torch.log_softmax(torch.tensor(mix.log_weights, dtype=torch.float32), dim=0), short)
    for seq in members:
        seq.group = group
    for engine, seq in zip(engines, members):
        engine.add_sequence(seq)  # every engine's queue sees groups in one order: admission cannot deadlock


def generate_mixed(
    lead: Engine, prompts: list[list[int]], params: SamplingParams, mixes: list[Mixture | None],
) -> list[list[int]]:
    """Engine.generate for requests decoded as mixtures (mixes[i]: prompt i's, None: the lead alone);
    every member engine is stepped until all are done."""
    ids = [f"offline-{i}" for i in range(len(prompts))]
    for rid, prompt, mix in zip(ids, prompts, mixes):
        if mix is None:
            lead.add_request(rid, prompt, params)
        else:
            add_mixed(lead, rid, prompt, params, mix)
    engines = list(dict.fromkeys([lead, *(e.host for m in mixes if m for e in m.engines)]))
    results: dict[str, list[int]] = {rid: [] for rid in ids}
    while any(e.has_work() for e in engines):
        for engine in engines:
            outputs = engine.step() if engine.has_work() else []
            for _, error in engine.take_refused():
                raise error
            for out in outputs if engine is lead else ():  # followers emit nothing
                results[out.request_id] += out.new_token_ids
    return [results[rid] for rid in ids]
