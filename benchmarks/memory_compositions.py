"""Resident memory of one vs two compositions over the same four experts, built through the server's Builder.

The experts (the zoo's three LoRA experts plus the base as a generalist, the same four as
benchmarks/build_time.py) are loaded once into the pool; composition A is a BTX MoE, B a
MergeME-TIES MoE over the same four. The peer in the same run is what separate servers
would pay: twice the first composition's memory. Writes benchmarks/results/memory_compositions.json.

    .venv/bin/python benchmarks/memory_compositions.py
"""

from __future__ import annotations

import gc
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve.server.admin_routes import resident_bytes
from mergeserve.server.builder import Builder
from mergeserve.server.registry import Registry
from mergeserve.spec import EngineConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_time import four_expert_spec  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "memory_compositions.json"
MIB = 1 << 20


def rss_mib() -> float:
    gc.collect()
    return resident_bytes() / MIB


def main() -> None:
    registry, pool = Registry(), ExpertPool()
    builder = Builder(registry, pool, Executor(), EngineConfig(max_num_seqs=8, max_model_len=2048))
    start = rss_mib()
    first = builder.build_now(four_expert_spec("btx"))
    assert first.state == "ready", first.error
    one = rss_mib()
    second = builder.build_now(four_expert_spec("mergeme"))
    assert second.state == "ready", second.error
    two = rss_mib()
    pool_mib = sum(s["bytes"] for s in pool.sources()) / MIB
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "python": platform.python_version(),
        "rss_before_mib": round(start, 1),
        "rss_one_composition_mib": round(one, 1),
        "rss_two_compositions_mib": round(two, 1),
        "pool_mib": round(pool_mib, 1),
        "own_mib": {r.name: round(r.memory_bytes / MIB, 1) for r in (first, second)},
        # What the second composition added, over what the first cost (both measured above `before`).
        "second_over_first": round((two - one) / (one - start), 3),
        "two_over_one": round((two - start) / (one - start), 3),
        "separate_servers_two_over_one": 2.0,
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
