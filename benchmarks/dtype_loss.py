"""Held-out loss of a composition in each weight format, against fp32.

Scores the zoo's held-out splits (the first `--examples` of each domain, `--max-tokens`
tokens each, as the eval harness does) with the composition built in float32, in bfloat16
and in int8 (bf16 weights run as int8, kernels/int8.py), and reports each domain's mean
per-token loss and its difference from float32. The losses are deterministic (one run; a
rerun on the same machine and versions gives the same figures), so there are no rounds;
`seconds` per dtype is one reading, kept for the record only.
Writes benchmarks/results/dtype_loss.json.

    .venv/bin/python benchmarks/dtype_loss.py [--spec examples/demo_moe.yaml] [--examples 24]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine  # noqa: E402

from mergeserve.engine.engine import Engine  # noqa: E402
from mergeserve.eval.datasets import load_eval_data  # noqa: E402
from mergeserve.eval.metrics import LossSum  # noqa: E402
from mergeserve.eval.scoring import EvalSettings, engine_config, score_examples  # noqa: E402
from mergeserve.experts import ExpertPool  # noqa: E402
from mergeserve.learn.compose import build  # noqa: E402
from mergeserve.spec import load_composition  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("math", "german", "code")
FORMATS = ("float32", "bfloat16", "int8")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", default=str(ROOT / "examples/demo_moe.yaml"))
    p.add_argument("--examples", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/dtype_loss.json"))
    args = p.parse_args()
    started, info = time.perf_counter(), machine()
    torch.set_num_threads(args.threads)
    data = load_eval_data(ROOT / "examples/zoo/data", DOMAINS, per_domain=args.examples, mixed_per_domain=0, math_examples=0)
    settings = EvalSettings(max_tokens=args.max_tokens, per_domain=args.examples)
    spec = load_composition(args.spec)
    rows = {}
    for dtype in FORMATS:
        start = time.perf_counter()
        engine = Engine(build(spec.model_copy(update={"dtype": dtype}), ExpertPool()), engine_config(settings))
        losses = {}
        for d in DOMAINS:
            scored = score_examples(engine, [e["text"] for e in data.domains[d]], settings, d)
            losses[d] = sum(scored, LossSum()).loss
        rows[dtype] = {"loss": losses, "seconds": time.perf_counter() - start}
        print(dtype, {d: round(v, 4) for d, v in losses.items()}, flush=True)
    fp32 = rows["float32"]["loss"]
    diff = {f: {d: rows[f]["loss"][d] - fp32[d] for d in DOMAINS} for f in FORMATS[1:]}  # format -> domain -> loss
    result = {
        "machine": info | {"load_1m_end": os.getloadavg()[0]}, "commit": commit(),
        "spec": str(Path(args.spec).resolve().relative_to(ROOT)), "examples_per_domain": args.examples,
        "max_tokens": args.max_tokens, "threads": args.threads, "deterministic": True,
        "rows": rows, "minus_float32": diff,
        "relative": {f: {d: diff[f][d] / fp32[d] for d in DOMAINS} for f in diff},
        "wall_s": time.perf_counter() - started,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["minus_float32"], indent=2))


if __name__ == "__main__":
    main()
