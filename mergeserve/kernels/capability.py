"""Which weight format this machine runs fastest: `auto` reads the CPU's flags, then measures.

On AVX2-only CPUs bf16 matmul is emulated: slower than fp32 from a few rows on, so the flags
rule bf16 out without measuring. With AVX512-BF16 (or AMX) bf16 halves the bytes a
memory-bound decode reads. A short timing of SmolLM2-sized projections decides between the
rest (fp32, bf16 and int8: bf16 weights run as int8, kernels/int8.py): the sum of 8 rows, a
loaded server's decode batch, and 64 rows, a prefill chunk.

Measured, 24 distinct 1536 x 576 weights, one thread:
- 2-core AMX Xeon: int8 wins at one row and loses from 8 on (kernels/int8.py), so auto picks
  bf16 there; ask for `dtype: int8` where one sequence decodes at a time.
- 2-core AVX2 EPYC (no AVX512): fp32 / bf16 / int8 at 1 row 6.5 / 4.7 / 4.1 ms, at 8 rows
  12.7 / 34.5 / 10.5; fp32 / int8 at 16 rows 20.7 / 26.4, at 64 rows 46.7 / 95.7, at 256 rows
  154 / 383. Picked at 8 rows alone, int8 served the demo faster at one client there and
  prefilled at half fp32's speed (serving benchmark, time to first token): auto picks fp32;
  ask for `dtype: int8` where one sequence decodes at a time.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from pathlib import Path

import torch

from mergeserve.kernels.int8 import Int8, int8_works
from mergeserve.kernels.lowrank import linear

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FORMATS = (*DTYPES, "int8")  # int8: weights held in bf16, run as int8
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def usable_cpus() -> int:
    """Cores this process may use: its affinity mask, capped by a cgroup v2 CPU limit (a
    container's `limits.cpu`), rounded up; os.cpu_count() sees the whole node instead."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def resolve_format(name: str) -> str:
    """`float32` / `bfloat16` / `int8` as given; `auto` as measured here (once per process)."""
    return fastest_format() if name == "auto" else name


def resolve_dtype(name: str) -> torch.dtype:
    """The dtype the weights of format `name` are held in: int8's are bfloat16 (quantised when an engine packs them)."""
    fmt = resolve_format(name)
    return torch.bfloat16 if fmt == "int8" else DTYPES[fmt]


# Cached: the answer is a property of the machine, and measuring takes ~0.2 s.
@functools.cache
def fastest_format() -> str:
    candidates = [fmt for fmt in FORMATS if fmt != "int8" or int8_works()]
    if not any(f in cpu_flags() for f in BF16_FLAGS):
        candidates.remove("bfloat16")  # emulated: slower than fp32 from a few rows on, unmeasured
    # A loaded server's decode batch and a prefill chunk: a format fast at one but slow at the
    # other (int8 on AVX2) would trade time to first token for decode speed.
    times = {fmt: _linear_seconds(fmt, DECODE_ROWS) + _linear_seconds(fmt, PREFILL_ROWS) for fmt in candidates}
    choice = min(times, key=times.get)
    log.info("dtype auto: %s (%d- and %d-row linears: %s)", choice, DECODE_ROWS, PREFILL_ROWS,
             ", ".join(f"{f} {t * 1e3:.2f} ms" for f, t in times.items()))
    return choice


DECODE_ROWS, PREFILL_ROWS = 8, 64


def _linear_seconds(fmt: str, rows: int = DECODE_ROWS, weights: int = 24, reps: int = 3) -> float:
    """Best time of `weights` distinct 1536 x 576 projections of `rows` rows (more than the caches hold)."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(1536, 576, generator=g).to(resolve_dtype(fmt)) for _ in range(weights)]
    if fmt == "int8":
        ws = [Int8.of(w) for w in ws]
    x = torch.randn(rows, 576, generator=g).to(resolve_dtype(fmt))
    best = float("inf")
    for _ in range(reps + 1):
        start = time.perf_counter()
        for w in ws:
            linear(x, w)
        best = min(best, time.perf_counter() - start)
    return best
