"""Resident memory of two compositions over the same four experts: one server holding both against a server for each.

The experts (the zoo's three LoRA experts plus the base as a generalist, the same four as
benchmarks/build_time.py); composition A is a BTX MoE over them, B a MergeME-TIES MoE, fp32.
Each round, in fresh processes:
- servers: `mergeserve serve` with A alone and with B alone (two servers, both up), then one
  server with A and B; each server's RSS (its process tree, summed) after /ready and one chat
  request to each composition it serves;
- in process, through the server's Builder (no HTTP, no KV cache written): RSS before, after
  building A, after building B too, and what the pool and each composition report holding.
Two servers cost `separate_servers_two_over_one` = (RSS A + RSS B) / RSS A of one composition's
server; one server holding both `shared_server_two_over_one` = RSS AB / RSS A. Every figure is
`--rounds` rounds with their spread (benchmarks/common.py). Writes benchmarks/results/memory_compositions.json.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/memory_compositions.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_time import four_expert_spec  # noqa: E402
from common import machine, spread  # noqa: E402
from serving import Server, free_port, one_request  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "memory_compositions.json"
MIB = 1 << 20
METHODS = {"a": "btx", "b": "mergeme"}
# As the in-process Builder runs them; one thread (the machine is shared), no drain on stop.
ENGINE = {"max_num_seqs": 8, "max_model_len": 2048, "threads": 1}


# --- in process ------------------------------------------------------------------------------

def in_process() -> dict:
    """One round: A, then B, built by the server's Builder over one pool, RSS after each."""
    from mergeserve.engine.executor import Executor
    from mergeserve.experts import ExpertPool
    from mergeserve.server.admin_routes import resident_bytes
    from mergeserve.server.builder import Builder
    from mergeserve.server.registry import Registry
    from mergeserve.spec import EngineConfig

    def rss_mib() -> float:
        gc.collect()
        return resident_bytes() / MIB

    registry, pool = Registry(), ExpertPool()
    builder = Builder(registry, pool, Executor(), EngineConfig(max_num_seqs=ENGINE["max_num_seqs"], max_model_len=ENGINE["max_model_len"]))
    start = rss_mib()
    first, build = builder.submit(four_expert_spec(METHODS["a"]))
    build.result()
    assert first.state == "ready", first.error
    one = rss_mib()
    second, build = builder.submit(four_expert_spec(METHODS["b"]))
    build.result()
    assert second.state == "ready", second.error
    two = rss_mib()
    return {
        "rss_before_mib": start, "rss_one_composition_mib": one, "rss_two_compositions_mib": two,
        "pool_mib": sum(s["bytes"] for s in pool.sources()) / MIB,
        "own_a_mib": first.memory_bytes / MIB, "own_b_mib": second.memory_bytes / MIB,
        # What the second composition added, over what the first cost (both measured above `before`).
        "second_over_first": (two - one) / (one - start),
        "two_over_one": (two - start) / (one - start),
    }


def in_process_round() -> dict:
    """in_process() in a fresh interpreter, so every round starts from an empty process."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, __file__, "--in-process-round", f.name], check=True)
        return json.loads(Path(f.name).read_text())


# --- servers ---------------------------------------------------------------------------------

def server(name: str, members: str, folder: Path) -> Server:
    """A mergeserve server of the compositions `members` ("a", "b" or "ab"), not yet started."""
    specs = [four_expert_spec(METHODS[m]).model_dump(mode="json", exclude_unset=True) for m in members]
    config = {"compositions": specs, "dtype": "float32", "engine": ENGINE, "drain_delay_s": 0, "grace_period_s": 0}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    port = free_port()
    cmd = [sys.executable, "-m", "mergeserve.cli", "serve", "--config", str(path), "--port", str(port)]
    return Server(name, cmd, "/ready", specs[0]["name"], port, {"models": [s["name"] for s in specs], "config": config})


def start(s: Server, timeout: float) -> None:
    """Start `s` and wait until every composition it serves is built (/ready answers at the first)."""
    seconds = s.start(timeout)
    while not set(s.settings["models"]) <= set(json.load(urllib.request.urlopen(f"http://127.0.0.1:{s.port}/ready"))["models"]):
        if seconds > timeout:
            raise RuntimeError(f"{s.name}: not every composition ready after {timeout:.0f} s; see {s.log}")
        time.sleep(1)
        seconds += 1
    print(f"  {s.name}: ready in {seconds:.0f} s", flush=True)


def rss_after_a_request(s: Server) -> float:
    """The server's RSS (MiB) after one short chat request to each of its compositions."""
    import openai

    async def ask() -> None:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="bench", max_retries=0, timeout=600) as client:
            for model in s.settings["models"]:
                await one_request(client, model, "What is 17 times 23?", 16)

    asyncio.run(ask())
    return s.tree.rss() / MIB


def servers_round(folder: Path, round_: int, timeout: float) -> dict:
    """A and B each in a server of its own (both up at once), then both in one server."""
    separate = [server(f"memory-{m}-r{round_}", m, folder) for m in ("a", "b")]
    out = {}
    try:
        for s in separate:
            start(s, timeout)
        for s, m in zip(separate, ("a", "b")):
            out[f"server_{m}_mib"] = rss_after_a_request(s)
    finally:
        for s in separate:
            s.stop()
    shared = server(f"memory-ab-r{round_}", "ab", folder)
    try:
        start(shared, timeout)
        out["server_ab_mib"] = rss_after_a_request(shared)
    finally:
        shared.stop()
    out["separate_servers_two_over_one"] = (out["server_a_mib"] + out["server_b_mib"]) / out["server_a_mib"]
    out["shared_server_two_over_one"] = out["server_ab_mib"] / out["server_a_mib"]
    out["separate_over_shared"] = (out["server_a_mib"] + out["server_b_mib"]) / out["server_ab_mib"]
    print("  " + ", ".join(f"{k} {v:.3f}" if "over" in k else f"{k} {v:.0f}" for k, v in out.items()), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ready-timeout", type=float, default=3600, help="seconds a server may take to build its compositions")
    p.add_argument("--in-process-round", metavar="JSON", help=argparse.SUPPRESS)  # one in-process round, into JSON
    args = p.parse_args()
    if args.in_process_round:
        Path(args.in_process_round).write_text(json.dumps(in_process()))
        return
    rounds: dict[str, list[dict]] = {"servers": [], "in_process": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds}", flush=True)
            rounds["servers"].append(servers_round(Path(tmp), r, args.ready_timeout))
            rounds["in_process"].append(in_process_round())
    result = {
        "machine": machine(),
        "compositions": {m: four_expert_spec(method).name for m, method in METHODS.items()}, "dtype": "float32", "engine": ENGINE,
        "rounds": args.rounds,
        **{part: {k: spread([r[k] for r in runs]) for k in runs[0]} for part, runs in rounds.items()},
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v["median"] for k, v in result["servers"].items()}, indent=2))


if __name__ == "__main__":
    main()
