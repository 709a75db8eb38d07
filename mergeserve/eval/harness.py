"""Score compositions with the mergeserve engine, one row each (eval/results.py).

Every row scores the same tokens, and math the same way (eval/scoring.py). For one model
(`evaluate_engine`):
- loss per domain: total negative log-likelihood over total scored tokens of that domain's
  held-out examples (`Engine.score`, batched and padded; a mixture router reads the first
  `route_tokens` tokens);
- math accuracy: exact match of the greedy answer to each held-out problem;
- mixed set: the interleaved examples of every domain, scored the same way, in total and
  per source domain;
- router load (MoE only): per layer, the share of routing picks each expert got while the
  engine scored each domain's loss set (`Engine.expert_load` deltas);
- a route composition (whole models, eval/route.py): each example scored by the member its
  request router picks from the text of the first N tokens, with the routing confusion.

`evaluate_specs` builds each spec from one shared ExpertPool, one engine at a time.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from mergeserve.engine.engine import Engine
from mergeserve.eval.datasets import EvalData, load_eval_data
from mergeserve.eval.metrics import MATH_PROMPT, LossSum
from mergeserve.eval.results import EvalResults, MathScore, MixedLoss, ModelScores, RouterLoad, Row, RowKind
from mergeserve.eval.route import evaluate_route
from mergeserve.eval.scoring import MATH_STOP, EvalSettings, engine_config, math_accuracy, mixed_loss, score_examples
from mergeserve.experts import ExpertPool
from mergeserve.learn.compose import build, build_members
from mergeserve.router.request import build_request_router
from mergeserve.spec import CompositionSpec, load_composition
from mergeserve.zoo import DOMAINS


def router_stats(picks: torch.Tensor, weight: torch.Tensor, names: list[str]) -> RouterLoad:
    """From picks and summed routing weight per [layer, expert]: each expert's share of a
    layer's picks and the mean routing weight of its picks, per layer and averaged over layers."""
    share = picks.double() / picks.sum(dim=1, keepdim=True).clamp_min(1)  # [L, E]
    mean_weight = weight / picks.double().clamp_min(1)  # [L, E]
    return RouterLoad(dict(zip(names, share.mean(0).tolist())), share.tolist(),
                      dict(zip(names, mean_weight.mean(0).tolist())), mean_weight.tolist())


def evaluate_engine(engine: Engine, data: EvalData, settings: EvalSettings) -> ModelScores:
    """Every metric of one model (see the module docstring); timings in seconds."""
    domains: dict[str, LossSum] = {}
    timings: dict[str, float] = {}
    routed = engine.expert_load is not None
    router: dict[str, RouterLoad] = {}
    for domain, examples in data.domains.items():
        start = time.perf_counter()
        before = (engine.expert_load.clone(), engine.expert_weight.clone()) if routed else None
        sums = score_examples(engine, [e["text"] for e in examples], settings, f"{engine.name} {domain}")
        domains[domain] = sum(sums, LossSum())
        if routed:
            router[domain] = router_stats(engine.expert_load - before[0], engine.expert_weight - before[1], engine.expert_names)
        timings[f"loss_{domain}"] = time.perf_counter() - start

    start = time.perf_counter()
    sums = score_examples(engine, [e["text"] for _, e in data.mixed], settings, f"{engine.name} mixed")
    mixed = mixed_loss(data.mixed, sums)
    timings["mixed"] = time.perf_counter() - start

    start = time.perf_counter()
    math = math_accuracy(engine, data.math, settings)
    timings["math"] = time.perf_counter() - start
    return ModelScores(domains=domains, mixed=mixed, math=math, timings=timings, router=router if routed else None)


def row_kind(spec: CompositionSpec) -> RowKind:
    """What a row is: the base alone, one expert alone, or a merge of several. The base alone is
    an expert named `base` whose source is the spec's base; a whole model of another shape served
    alone (its source is its own base) is an expert."""
    if len(spec.experts) == 1:
        expert = spec.experts[0]
        if expert.name == "base" and spec.base is not None and Path(expert.source).resolve() == Path(spec.base).resolve():
            return RowKind(kind="base")
        return RowKind(kind="expert", expert=expert.name)
    return RowKind(kind=spec.method, experts=[e.name for e in spec.experts])


def fingerprint(spec: CompositionSpec) -> str:
    """The spec and the size and time of every file its sources (and router weights) hold:
    a row computed for an equal fingerprint and equal settings can be reused."""
    files = []
    for path in map(Path, spec.source_paths):
        for f in sorted(path.rglob("*") if path.is_dir() else [path]):
            if f.is_file():
                files.append((str(f), f.stat().st_size, f.stat().st_mtime_ns))
    # Fields left at their defaults are left out, so that a spec field added later (at a default
    # that changes nothing) does not invalidate every row computed before it.
    return hashlib.sha256(json.dumps([spec.model_dump(mode="json", exclude_defaults=True), files]).encode()).hexdigest()


def evaluate_specs(
    specs: list[tuple[str, CompositionSpec]], data: EvalData, settings: EvalSettings, reuse: EvalResults | None = None,
) -> list[Row]:
    """One row per (label, spec): built from one shared pool, one engine alive at a time.

    `reuse`: an earlier run; its rows with the same settings and spec fingerprint are kept.
    """
    same = reuse is not None and {k: v for k, v in reuse.settings.items() if k not in ("unscored", "held_out")} == settings_dict(settings, data)
    earlier = {r.fingerprint: r for r in reuse.rows} if same else {}
    pool, rows = ExpertPool(), []
    for label, spec in tqdm(specs, desc="models", unit="model"):
        key = fingerprint(spec)
        if key in earlier:
            rows.append(replace(earlier[key], spec=label))
            continue
        start = time.perf_counter()
        if spec.routes_requests:
            members = {e.name: Engine(c, engine_config(settings)) for e, c in zip(spec.experts, build_members(spec, pool))}
            router = build_request_router(spec, list(members.values()))
            built = time.perf_counter() - start
            scores = evaluate_route(members, router, data, settings, spec.router.top_k)
        else:
            engine = Engine(build(spec, pool), engine_config(settings))
            built = time.perf_counter() - start
            scores = evaluate_engine(engine, data, settings)
        timings = {"build": built, **scores.timings, "total": time.perf_counter() - start}
        rows.append(Row.of(replace(scores, timings=timings), row_kind(spec), name=spec.name, spec=label, fingerprint=key))
        members = engine = router = None
        gc.collect()
    return rows


def oracle_row(rows: list[Row], domains: tuple[str, ...], math_domain: str = "math") -> Row:
    """Each example scored by its own domain's expert alone: combined from the single-expert rows.

    The expert of domain d is the row with one expert named d (not the base).
    """
    check_oracle(rows, domains)
    experts = {r.expert: r for r in rows if r.kind == "expert"}
    mixed_by = {d: experts[d].mixed.by_domain[d] for d in domains if d in experts[d].mixed.by_domain}
    if math_domain in experts:
        m = experts[math_domain].math
        math = MathScore(m.accuracy, m.correct, m.n, m.formatted)  # its score, without what it generated
    else:
        math = MathScore(float("nan"), 0, 0)
    return Row(
        name="oracle", spec=None, kind="oracle",
        domains={d: experts[d].domains[d] for d in domains},
        mixed=MixedLoss(sum(mixed_by.values(), LossSum()), mixed_by), math=math,
        sources={d: experts[d].name for d in domains},
    )


def check_oracle(kinds: list[RowKind], domains: tuple[str, ...]) -> None:
    have = {k.expert for k in kinds if k.kind == "expert"}
    missing = [d for d in domains if d not in have]
    if missing:
        raise ValueError(f"--oracle needs a single-expert spec per domain (its expert named after the domain); none for {missing}")


def unscored(row: Row, data: EvalData) -> dict[str, int]:
    """The texts a row scored nothing of (at most `route_tokens` tokens): per domain, and in the mixed set."""
    return {**{d: len(e) - row.domains[d].examples for d, e in data.domains.items()},
            "mixed": len(data.mixed) - row.mixed.total.examples}


def settings_dict(settings: EvalSettings, data: EvalData) -> dict:
    return {**asdict(settings), "math_stop": list(MATH_STOP), "math_prompt": MATH_PROMPT,
            # Rows scored by an earlier rule (every token after the first) must not be reused.
            "scored": "tokens at positions >= route_tokens, after the max_tokens cut; routers choose from the tokens before",
            "loss_examples": {d: len(e) for d, e in data.domains.items()},
            "mixed_examples": len(data.mixed), "math_problems": len(data.math),
            # Rows scored on other texts (a regenerated held-out split) must not be reused.
            "data_sha256": hashlib.sha256(json.dumps([data.domains, data.math, data.mixed], sort_keys=True).encode()).hexdigest()}


def evaluate(
    spec_paths: list[str | Path], data_dir: str | Path, settings: EvalSettings = EvalSettings(),
    oracle: bool = False, domains: tuple[str, ...] | None = None, reuse: dict | None = None, held_out: str = "heldout",
) -> EvalResults:
    """`mergeserve eval`: every spec's row (and the oracle's) on one held-out set, with the settings and wall time.

    `reuse`: an earlier results.json, as read; its rows with the same settings and spec fingerprint are kept.
    """
    start = time.perf_counter()
    specs = [(str(p), load_composition(p)) for p in spec_paths]  # every spec checked before any is built
    domains = domains or DOMAINS
    if oracle:
        check_oracle([row_kind(spec) for _, spec in specs], domains)
    data = load_eval_data(data_dir, domains, settings.per_domain, settings.mixed_per_domain,
                          settings.math_examples, settings.seed, held_out=held_out)
    rows = evaluate_specs(specs, data, settings, EvalResults.from_json(reuse) if reuse is not None else None)
    # Texts too short to score: the same for rows of one tokenizer (all the zoo's), else per row.
    counts = [unscored(r, data) for r in rows]
    same = all(c == counts[0] for c in counts)
    short = counts[0] if counts and same else {r.name: c for r, c in zip(rows, counts)}
    return EvalResults(list(domains), settings_dict(settings, data) | {"unscored": short, "held_out": held_out}, rows,
                       oracle_row(rows, domains) if oracle else None, time.perf_counter() - start)
