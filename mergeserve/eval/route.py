"""Scoring a `method: route` composition: each example is routed by the request router to one
member model, or with router.top_k > 1 to a mixture of members, then scored (or, for math,
answered) by that member alone or by the mixture of their next-token distributions.

Every row scores the same tokens (eval/harness.py): an example's first N = `route_tokens`
tokens are context only. Members may tokenize differently, so the context is fixed as text:
the prefix is the characters of the example's first N tokens under a reference tokenizer, the
first member's (after the `max_tokens` cut, an example of at most N of them is neither routed
nor scored). The request router chooses from that prefix. A member whose first N tokens of the
example are the reference's (its tokenizer: every member of the zoo) scores its tokens at
positions >= N, the harness's rule exactly; any other member scores its tokens (its first
`max_tokens`) that start at or after the prefix's end, by its tokenizer's offset mapping (a token
across the end is context).
A math problem is routed on the first `4 * route_tokens` characters of its prompt. The routing
confusion (which member each domain's scored examples and math problems went to first) is part
of the row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from mergeserve.engine.engine import Engine
from mergeserve.engine.coordinator import Mixture
from mergeserve.engine.mixing import mix_logprobs
from mergeserve.eval.datasets import EvalData
from mergeserve.eval.metrics import MATH_PROMPT, LossSum, loss_sum
from mergeserve.eval.results import MathSample, MathScore, ModelScores
from mergeserve.eval.scoring import EvalSettings, math_accuracy, math_score, mixed_loss, token_logprobs
from mergeserve.router.request import RequestRouter, tokenizer_key, top_members

CHARS_PER_TOKEN = 4  # a math prompt is routed on about route_tokens tokens of its text


@dataclass(frozen=True)
class RouteDecision:
    """The members one text goes to, the lead first, with their mixing logits."""

    members: tuple[str, ...]
    logits: tuple[float, ...]  # [len(members)]

    @property
    def lead(self) -> str:
        return self.members[0]


@dataclass(frozen=True)
class Prefix:
    """An example's context: its first route_tokens tokens under the reference tokenizer, and the
    text they cover, text[:chars]."""

    ids: list[int]
    chars: int


def choose(router: RequestRouter, names: list[str], texts: list[str], top_k: int, vocab: list[int]) -> list[RouteDecision]:
    """Each text's members; `vocab`: a tokenizer key per member (only members of the lead's are mixed)."""
    if not texts:
        return []
    decisions = []
    for row in router.scores(texts):  # [M] per text
        picked = top_members(row, top_k, vocab)
        decisions.append(RouteDecision(tuple(names[i] for i in picked), tuple(float(row[i]) for i in picked)))
    return decisions


def leads(decisions: list[RouteDecision]) -> list[str]:
    return [d.lead for d in decisions]


def prefixes(tokenizer, texts: list[str], settings: EvalSettings) -> list[Prefix | None]:
    """Each text's prefix under the reference `tokenizer`; None for a text of at most
    route_tokens tokens after the max_tokens cut (it scores nothing)."""
    n, out = settings.route_tokens, []
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        long = min(len(enc.input_ids), settings.max_tokens) > n
        out.append(Prefix(enc.input_ids[:n], enc.offset_mapping[n - 1][1]) if long else None)
    return out


def member_tokens(tokenizer, texts: list[str], heads: list[Prefix], settings: EvalSettings) -> tuple[list[list[int]], list[int]]:
    """Each text's tokens under a member's `tokenizer` (cut to max_tokens) and how many of them
    are context: route_tokens where they begin with the prefix's tokens, else those that start
    before the prefix's end."""
    n, ids, context = settings.route_tokens, [], []
    for text, head in zip(texts, heads):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids.append(enc.input_ids[:settings.max_tokens])
        same = enc.input_ids[:n] == head.ids
        context.append(n if same else sum(start < head.chars for start, _ in enc.offset_mapping))
    return ids, context


def score_routed(
    members: dict[str, Engine], decisions: list[RouteDecision], texts: list[str], heads: list[Prefix], settings: EvalSettings,
    desc: str,
) -> list[LossSum]:
    """Each text's loss after its prefix under its members' mixture, sum_i softmax(logits)_i p_i(token)
    (one member: its own)."""
    logits = [dict(zip(d.members, d.logits)) for d in decisions]  # per text: member -> mixing logit
    parts: list[list[tuple[float, torch.Tensor]]] = [[] for _ in texts]
    for name, engine in members.items():
        idx = [i for i, c in enumerate(logits) if name in c]
        if idx:
            ids, context = member_tokens(engine.tokenizer, [texts[i] for i in idx], [heads[i] for i in idx], settings)
            for i, lp in zip(idx, token_logprobs(engine, ids, context, settings, f"{desc} -> {name}")):
                if lp is not None:
                    parts[i].append((logits[i][name], lp.double()))
    out = []
    for mix in parts:
        if not mix:
            out.append(LossSum())
            continue
        weights = torch.log_softmax(torch.tensor([w for w, _ in mix], dtype=torch.float64), dim=0)  # [k]
        out.append(loss_sum([mix_logprobs(weights, torch.stack([lp for _, lp in mix]))]))
    return out


def score_set(
    members: dict[str, Engine], route: Callable[[list[str]], list[RouteDecision]], reference, texts: list[str],
    settings: EvalSettings, desc: str,
) -> tuple[list[LossSum], list[str]]:
    """One LossSum per text, each routed on its prefix (a text too short for one scores nothing),
    and the lead member of every text routed."""
    heads = prefixes(reference, texts, settings)
    kept = [i for i, h in enumerate(heads) if h is not None]
    decisions = route([texts[i][:heads[i].chars] for i in kept])
    sums = [LossSum()] * len(texts)
    for i, s in zip(kept, score_routed(members, decisions, [texts[i] for i in kept], [heads[i] for i in kept], settings, desc)):
        sums[i] = s
    return sums, leads(decisions)


def math_routed(
    members: dict[str, Engine], problems: list[dict], settings: EvalSettings, route: Callable[[list[str]], list[RouteDecision]],
) -> tuple[MathScore, list[str]]:
    """`route`: each text's members."""
    if not problems:
        return MathScore(float("nan"), 0, 0, float("nan"), 0, []), []
    decisions = route([MATH_PROMPT.format(question=p["question"]) for p in problems])
    samples: list[MathSample | None] = [None] * len(problems)
    generated = 0
    for name in members:
        idx = [i for i, d in enumerate(decisions) if d.lead == name]
        if not idx:
            continue
        mixes = [Mixture(tuple(members[n] for n in decisions[i].members[1:]), decisions[i].logits)
                 if len(decisions[i].members) > 1 else None for i in idx]
        part = math_accuracy(members[name], [problems[i] for i in idx], settings, mixes)
        generated += part.generated_tokens
        for i, sample in zip(idx, part.samples):
            samples[i] = replace(sample, member="+".join(decisions[i].members))
    return math_score(samples, generated), leads(decisions)


def evaluate_route(
    members: dict[str, Engine], router: RequestRouter, data: EvalData, settings: EvalSettings, top_k: int = 1,
) -> ModelScores:
    """The scores of a route composition: the harness's metrics, plus `routing`: per domain, how
    many of its scored examples (loss set and math problems) each member got (as the lead of a mixture)."""
    names, reference = list(members), next(iter(members.values())).tokenizer
    vocab = [tokenizer_key(m.tokenizer) for m in members.values()] if top_k > 1 else [0] * len(names)

    def route(texts: list[str]) -> list[RouteDecision]:
        return choose(router, names, texts, top_k, vocab)

    domains: dict[str, LossSum] = {}
    timings: dict[str, float] = {}
    routing: dict[str, dict[str, int]] = {}
    for domain, examples in data.domains.items():
        start = time.perf_counter()
        sums, chosen = score_set(members, route, reference, [e["text"] for e in examples], settings, domain)
        domains[domain] = sum(sums, LossSum())
        routing[domain] = {n: chosen.count(n) for n in names}
        timings[f"loss_{domain}"] = time.perf_counter() - start

    start = time.perf_counter()
    sums, _ = score_set(members, route, reference, [e["text"] for _, e in data.mixed], settings, "mixed")
    mixed = mixed_loss(data.mixed, sums)
    timings["mixed"] = time.perf_counter() - start

    start = time.perf_counter()
    chars = CHARS_PER_TOKEN * settings.route_tokens
    math, chosen = math_routed(members, data.math, settings, lambda texts: route([t[:chars] for t in texts]))
    routing["math problems"] = {n: chosen.count(n) for n in names}
    timings["math"] = time.perf_counter() - start
    return ModelScores(domains=domains, mixed=mixed, math=math, timings=timings, routing=routing)
