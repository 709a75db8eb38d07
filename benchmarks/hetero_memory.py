"""Resident memory of MergeME's heterogeneous merge against `method: route` over the same members.

The members are the heterogeneous zoo's (examples/zoo/specs/hetero/experts.yaml: a depth-pruned
Llama, the german LoRA, a Qwen2; `make zoo-hetero` builds the first and last). Each round starts
a fresh `mergeserve serve` with one composition alone, `route` then `hetero` (the order turns
every round), and reads its process tree's RSS after /ready and one chat request (as
benchmarks/memory_compositions.py does). Both serve with the same request router, so the
difference is what `hetero` shares: one averaged embedding and head instead of each member's own.
Writes benchmarks/results/hetero_memory.json: per composition the median RSS with its range, and
hetero / route.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hetero_memory.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, spread  # noqa: E402
from memory_compositions import ENGINE, rss_after_a_request, start  # noqa: E402
from serving import Server, free_port  # noqa: E402

from mergeserve.server.state import dump_spec  # noqa: E402
from mergeserve.spec import load_composition  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPECS = {"route": ROOT / "examples/zoo/specs/hetero/route_learned.yaml", "hetero": ROOT / "examples/zoo/specs/hetero/mergeme.yaml"}
OUT = ROOT / "benchmarks/results/hetero_memory.json"


def server(kind: str, folder: Path, round_: int) -> Server:
    spec = dump_spec(load_composition(SPECS[kind]))  # paths resolved: the config lives elsewhere
    config = {"compositions": [spec], "dtype": "float32", "engine": ENGINE, "drain_delay_s": 0, "grace_period_s": 0}
    path = folder / f"{kind}-{round_}.json"
    path.write_text(json.dumps(config))
    port = free_port()
    cmd = [sys.executable, "-m", "mergeserve.cli", "serve", "--config", str(path), "--port", str(port)]
    return Server(f"{kind}-r{round_}", cmd, "/ready", spec["name"], port, {"models": [spec["name"]], "config": config})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args()
    rss: dict[str, list[float]] = {kind: [] for kind in SPECS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for kind in (list(SPECS) if r % 2 == 0 else list(reversed(SPECS))):
                s = server(kind, Path(tmp), r)
                try:
                    start(s, args.timeout)
                    rss[kind].append(rss_after_a_request(s))
                    print(f"  {kind}: {rss[kind][-1]:.0f} MiB", flush=True)
                finally:
                    s.stop()
    ratios = [h / r for h, r in zip(rss["hetero"], rss["route"])]
    result = {"machine": machine(), "rounds": args.rounds, "specs": {k: str(v.relative_to(ROOT)) for k, v in SPECS.items()},
              "rss_mib": {k: spread(v) for k, v in rss.items()}, "hetero_over_route": spread(ratios),
              "per_round": rss}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"hetero / route RSS: {statistics.median(ratios):.3f}; wrote {OUT}")


if __name__ == "__main__":
    main()
