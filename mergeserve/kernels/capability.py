"""Which weight format this machine runs fastest: `auto` reads the CPU's flags, then measures.

On AVX2-only CPUs bf16 matmul is emulated and ~100x slower than fp32; with AVX512-BF16
(or AMX) bf16 halves the bytes a memory-bound decode reads. The flags rule out the slow
case without measuring; otherwise a short timing of SmolLM2-sized projections at decode
batch sizes decides.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
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


def resolve_dtype(name: str) -> torch.dtype:
    """`float32` / `bfloat16` as given; `auto` as measured here (once per process)."""
    return fastest_dtype() if name == "auto" else DTYPES[name]


# Cached: the answer is a property of the machine, and measuring takes ~0.1 s.
@functools.cache
def fastest_dtype() -> torch.dtype:
    flags = cpu_flags()
    if not any(f in flags for f in BF16_FLAGS):
        log.info("dtype auto: float32 (no %s in the CPU flags)", " or ".join(BF16_FLAGS))
        return torch.float32
    times = {dt: _linear_seconds(dt) for dt in (torch.float32, torch.bfloat16)}
    choice = min(times, key=times.get)
    log.info("dtype auto: %s (8-row linear: float32 %.2f ms, bfloat16 %.2f ms)", str(choice).removeprefix("torch."),
             times[torch.float32] * 1e3, times[torch.bfloat16] * 1e3)
    return choice


def _linear_seconds(dtype: torch.dtype, rows: int = 8, weights: int = 24, reps: int = 3) -> float:
    """Best time of `weights` distinct 1536 x 576 projections of `rows` rows (more than the caches hold)."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(1536, 576, generator=g).to(dtype) for _ in range(weights)]
    x = torch.randn(rows, 576, generator=g).to(dtype)
    best = float("inf")
    for _ in range(reps + 1):
        start = time.perf_counter()
        for w in ws:
            F.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return best
