"""Scoring a `method: route` composition: each example is routed to one member model by the
request router, then scored (or, for math, answered) by that member alone.

A request router sees a request's text before anything is generated; a scored example is
routed on its first `4 * route_tokens` characters (about `route_tokens` tokens), so that the
choice is not made from the very text whose loss it decides. The routing confusion (which
member each domain's examples went to) is part of the row.
"""

from __future__ import annotations

import time

from mergeserve.engine.engine import Engine
from mergeserve.eval.datasets import EvalData
from mergeserve.eval.harness import math_accuracy, mixed_result, score_examples
from mergeserve.eval.metrics import MATH_PROMPT, LossSum
from mergeserve.router.request import RequestRouter

CHARS_PER_TOKEN = 4  # the prefix a request router sees: about route_tokens tokens of text


def choose(router: RequestRouter, names: list[str], texts: list[str], chars: int) -> list[str]:
    return [names[i] for i in router.scores([t[:chars] for t in texts]).argmax(1).tolist()] if texts else []


def by_member(chosen: list[str]) -> dict[str, list[int]]:
    """Example indices per member they were routed to."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(chosen):
        groups.setdefault(name, []).append(i)
    return groups


def score_routed(members: dict[str, Engine], chosen: list[str], texts: list[str], settings, desc: str) -> list[LossSum]:
    out = [LossSum() for _ in texts]
    for name, idx in by_member(chosen).items():
        for i, s in zip(idx, score_examples(members[name], [texts[i] for i in idx], settings, f"{desc} -> {name}")):
            out[i] = s
    return out


def math_routed(members: dict[str, Engine], router: RequestRouter, problems: list[dict], settings) -> tuple[dict, list[str]]:
    names = list(members)
    prompts = [MATH_PROMPT.format(question=p["question"]) for p in problems]
    chosen = choose(router, names, prompts, CHARS_PER_TOKEN * settings.route_tokens)
    samples: list = [None] * len(problems)
    generated = 0
    for name, idx in by_member(chosen).items():
        part = math_accuracy(members[name], [problems[i] for i in idx], settings)
        generated += part["generated_tokens"]
        for i, sample in zip(idx, part["samples"]):
            samples[i] = sample | {"member": name}
    n = len(problems)
    correct = sum(s["correct"] for s in samples)
    formatted = sum(s["extracted"] is not None for s in samples)
    result = {"accuracy": correct / n if n else float("nan"), "correct": correct, "n": n,
              "formatted": formatted / n if n else float("nan"), "generated_tokens": generated, "samples": samples}
    return result, chosen


def evaluate_route(members: dict[str, Engine], router: RequestRouter, data: EvalData, settings) -> dict:
    """The row of a route composition: the harness's metrics, plus `routing`: per domain, how
    many of its examples (loss set and math problems) each member got."""
    names, chars = list(members), CHARS_PER_TOKEN * settings.route_tokens
    result: dict = {"domains": {}, "timings": {}, "routing": {}}
    for domain, examples in data.domains.items():
        start = time.perf_counter()
        texts = [e["text"] for e in examples]
        chosen = choose(router, names, texts, chars)
        result["domains"][domain] = sum(score_routed(members, chosen, texts, settings, domain), LossSum()).as_dict()
        result["routing"][domain] = {n: chosen.count(n) for n in names}
        result["timings"][f"loss_{domain}"] = time.perf_counter() - start

    start = time.perf_counter()
    texts = [e["text"] for _, e in data.mixed]
    sums = score_routed(members, choose(router, names, texts, chars), texts, settings, "mixed")
    result["mixed"] = mixed_result(data.mixed, sums)
    result["timings"]["mixed"] = time.perf_counter() - start

    start = time.perf_counter()
    result["math"], chosen = math_routed(members, router, data.math, settings)
    result["routing"]["math problems"] = {n: chosen.count(n) for n in names}
    result["timings"]["math"] = time.perf_counter() - start
    return result
