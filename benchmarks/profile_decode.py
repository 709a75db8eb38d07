"""Profile the engine's decode step with torch.profiler: where a token's time goes.

Builds a composition (the demo by default), starts `--batch` greedy requests, runs the
prefill, then profiles `--steps` decode steps and prints the top operators by self CPU
time, plus time per step. Writes benchmarks/results/profile_decode.json.

    .venv/bin/python benchmarks/profile_decode.py [SPEC] [--batch 8] [--steps 16] [--lora merged]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mergeserve.engine.engine import Engine
from mergeserve.engine.sequence import SamplingParams
from mergeserve.experts import ExpertPool
from mergeserve.merge import build
from mergeserve.spec import EngineConfig, load_composition

ROOT = Path(__file__).resolve().parent.parent


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((line.split(":")[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("spec", nargs="?", default=str(ROOT / "examples/demo_moe.yaml"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--lora", choices=["factored", "merged"], default="factored")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default=None, help="override the spec's dtype")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/profile_decode.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec = load_composition(args.spec)
    if args.dtype:
        spec = spec.model_copy(update={"dtype": args.dtype})
    pool = ExpertPool(lora=args.lora)
    engine = Engine(build(spec, pool), EngineConfig(max_num_seqs=max(16, args.batch)))
    prompt = engine.tokenizer("Write a short story about a lighthouse keeper.")["input_ids"]
    params = SamplingParams(max_tokens=args.steps * 4 + 8, temperature=0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"p{i}", prompt, params)
    while any(s.in_prefill for s in engine.scheduler.running) or engine.scheduler.waiting or engine._inbox:
        engine.step()
    for _ in range(4):  # warm up
        engine.step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step()
    wall = time.perf_counter() - start
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(table)
    untraced = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    step_ms = (time.perf_counter() - untraced) / args.steps * 1000
    print(f"{step_ms:.1f} ms per decode step at batch {args.batch} ({args.batch / step_ms * 1000:.1f} tok/s), "
          f"{wall / args.steps * 1000:.1f} ms under the profiler")
    top = [
        {"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1000 / args.steps, "calls_per_step": e.count / args.steps}
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "spec": args.spec, "batch": args.batch, "lora": args.lora, "dtype": spec.dtype, "step_ms": step_ms,
        "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(), "top_ops_per_step": top,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
