"""The compiled step against the eager one, in one process, for a composition and its base alone.

For each model an engine that compiles (engine.compile: buckets, freeze, autotune as given) and one
that stays eager, over the same weights. Measured:
- compile: the seconds from start until every graph was ready, and how many came from inductor's
  cache (with --warm, a second compiling engine over the same cache folder: what a restart gets);
- decode: milliseconds per step at each of `--rows` running sequences (every sequence past its
  prompt, so each step is one decode forward), the mean of `--steps` steps per round;
- prefill: milliseconds for the step that prefills one prompt, and for the step that prefills
  `--prompts` prompts at once (packed into one row of the prefill graph, compiled).
Rounds interleave the compiled and eager engines; each figure is a spread over the rounds, and so
are the ratios compiled / eager and composition / base (per round). The target of issue 25: the
top-2 LoRA MoE's decode step at most 1.15x the base's, both compiled.
Writes benchmarks/results/compiled_step.json.

    .venv/bin/python benchmarks/compiled_step.py [--spec examples/demo_moe.yaml] [--rows 1 8 16] [--rounds 5] [--no-freeze] [--warm]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine, spread  # noqa: E402

from mergeserve.engine.engine import Engine  # noqa: E402
from mergeserve.engine.sequence import SamplingParams  # noqa: E402
from mergeserve.experts import ExpertPool  # noqa: E402
from mergeserve.learn.compose import build  # noqa: E402
from mergeserve.spec import EngineConfig, load_composition  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE_SPEC = ROOT / "examples/zoo/specs/base.yaml"
TEXT = ("The lighthouse keeper climbed the stairs at dusk, as he had every evening for thirty years, and found "
        "a bottle on the landing with a message folded inside it. ") * 8


def engine(composed, rows: int, prompt_tokens: int, compile: dict | None) -> Engine:
    config = EngineConfig(max_num_seqs=max(rows), max_prefill_tokens=prompt_tokens, max_model_len=1024,
                          compile=compile or {"enabled": False})
    return Engine(composed, config)


def decode_ms(e: Engine, prompt: list[int], rows: int, steps: int) -> float:
    """Mean milliseconds of `steps` decode steps with `rows` sequences running."""
    params = SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True)
    for i in range(rows):
        e.add_request(f"d{i}", prompt, params)
    started: set[str] = set()
    while len(started) < rows:  # prefills (and the decodes between them) until every sequence has a token
        started.update(o.request_id for o in e.step() if o.new_token_ids)
    t0 = time.perf_counter()
    for _ in range(steps):
        e.step()
    ms = (time.perf_counter() - t0) * 1000 / steps
    drain(e, [f"d{i}" for i in range(rows)])
    return ms


def prefill_ms(e: Engine, prompts: list[list[int]]) -> float:
    """Milliseconds of the one step that prefills every prompt (the engine's prefill budget holds them)."""
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        e.add_request(f"p{i}", ids, params)
    t0 = time.perf_counter()
    e.step()
    ms = (time.perf_counter() - t0) * 1000
    drain(e, [f"p{i}" for i in range(len(prompts))])
    return ms


def drain(e: Engine, ids: list[str]) -> None:
    for rid in ids:
        e.abort(rid)
    while e.has_work():
        e.step()


def compile_settings(args, cache_dir: str) -> dict:
    return {"enabled": True, "buckets": args.rows, "freeze": args.freeze, "autotune": args.autotune, "cache_dir": cache_dir}


def compiled_engine(composed, args, cache_dir: str, prompt_tokens: int) -> tuple[Engine, dict]:
    e = engine(composed, args.rows, prompt_tokens, compile_settings(args, cache_dir))
    e.runner.compiled.wait()
    state = e.compile_state
    if state["status"] != "ready":
        raise SystemExit(f"compiling {composed.name} failed: {state}")
    return e, {"seconds": state["seconds"], "cached_graphs": state["cached_graphs"], "buckets": state["bucket_seconds"],
               "prefill": state["prefill"]["seconds"]}


def measure(name: str, composed, args, cache_dir: str) -> dict:
    tokenizer = composed.tokenizer
    prompt = tokenizer(TEXT).input_ids[:args.prompt_tokens]
    packed = [tokenizer(TEXT).input_ids[i:i + args.prompt_tokens // args.prompts] for i in range(args.prompts)]
    budget = max(args.prompt_tokens, sum(len(p) for p in packed))
    print(f"{name}: compiling", flush=True)
    compiled, compile_cold = compiled_engine(composed, args, cache_dir, budget)
    result = {"compile": {"cold": compile_cold}}
    if args.warm:  # a restart over the same cache folder
        warm, result["compile"]["warm"] = compiled_engine(composed, args, cache_dir, budget)
        del warm
    eager = engine(composed, args.rows, budget, None)
    sides = {"compiled": compiled, "eager": eager}
    for e in sides.values():  # warm-ups: each batch size once
        for rows in args.rows:
            decode_ms(e, prompt[:16], rows, 2)
        prefill_ms(e, [prompt]), prefill_ms(e, packed)
    rounds: dict[str, dict[str, list[float]]] = {side: {} for side in sides}
    for r in range(args.rounds):
        for side, e in sides.items():
            for rows in args.rows:
                rounds[side].setdefault(f"decode_{rows}", []).append(decode_ms(e, prompt[:16], rows, args.steps))
            rounds[side].setdefault("prefill_1", []).append(prefill_ms(e, [prompt]))
            rounds[side].setdefault(f"prefill_{args.prompts}", []).append(prefill_ms(e, packed))
        print(f"{name} round {r + 1}: " + ", ".join(f"{side} {k} {v[-1]:.1f}" for side in rounds for k, v in rounds[side].items()), flush=True)
    state = compiled.compile_state
    if state["eager_steps"] or state["prefill"]["eager_steps"]:
        print(f"warning: {name} ran {state['eager_steps']} decode and {state['prefill']['eager_steps']} prefill steps eagerly", flush=True)
    result["ms"] = {side: {k: spread(v) for k, v in figures.items()} for side, figures in rounds.items()}
    result["compiled_over_eager"] = {k: spread([c / e for c, e in zip(rounds["compiled"][k], rounds["eager"][k])])
                                     for k in rounds["compiled"]}
    result["compiled_counts"] = {"decode": state["compiled_steps"], "decode_eager": state["eager_steps"],
                                 "prefill": state["prefill"]["compiled_steps"], "prefill_eager": state["prefill"]["eager_steps"]}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(ROOT / "examples/demo_moe.yaml"))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=4, help="prompts prefilled in one step (packed)")
    p.add_argument("--no-freeze", dest="freeze", action="store_false")
    p.add_argument("--no-autotune", dest="autotune", action="store_false")
    p.add_argument("--warm", action="store_true", help="also compile again from the warm cache (a restart)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/compiled_step.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pool = ExpertPool()
    models = {"composition": args.spec, "base": str(BASE_SPEC)}
    results = {"machine": machine(), "commit": commit(), "args": vars(args), "models": {}}
    with tempfile.TemporaryDirectory(prefix="mergeserve-compile-bench-") as cache:
        for name, path in models.items():
            spec = load_composition(path).model_copy(update={"dtype": args.dtype})
            results["models"][name] = measure(name, build(spec, pool), args, str(Path(cache) / name))
    comp, base = (results["models"][m]["ms"] for m in ("composition", "base"))
    results["composition_over_base"] = {
        side: {k: spread([c / b for c, b in zip(comp[side][k]["rounds"], base[side][k]["rounds"])]) for k in comp[side]}
        for side in comp}
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps({k: results[k] for k in ("composition_over_base",)}, indent=1))


if __name__ == "__main__":
    with torch.inference_mode():
        main()
