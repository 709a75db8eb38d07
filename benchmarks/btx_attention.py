"""BTX's averaged attention over LoRA experts: materialised once, or kept as a stacked factor?

base + (1/E) sum_i B_i A_i is one dense [out, in] weight (what the builder keeps), or the base
plus the experts' factors stacked: A_all [E*r, in], B_all / E [out, E*r], run as two extra thin
matmuls. This times both for SmolLM2's attention projections (q, o 576x576; k, v 192x576, all
30 layers) at decode batch sizes, in each weight format, the way the engine runs them
(kernels.lowrank.linear; bf16 bases packed for oneDNN where that works), on one thread.

`--rounds` rounds; in each, for every dtype and row count, materialised then stacked, each
timed over `--steps` passes over all 120 projections after one warm-up pass. Every round is
kept; per case `materialised_ms`, `stacked_ms` and their ratio (taken per round) are spreads
(median, min, max; benchmarks/common.py). Writes benchmarks/results/btx_attention.json.

    .venv/bin/python benchmarks/btx_attention.py [--experts 3] [--rank 16] [--rounds 5]
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
from common import commit, machine, spread  # noqa: E402

from mergeserve.weights import LowRank  # noqa: E402
from mergeserve.kernels.lowrank import linear  # noqa: E402
from mergeserve.kernels.packed import pack_private, packing_works  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "btx_attention.json"
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576)]  # q, k, v, o
LAYERS = 30
DTYPES = (torch.float32, torch.bfloat16)
ROWS = (1, 8, 32)
FORMS = ("materialised", "stacked")


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


def ms_per_pass(ws: list, rows: int, dtype: torch.dtype, steps: int) -> float:
    """Milliseconds for one pass of `rows` rows through every projection (the mean of `steps` passes)."""
    x = torch.randn(rows, 576, dtype=dtype)
    for w in ws:  # warm-up
        linear(x, w)
    start = time.perf_counter()
    for _ in range(steps):
        for w in ws:
            linear(x, w)
    return 1e3 * (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (materialised, stacked in each)")
    p.add_argument("--steps", type=int, default=20, help="passes over the 120 projections per timing")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    torch.set_num_threads(1)  # one thread computes, as the engine's decode path on a shared 2-core machine
    started, info = time.perf_counter(), machine()
    ws = {(dt, form): weights(dt, args.experts, args.rank, form == "stacked") for dt in DTYPES for form in FORMS}
    cases = {(str(dt).removeprefix("torch."), rows): [] for dt in DTYPES for rows in ROWS}
    for r in range(1, args.rounds + 1):
        for dt in DTYPES:
            for rows in ROWS:
                t = {form: ms_per_pass(ws[dt, form], rows, dt, args.steps) for form in FORMS}
                name = str(dt).removeprefix("torch.")
                cases[name, rows].append({"round": r, "materialised_ms": t["materialised"], "stacked_ms": t["stacked"],
                                          "stacked_over_materialised": t["stacked"] / t["materialised"]})
                print(f"round {r} {name:>8} {rows:>2} rows: materialised {t['materialised']:6.2f} ms, "
                      f"stacked {t['stacked']:6.2f} ms", flush=True)
    keys = ("materialised_ms", "stacked_ms", "stacked_over_materialised")
    results = [{"dtype": dt, "rows": rows, "rounds": rs, **{k: spread([x[k] for x in rs]) for k in keys}}
               for (dt, rows), rs in cases.items()]
    out = {
        "machine": info | {"load_1m_end": os.getloadavg()[0]}, "commit": commit(),
        "settings": {"experts": args.experts, "rank": args.rank, "layers": LAYERS, "shapes": SHAPES,
                     "torch_threads": torch.get_num_threads(), "bf16_packed_for_onednn": packing_works()},
        "method": {"rounds": args.rounds, "steps": args.steps,
                   "order": "per round: for each dtype and row count, materialised then stacked",
                   "ms": "one pass through all 120 projections, the mean of `steps` passes after a warm-up pass"},
        "results": results, "wall_s": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
