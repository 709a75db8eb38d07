"""Score compositions with the mergeserve engine.

Every row scores the same tokens: each example is tokenized without special tokens and cut to
`max_tokens` tokens; its first N = `route_tokens` tokens are context only (a router, if the row
has one, chooses from them) and the tokens at positions >= N are scored, each conditioned on all
before it. An example of at most N tokens scores nothing (the results count these, `unscored`).

For one model (`evaluate_engine`):
- loss per domain: total negative log-likelihood over total scored tokens of that domain's
  held-out examples (`Engine.score`, batched and padded; a sequence router reads the first N);
- math accuracy: greedy generation from `Question: <question>\\n` (one `Engine.generate`
  call for all problems), cut after the first `Answer:` line, exact match of its number;
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from mergeserve.engine.engine import Engine
from mergeserve.engine.mixing import Mixture
from mergeserve.engine.sequence import SamplingParams
from mergeserve.eval.datasets import EvalData
from mergeserve.eval.metrics import MATH_PROMPT, LossSum, cut_at_answer_line, extract_answer, loss_sum, matches, tokenize
from mergeserve.spec import CompositionSpec, EngineConfig

# Generation stops early at a blank line or a new question; the answer line is cut afterwards.
MATH_STOP = ("\n\n", "\nQuestion:")


@dataclass(frozen=True)
class EvalSettings:
    # Counts sized so a table of ~10 models takes under 30 minutes on 2 cores (~2 min a model):
    # 48 loss examples per domain are also what the zoo's model cards report.
    max_tokens: int = 256  # tokens kept per example for the loss
    per_domain: int | None = 48  # loss examples per domain: the first N of each file (None: all)
    mixed_per_domain: int = 8
    math_examples: int = 50  # the first N held-out math problems
    max_new_tokens: int = 160
    seed: int = 0  # the mixed set's sample and order
    chunk: int = 32  # sequences per `Engine.score` call (the progress bar's step)
    max_num_seqs: int = 32  # concurrent generations
    max_batch_tokens: int = 4096  # padded tokens per scoring forward
    route_tokens: int = 32  # each text's first N tokens are context only (routers choose from them); the rest are scored

    def __post_init__(self) -> None:
        if self.route_tokens < 1:
            raise ValueError("route_tokens must be at least 1: the first token has nothing to be scored against")


def engine_config(settings: EvalSettings) -> EngineConfig:
    return EngineConfig(
        max_num_seqs=settings.max_num_seqs, max_model_len=max(512, settings.max_tokens),
        max_prefill_tokens=1024,
    )


def token_logprobs(
    engine: Engine, ids: list[list[int]], context: list[int], settings: EvalSettings, desc: str,
) -> list[torch.Tensor | None]:
    """Per sequence, the log-probability of each token at a position >= its `context` (>= 1),
    given every token before it; None where no token is. A sequence router reads the first
    `route_tokens` tokens."""
    keep = [i for i, x in enumerate(ids) if len(x) > context[i]]
    out: list[torch.Tensor | None] = [None] * len(ids)
    for start in tqdm(range(0, len(keep), settings.chunk), desc=desc, unit="chunk", leave=False):
        batch = keep[start:start + settings.chunk]
        for i, lp in zip(batch, engine.score([ids[i] for i in batch], settings.max_batch_tokens, settings.route_tokens)):
            out[i] = lp[context[i] - 1:]  # lp[t - 1] scores token t
    return out


def score_examples(engine: Engine, texts: list[str], settings: EvalSettings, desc: str) -> list[LossSum]:
    """One LossSum per text: its tokens from position `route_tokens` on (a shorter text scores nothing)."""
    ids = tokenize(engine.tokenizer, texts, settings.max_tokens)
    lps = token_logprobs(engine, ids, [settings.route_tokens] * len(ids), settings, desc)
    return [LossSum() if lp is None else loss_sum([lp]) for lp in lps]


def math_accuracy(
    engine: Engine, problems: list[dict], settings: EvalSettings, mixes: list[Mixture | None] | None = None,
) -> dict:
    """`mixes`: per problem, the other engines (and weights) its tokens are drawn from with this one's."""
    if not problems:
        return {"accuracy": float("nan"), "correct": 0, "n": 0, "generated_tokens": 0, "samples": []}
    prompts = [engine.tokenizer(MATH_PROMPT.format(question=p["question"]), add_special_tokens=False).input_ids
               for p in problems]
    params = SamplingParams(max_tokens=settings.max_new_tokens, temperature=0, stop=MATH_STOP)
    outputs = engine.generate(prompts, [replace(params, mix=m) for m in mixes] if mixes else params)
    correct, formatted, samples = 0, 0, []
    for problem, out in zip(problems, outputs):
        text = cut_at_answer_line(engine.tokenizer.decode(out, skip_special_tokens=True))
        got = extract_answer(text)
        ok = matches(got, problem["answer"])
        correct += ok
        formatted += got is not None
        samples.append({"answer": problem["answer"], "extracted": got, "correct": ok, "output": text})
    # `formatted`: outputs that end in an `Answer: N` line at all, the math expert's format.
    return {"accuracy": correct / len(problems), "correct": correct, "n": len(problems),
            "formatted": formatted / len(problems), "generated_tokens": sum(map(len, outputs)), "samples": samples}


def router_stats(picks: torch.Tensor, weight: torch.Tensor, names: list[str]) -> dict:
    """From picks and summed routing weight per [layer, expert]: each expert's share of a
    layer's picks and the mean routing weight of its picks, per layer and averaged over layers."""
    share = picks.double() / picks.sum(dim=1, keepdim=True).clamp_min(1)  # [L, E]
    mean_weight = weight / picks.double().clamp_min(1)  # [L, E]
    return {"experts": dict(zip(names, share.mean(0).tolist())), "per_layer": share.tolist(),
            "mean_weight": dict(zip(names, mean_weight.mean(0).tolist())), "mean_weight_per_layer": mean_weight.tolist()}


def mixed_result(mixed: list[tuple[str, dict]], sums: list[LossSum]) -> dict:
    """The mixed set's loss in total and per source domain, from each example's LossSum."""
    by_domain: dict[str, LossSum] = {}
    for (domain, _), s in zip(mixed, sums):
        by_domain[domain] = by_domain.get(domain, LossSum()) + s
    return {**sum(sums, LossSum()).as_dict(), "by_domain": {d: s.as_dict() for d, s in by_domain.items()}}


def evaluate_engine(engine: Engine, data: EvalData, settings: EvalSettings) -> dict:
    """Every metric of one model (see the module docstring); timings in seconds."""
    result: dict = {"domains": {}, "timings": {}}
    routed = engine.expert_load is not None
    router: dict[str, dict] = {}
    for domain, examples in data.domains.items():
        start = time.perf_counter()
        before = (engine.expert_load.clone(), engine.expert_weight.clone()) if routed else None
        sums = score_examples(engine, [e["text"] for e in examples], settings, f"{engine.name} {domain}")
        result["domains"][domain] = sum(sums, LossSum()).as_dict()
        if routed:
            router[domain] = router_stats(engine.expert_load - before[0], engine.expert_weight - before[1], engine.expert_names)
        result["timings"][f"loss_{domain}"] = time.perf_counter() - start

    start = time.perf_counter()
    sums = score_examples(engine, [e["text"] for _, e in data.mixed], settings, f"{engine.name} mixed")
    result["mixed"] = mixed_result(data.mixed, sums)
    result["timings"]["mixed"] = time.perf_counter() - start

    start = time.perf_counter()
    result["math"] = math_accuracy(engine, data.math, settings)
    result["timings"]["math"] = time.perf_counter() - start
    if routed:
        result["router"] = router
    return result


def row_kind(spec: CompositionSpec) -> dict:
    """What a row is: the base alone, one expert alone, or a merge of several. The base alone is
    an expert named `base` whose source is the spec's base; a whole model of another shape served
    alone (its source is its own base) is an expert."""
    if len(spec.experts) == 1:
        expert = spec.experts[0]
        if expert.name == "base" and spec.base is not None and Path(expert.source).resolve() == Path(spec.base).resolve():
            return {"kind": "base"}
        return {"kind": "expert", "expert": expert.name}
    return {"kind": spec.method, "experts": [e.name for e in spec.experts]}


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
    specs: list[tuple[str, CompositionSpec]], data: EvalData, settings: EvalSettings, reuse: dict | None = None,
) -> list[dict]:
    """One row per (label, spec): built from one shared pool, one engine alive at a time.

    `reuse` is an earlier results.json: its rows with the same settings and spec fingerprint are kept.
    """
    from mergeserve.eval.route import evaluate_route
    from mergeserve.experts import ExpertPool
    from mergeserve.merge import build
    from mergeserve.router.request import build_request_router

    same = reuse is not None and {k: v for k, v in reuse["settings"].items() if k != "unscored"} == settings_dict(settings, data)
    earlier = {r.get("fingerprint"): r for r in reuse["rows"]} if same else {}
    pool, rows = ExpertPool(), []
    for label, spec in tqdm(specs, desc="models", unit="model"):
        key = fingerprint(spec)
        if key in earlier:
            rows.append(earlier[key] | {"spec": label})
            continue
        start = time.perf_counter()
        if spec.method == "route":
            members = {e.name: Engine(build(spec.member(e), pool), engine_config(settings)) for e in spec.experts}
            router = build_request_router(spec, list(members.values()))
            built = time.perf_counter() - start
            metrics = evaluate_route(members, router, data, settings, spec.router.top_k)
        else:
            engine = Engine(build(spec, pool), engine_config(settings))
            built = time.perf_counter() - start
            metrics = evaluate_engine(engine, data, settings)
        row = {"name": spec.name, "spec": label, "fingerprint": key, **row_kind(spec), **metrics}
        row["timings"] = {"build": built, **row["timings"], "total": time.perf_counter() - start}
        rows.append(row)
        members = engine = router = None
        gc.collect()
    return rows


def oracle_row(rows: list[dict], domains: tuple[str, ...], math_domain: str = "math") -> dict:
    """Each example scored by its own domain's expert alone: combined from the single-expert rows.

    The expert of domain d is the row with one expert named d (not the base).
    """
    check_oracle(rows, domains)
    experts = {r["expert"]: r for r in rows if r["kind"] == "expert"}
    mixed_by = {d: LossSum.from_dict(experts[d]["mixed"]["by_domain"][d])
                for d in domains if d in experts[d]["mixed"]["by_domain"]}
    math = experts[math_domain]["math"] if math_domain in experts else {"accuracy": float("nan"), "correct": 0, "n": 0}
    return {
        "name": "oracle", "spec": None, "kind": "oracle",
        "domains": {d: experts[d]["domains"][d] for d in domains},
        "mixed": {**sum(mixed_by.values(), LossSum()).as_dict(), "by_domain": {d: s.as_dict() for d, s in mixed_by.items()}},
        "math": {k: math[k] for k in ("accuracy", "correct", "n", "formatted") if k in math},
        "sources": {d: experts[d]["name"] for d in domains},
    }


def check_oracle(kinds: list[dict], domains: tuple[str, ...]) -> None:
    have = {k["expert"] for k in kinds if k["kind"] == "expert"}
    missing = [d for d in domains if d not in have]
    if missing:
        raise ValueError(f"--oracle needs a single-expert spec per domain (its expert named after the domain); none for {missing}")


def unscored(row: dict, data: EvalData) -> dict[str, int]:
    """The texts a row scored nothing of (at most `route_tokens` tokens): per domain, and in the mixed set."""
    return {**{d: len(e) - row["domains"][d]["examples"] for d, e in data.domains.items()},
            "mixed": len(data.mixed) - row["mixed"]["examples"]}


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
    oracle: bool = False, domains: tuple[str, ...] | None = None, reuse: dict | None = None,
) -> dict:
    """`mergeserve eval`: every spec's row (and the oracle's), with the settings and wall time."""
    from mergeserve.eval.datasets import load_eval_data
    from mergeserve.spec import load_composition
    from mergeserve.zoo import DOMAINS

    start = time.perf_counter()
    specs = [(str(p), load_composition(p)) for p in spec_paths]  # every spec checked before any is built
    domains = domains or DOMAINS
    if oracle:
        check_oracle([row_kind(spec) for _, spec in specs], domains)
    data = load_eval_data(data_dir, domains, settings.per_domain, settings.mixed_per_domain,
                          settings.math_examples, settings.seed)
    rows = evaluate_specs(specs, data, settings, reuse)
    # Texts too short to score: the same for rows of one tokenizer (all the zoo's), else per row.
    counts = [unscored(r, data) for r in rows]
    same = all(c == counts[0] for c in counts)
    short = counts[0] if counts and same else {r["name"]: c for r, c in zip(rows, counts)}
    return {
        "domains": list(domains), "settings": settings_dict(settings, data) | {"unscored": short}, "rows": rows,
        "oracle": oracle_row(rows, domains) if oracle else None, "wall_s": time.perf_counter() - start,
    }
