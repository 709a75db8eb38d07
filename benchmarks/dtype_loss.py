"""Held-out loss of a composition in each weight format, against fp32.

Scores the zoo's held-out splits (the first `--examples` of each domain, `--max-tokens`
tokens each, as the eval harness does) with the composition built in float32 and in
bfloat16, and reports each domain's mean per-token loss and the difference. Writes
benchmarks/results/dtype_loss.json.

    .venv/bin/python benchmarks/dtype_loss.py [--spec examples/demo_moe.yaml] [--examples 24]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from mergeserve.engine.engine import Engine
from mergeserve.eval.datasets import load_eval_data
from mergeserve.eval.harness import EvalSettings, engine_config, score_examples
from mergeserve.eval.metrics import LossSum
from mergeserve.experts import ExpertPool
from mergeserve.kernels.capability import cpu_flags
from mergeserve.merge import build
from mergeserve.spec import load_composition

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("math", "german", "code")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", default=str(ROOT / "examples/demo_moe.yaml"))
    p.add_argument("--examples", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/dtype_loss.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_eval_data(ROOT / "examples/zoo/data", DOMAINS, per_domain=args.examples, mixed_per_domain=0, math_examples=0)
    settings = EvalSettings(max_tokens=args.max_tokens, per_domain=args.examples)
    spec = load_composition(args.spec)
    rows = {}
    for dtype in ("float32", "bfloat16"):
        start = time.perf_counter()
        engine = Engine(build(spec.model_copy(update={"dtype": dtype}), ExpertPool()), engine_config(settings))
        losses = {}
        for d in DOMAINS:
            scored = score_examples(engine, [e["text"] for e in data.domains[d]], settings, d)
            losses[d] = sum(scored, LossSum()).loss
        rows[dtype] = {"loss": losses, "seconds": time.perf_counter() - start}
        print(dtype, {d: round(v, 4) for d, v in losses.items()}, flush=True)
    diff = {d: rows["bfloat16"]["loss"][d] - rows["float32"]["loss"][d] for d in DOMAINS}
    result = {
        "spec": str(Path(args.spec).resolve().relative_to(ROOT)), "examples_per_domain": args.examples,
        "max_tokens": args.max_tokens, "cpu": platform.processor() or platform.machine(),
        "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
        "rows": rows, "bfloat16_minus_float32": diff,
        "relative": {d: diff[d] / rows["float32"]["loss"][d] for d in DOMAINS},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["bfloat16_minus_float32"], indent=2))


if __name__ == "__main__":
    main()
