"""Scoring a `method: route` composition: each example is routed by the request router to one
member model, or with router.top_k > 1 to a mixture of members, then scored (or, for math,
answered) by that member alone or by the mixture of their next-token distributions.

A request router sees a request's text before anything is generated; a scored example is
routed on its first `4 * route_tokens` characters (about `route_tokens` tokens), so that the
choice is not made from the very text whose loss it decides. The routing confusion (which
member each domain's examples went to first) is part of the row.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from mergeserve.engine.engine import Engine
from mergeserve.engine.mixing import Mixture
from mergeserve.eval.datasets import EvalData
from mergeserve.eval.harness import math_accuracy, mixed_result, token_logprobs
from mergeserve.eval.metrics import MATH_PROMPT, LossSum, loss_sum
from mergeserve.router.request import RequestRouter, tokenizer_key, top_members

CHARS_PER_TOKEN = 4  # the prefix a request router sees: about route_tokens tokens of text

Choice = list[tuple[str, float]]  # the members one text goes to, the lead first, with their mixing logits


def choose(router: RequestRouter, names: list[str], texts: list[str], chars: int, top_k: int, vocab: list[int]) -> list[Choice]:
    """Each text's members; `vocab`: a tokenizer key per member (only members of the lead's are mixed)."""
    if not texts:
        return []
    scores = router.scores([t[:chars] for t in texts])  # [N, M]
    return [[(names[i], float(row[i])) for i in top_members(row, top_k, vocab)] for row in scores]


def leads(choices: list[Choice]) -> list[str]:
    return [c[0][0] for c in choices]


def score_routed(members: dict[str, Engine], choices: list[Choice], texts: list[str], settings, desc: str) -> list[LossSum]:
    """Each text's loss under its members' mixture, sum_i softmax(logits)_i p_i(token) (one member: its own)."""
    logits = [dict(c) for c in choices]  # per text: member -> mixing logit
    parts: list[list[tuple[float, torch.Tensor]]] = [[] for _ in texts]
    for name, engine in members.items():
        idx = [i for i, c in enumerate(logits) if name in c]
        if idx:
            for i, lp in zip(idx, token_logprobs(engine, [texts[i] for i in idx], settings, f"{desc} -> {name}")):
                if lp is not None:
                    parts[i].append((logits[i][name], lp.double()))
    out = []
    for mix in parts:
        if not mix:
            out.append(LossSum())
            continue
        weights = torch.log_softmax(torch.tensor([w for w, _ in mix], dtype=torch.float64), dim=0)  # [k]
        out.append(loss_sum([torch.logsumexp(torch.stack([lp for _, lp in mix]) + weights.unsqueeze(1), dim=0)]))
    return out


def math_routed(
    members: dict[str, Engine], problems: list[dict], settings, route: Callable[[list[str]], list[Choice]],
) -> tuple[dict, list[str]]:
    """`route`: each text's members."""
    choices = route([MATH_PROMPT.format(question=p["question"]) for p in problems])
    samples: list = [None] * len(problems)
    generated = 0
    for name in members:
        idx = [i for i, c in enumerate(choices) if c[0][0] == name]
        if not idx:
            continue
        mixes = [Mixture(tuple(members[n] for n, _ in choices[i][1:]), tuple(w for _, w in choices[i]))
                 if len(choices[i]) > 1 else None for i in idx]
        part = math_accuracy(members[name], [problems[i] for i in idx], settings, mixes)
        generated += part["generated_tokens"]
        for i, sample in zip(idx, part["samples"]):
            samples[i] = sample | {"member": "+".join(n for n, _ in choices[i])}
    n = len(problems)
    correct = sum(s["correct"] for s in samples)
    formatted = sum(s["extracted"] is not None for s in samples)
    result = {"accuracy": correct / n if n else float("nan"), "correct": correct, "n": n,
              "formatted": formatted / n if n else float("nan"), "generated_tokens": generated, "samples": samples}
    return result, leads(choices)


def evaluate_route(members: dict[str, Engine], router: RequestRouter, data: EvalData, settings, top_k: int = 1) -> dict:
    """The row of a route composition: the harness's metrics, plus `routing`: per domain, how
    many of its examples (loss set and math problems) each member got (as the lead of a mixture)."""
    names, chars = list(members), CHARS_PER_TOKEN * settings.route_tokens
    vocab = [tokenizer_key(m.tokenizer) for m in members.values()] if top_k > 1 else [0] * len(names)

    def route(texts: list[str]) -> list[Choice]:
        return choose(router, names, texts, chars, top_k, vocab)

    result: dict = {"domains": {}, "timings": {}, "routing": {}}
    for domain, examples in data.domains.items():
        start = time.perf_counter()
        texts = [e["text"] for e in examples]
        choices = route(texts)
        result["domains"][domain] = sum(score_routed(members, choices, texts, settings, domain), LossSum()).as_dict()
        result["routing"][domain] = {n: leads(choices).count(n) for n in names}
        result["timings"][f"loss_{domain}"] = time.perf_counter() - start

    start = time.perf_counter()
    texts = [e["text"] for _, e in data.mixed]
    sums = score_routed(members, route(texts), texts, settings, "mixed")
    result["mixed"] = mixed_result(data.mixed, sums)
    result["timings"]["mixed"] = time.perf_counter() - start

    start = time.perf_counter()
    result["math"], chosen = math_routed(members, data.math, settings, route)
    result["routing"]["math problems"] = {n: chosen.count(n) for n in names}
    result["timings"]["math"] = time.perf_counter() - start
    return result
