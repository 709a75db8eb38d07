"""BTX's averaged attention over LoRA experts: materialised once, or kept as a stacked factor?

base + (1/E) sum_i B_i A_i is one dense [out, in] weight (what the builder keeps), or the base
plus the experts' factors stacked: A_all [E*r, in], B_all / E [out, E*r], run as two extra thin
matmuls. This times both for SmolLM2's attention projections (q, o 576x576; k, v 192x576, all
30 layers) at decode batch sizes, in each weight format, the way the engine runs them
(kernels.lowrank.linear; bf16 bases packed for oneDNN where that works).

    .venv/bin/python benchmarks/btx_attention.py [--experts 3] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mergeserve.composition import LowRank
from mergeserve.kernels.capability import cpu_flags
from mergeserve.kernels.lowrank import linear
from mergeserve.kernels.packed import pack_private, packing_works

OUT = Path(__file__).parent / "results" / "btx_attention.json"
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576)]  # q, k, v, o
LAYERS = 30


def weights(dtype: torch.dtype, experts: int, rank: int, stacked: bool) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(LAYERS):
        for o, i in SHAPES:
            base = torch.randn(o, i, generator=g) * 0.02
            a = torch.randn(experts * rank, i, generator=g) * 0.02  # [E*r, in]
            b = torch.randn(o, experts * rank, generator=g) * 0.02 / experts  # [out, E*r], the 1/E folded in
            if stacked:
                w = LowRank(base.to(dtype), a.to(dtype), b.to(dtype), 1.0)
                if dtype == torch.bfloat16 and packing_works():
                    w = LowRank(pack_private(w.base), w.a, w.b, 1.0)
            else:
                w = (base + b @ a).to(dtype)
                if dtype == torch.bfloat16 and packing_works():
                    w = pack_private(w)
            out.append(w)
    return out


def seconds_per_step(ws: list, rows: int, dtype: torch.dtype, repeats: int = 20) -> float:
    x = torch.randn(rows, 576, dtype=dtype)
    for w in ws:  # warm-up
        linear(x, w)
    start = time.perf_counter()
    for _ in range(repeats):
        for w in ws:
            linear(x, w)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)  # as the engine runs on 2 cores (one thread computes, one serves HTTP)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        dense, stacked = weights(dtype, args.experts, args.rank, False), weights(dtype, args.experts, args.rank, True)
        for rows in (1, 8, 32):
            t_dense, t_stacked = seconds_per_step(dense, rows, dtype), seconds_per_step(stacked, rows, dtype)
            results.append({"dtype": str(dtype).removeprefix("torch."), "rows": rows, "materialised_ms": 1e3 * t_dense,
                            "stacked_ms": 1e3 * t_stacked, "stacked_over_materialised": t_stacked / t_dense})
            print(results[-1], flush=True)
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"experts": args.experts, "rank": args.rank, "cpu_flags": flags, "results": results}, indent=2))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
