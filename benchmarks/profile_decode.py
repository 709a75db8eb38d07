"""Profile the engine's decode step with torch.profiler: where a token's time goes.

Builds a composition (the demo by default) and its engine once. `--rounds` rounds; in each,
for every batch size of `--batch` in turn (1 then 8 by default): start that many greedy
requests, run their prefill and 4 warm-up decode steps, profile `--steps` decode steps, time
`--steps` more without the profiler, then drop the requests. Recorded per round and batch: the
untraced time per step (`step_ms`), the top operators by self CPU time per step, and the
biggest linear operator (`linear`: the oneDNN, BLAS or int8 matmuls) with `rest_ms` = step_ms minus
its self time. Every round is kept; each figure is a spread (median, min, max;
benchmarks/common.py). Writes benchmarks/results/profile_decode.json.

    .venv/bin/python benchmarks/profile_decode.py [SPEC] [--batch 1,8] [--steps 16] [--rounds 5] [--lora merged]
        [--dtype auto|float32|bfloat16|int8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine, spread  # noqa: E402

from mergeserve.engine.engine import Engine  # noqa: E402
from mergeserve.engine.sequence import SamplingParams  # noqa: E402
from mergeserve.experts import ExpertPool  # noqa: E402
from mergeserve.kernels.capability import FORMATS, resolve_format  # noqa: E402
from mergeserve.learn.compose import build  # noqa: E402
from mergeserve.spec import EngineConfig, load_composition  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOP = 25
LINEAR_OPS = ("aten::_weight_int8pack_mm", "aten::addmm", "aten::mm")  # besides oneDNN's *linear* ops


def measure(engine: Engine, batch: int, steps: int, tag: str) -> dict:
    """One batch size in one round: prefill, warm up, profile, time; the requests dropped after."""
    prompt = engine.tokenizer("Write a short story about a lighthouse keeper.")["input_ids"]
    params = SamplingParams(max_tokens=2 * steps + 8, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", prompt, params)
    while engine.num_waiting or any(s.in_prefill for s in engine.scheduler.running):
        engine.step()
    for _ in range(4):  # warm up
        engine.step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    profiled = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step_ms = (time.perf_counter() - start) / steps * 1000
    engine.abort_all()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    top = [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1000 / steps, "calls_per_step": e.count / steps}
           for e in ops[:TOP]]
    linear = next((op for op in top if "linear" in op["op"] or op["op"] in LINEAR_OPS), None)
    return {"step_ms": step_ms, "profiled_step_ms": profiled / steps * 1000, "linear": linear,
            "rest_ms": step_ms - linear["self_cpu_ms"] if linear else None, "top_ops_per_step": top}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec", nargs="?", default=str(ROOT / "examples/demo_moe.yaml"))
    p.add_argument("--batch", default="1,8", help="batch sizes, comma-separated, measured in turn each round")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--lora", choices=["factored", "merged"], default="factored")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=["auto", *FORMATS],
                   help="the composition's dtype (auto: by CPU flags and a measurement; int8: bf16 weights run as int8)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/profile_decode.json"))
    args = p.parse_args()
    started, info = time.perf_counter(), machine()
    batches = [int(b) for b in args.batch.split(",")]
    torch.set_num_threads(args.threads)
    spec = load_composition(args.spec).model_copy(update={"dtype": args.dtype})
    pool = ExpertPool(lora=args.lora)
    engine = Engine(build(spec, pool), EngineConfig(max_num_seqs=max(16, *batches)), pool.packer)
    rounds: dict[str, list[dict]] = {str(b): [] for b in batches}
    for r in range(1, args.rounds + 1):
        for b in batches:
            m = measure(engine, b, args.steps, f"r{r}b{b}")
            rounds[str(b)].append({"round": r, **m})
            lin = m["linear"] or {"op": "-", "self_cpu_ms": float("nan"), "calls_per_step": 0}
            print(f"round {r} batch {b}: {m['step_ms']:.1f} ms per step ({b / m['step_ms'] * 1000:.1f} tok/s), "
                  f"{lin['op']} {lin['calls_per_step']:.0f} calls {lin['self_cpu_ms']:.1f} ms; "
                  f"{m['profiled_step_ms']:.1f} ms under the profiler", flush=True)
    summary = {}
    for b, rs in rounds.items():
        summary[b] = {k: spread([x[k] for x in rs]) for k in ("step_ms", "profiled_step_ms")}
        if all(x["linear"] for x in rs):
            summary[b] |= {"linear_op": sorted({x["linear"]["op"] for x in rs}),
                           "linear_calls_per_step": spread([x["linear"]["calls_per_step"] for x in rs]),
                           "linear_ms": spread([x["linear"]["self_cpu_ms"] for x in rs]),
                           "rest_ms": spread([x["rest_ms"] for x in rs])}
    result = {
        "machine": info | {"load_1m_end": os.getloadavg()[0]}, "commit": commit(),
        "spec": str(Path(args.spec).resolve().relative_to(ROOT)),
        "settings": {"lora": args.lora, "dtype_requested": args.dtype,
                     "dtype": resolve_format(args.dtype), "threads": args.threads, "batches": batches, "steps": args.steps},
        "method": {"rounds": args.rounds, "order": "per round, the batch sizes in turn on one engine",
                   "step_ms": "untraced decode steps, mean over `steps`",
                   "linear_ms": "self CPU time per step of the biggest linear operator, under the profiler"},
        "rounds": rounds, "summary": summary, "wall_s": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({b: {k: v["median"] if isinstance(v, dict) else v for k, v in s.items()} for b, s in summary.items()}))


if __name__ == "__main__":
    main()
