"""What every benchmark records: the machine it ran on, and each figure as rounds with their spread.

A figure in a result file is `spread(values)`: every round's value, their median, min and max.
Renderers (benchmarks/readme.py) quote the median with its range, never the best round.
"""

from __future__ import annotations

import os
import platform
import statistics
from datetime import datetime, timezone

# The flags that decide which kernels and dtypes pay off on these machines (see DESIGN.md).
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")


def cpu_flags() -> list[str]:
    from mergeserve.kernels.capability import cpu_flags as flags

    return sorted(flags() & set(FLAGS))


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where and when a result was measured."""
    import torch

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        # How quiet the machine was at the start (other jobs skew every figure), and this process's niceness.
        "load_1m": os.getloadavg()[0], "nice": os.nice(0),
    }


def spread(values: list[float]) -> dict:
    """Every round's value with their median, min and max."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def fmt(s: dict, digits: int = 1, scale: float = 1.0) -> str:
    """`median (min-max)` of a spread, e.g. `28.6 (27.9-29.4)`."""
    f = f"{{:.{digits}f}}"
    m, lo, hi = (f.format(s[k] * scale) for k in ("median", "min", "max"))
    return m if lo == hi else f"{m} ({lo}-{hi})"


def commit() -> str:
    """The repository's HEAD, short, with `-dirty` when tracked files differ from it."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy so far (every process, niced ones included).
    Over a measurement, its difference minus the benchmark's own CPU seconds, divided by the wall
    time, is `other_cpu_cores`: the cores other processes took meanwhile (what disturbed it)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)
