"""A route composition (whole models, each request routed to one) against its largest member alone, in interleaved rounds.

Both are served at once, each by `mergeserve serve` in its own process (started one at a
time, warmed up, kept up for the whole run). `--clients` streaming clients (the official
`openai` client) send chat requests back to back, client i always from domain i % 3 (math,
German, code), so the route composition's keyword router spreads them over its three member
models; the same clients, prompts and token counts go to the largest member served alone.
Each engine batches its own member's requests; the executor steps the member engines in turn.

`--rounds` rounds; in each, the route server then the largest member alone, each driven for
`--round-seconds`: every client starts requests until that time has passed and finishes the
one it is in, and tok/s = output tokens of those requests / (end of the last - start). Every
round is kept with its TTFT p50/p99 and the CPU cores the driven server, this client, the
idle server and every other process on the machine (`other_cpu_cores`: what disturbed the
round) used meanwhile; tok/s, TTFT and the ratio route / alone (taken per round) are spreads
(median, min, max; benchmarks/common.py).

Then, in this process with the servers stopped, the cause (top-1 routing only): the mean time
of one decode step of each member at the batch its clients make (client i's domain is member
i % 3, as the keyword router sends them) and of the largest member at all the clients, in
`--rounds` interleaved rounds over the same engines. `decode_bound` is the ratio if serving
were decode steps alone: one step of the largest member against one of every member.

    .venv/bin/python benchmarks/route_throughput.py [--spec examples/zoo/specs/hetero/route_keywords.yaml]
        [--rounds 5] [--round-seconds 20] [--out benchmarks/results/route_throughput]

Writes OUT.json and OUT.png (default benchmarks/results/route_throughput.*).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import busy_seconds, commit, fmt, machine, spread  # noqa: E402
import serving  # noqa: E402
from serving import ROOT, Server, cpu_snapshot, free_port, mergeserve_dtype, one_request  # noqa: E402

from mergeserve.engine.engine import Engine  # noqa: E402
from mergeserve.engine.sequence import SamplingParams  # noqa: E402
from mergeserve.experts import ExpertPool  # noqa: E402
from mergeserve.kernels.capability import usable_cpus  # noqa: E402
from mergeserve.learn.compose import build  # noqa: E402
from mergeserve.spec import CompositionSpec, EngineConfig, load_composition, parse_composition  # noqa: E402

ALONE = "largest member alone"
DOMAIN_PROMPTS = [
    ["Question: Mia saves $6 every week for 8 weeks, then spends $29 on shoes. How many dollars does Mia have left?",
     "Question: There are 6 crates with 8 melons in each crate, and 5 more melons on the floor. How many melons are there in all?"],
    ["Die Paketverwaltung ist eines der wichtigsten Werkzeuge eines Debian-Systems. Erklären Sie, wie sie funktioniert.",
     "Bevor Sie den Rechner neu starten, sollten Sie prüfen, ob alle Dienste richtig konfiguriert sind."],
    ["def read_lines(path, encoding=\"utf-8\"):\n    \"\"\"Return the lines of a text file.\"\"\"",
     "import os\nimport sys\n\ndef walk_files(root):\n    for dirpath, dirnames, filenames in os.walk(root):"],
]


# --- serving ------------------------------------------------------------------------------------

async def drive(url: str, model: str, clients: int, seconds: float, new_tokens: int) -> dict:
    """One level: client i sends domain i % 3's prompts back to back until `seconds` have passed."""
    def domain_prompt(c: int, i: int) -> str:
        prompts = DOMAIN_PROMPTS[c % len(DOMAIN_PROMPTS)]
        return prompts[i % len(prompts)]

    return await serving.drive(url, model, clients, seconds, new_tokens, prompt=domain_prompt, timeout=900)


async def warm_up(url: str, model: str, clients: int, new_tokens: int) -> None:
    """One request per domain (every member), then one per client at once (the batch shapes of the run)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=900)
    try:
        for prompts in DOMAIN_PROMPTS:
            await one_request(client, model, prompts[0], 4)
        await asyncio.gather(*(one_request(client, model, DOMAIN_PROMPTS[w % 3][0], new_tokens) for w in range(clients)))
    finally:
        await client.close()


def largest_member(spec_path: Path) -> dict:
    """The route spec's largest member (by checkpoint bytes) as a composition of its own."""
    spec = load_composition(spec_path)
    size = {e.name: sum(f.stat().st_size for f in Path(e.source).glob("*.safetensors")) for e in spec.experts}
    member = next(e for e in spec.experts if e.name == max(size, key=size.get))
    return {"name": f"alone-{member.name}", "base": member.source, "experts": [{"name": member.name, "source": member.source}]}


def make_server(name: str, composition: Path, model: str, tmp: Path, args) -> Server:
    port = free_port()
    engine = {"max_num_seqs": args.clients, "max_model_len": 512}
    config = {"compositions": [str(composition)], "dtype": args.dtype, "engine": engine}
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "mergeserve.cli", "serve", "--config", str(path), "--port", str(port)]
    settings = {"kind": "mergeserve", "model": model, "dtype_requested": args.dtype, "threads_resolved": usable_cpus(),
                "max_num_seqs": args.clients, "max_model_len": 512, "config": config, "command": shlex.join(cmd)}
    return Server(name, cmd, "/ready", model, port, settings)


def measure(server: Server, peers: list[Server], args) -> dict:
    """One level on `server`, with the CPU cores each process used meanwhile (the idle peer should use none),
    and those every other process on the machine used (`other_cpu_cores`: what disturbed the level)."""
    before, busy, start = cpu_snapshot(peers), busy_seconds(), time.perf_counter()
    level = asyncio.run(drive(server.url, server.model, args.clients, args.round_seconds, args.new_tokens))
    after, busy, wall = cpu_snapshot(peers), busy_seconds() - busy, time.perf_counter() - start
    cores = {k: (after[k] - before[k]) / wall for k in after}
    other = busy / wall - sum(cores.values())
    return level | {"server_cpu_cores": cores.pop(server.name), "client_cpu_cores": cores.pop("client"),
                    "idle_peers_cpu_cores": cores, "other_cpu_cores": other}


def serve_rounds(servers: list[Server], args) -> None:
    """Start and warm up each server in turn, then rounds of one level per server; levels into `s.record`."""
    for s in servers:
        print(f"{s.name}: serving {s.model}", flush=True)
        s.record["ready_seconds"] = s.start()
        asyncio.run(warm_up(s.url, s.model, args.clients, args.new_tokens))
        s.settings["dtype_resolved"] = mergeserve_dtype(s)
        s.record["rss_after_warmup_mb"] = s.tree.rss() / 2**20
        s.record["rounds"] = []
        print(f"  ready in {s.record['ready_seconds']:.0f} s, {s.settings['dtype_resolved']}, "
              f"{s.record['rss_after_warmup_mb']:.0f} MB after warm-up", flush=True)
    for r in range(1, args.rounds + 1):
        for s in servers:
            level = {"round": r, **measure(s, servers, args)}
            s.record["rounds"].append(level)
            print(f"round {r} {s.name:>6}: {level['tok_per_s']:6.1f} tok/s, {level['requests']} requests, TTFT p50 "
                  f"{level['ttft_p50']:.3f} s; cores: server {level['server_cpu_cores']:.2f}, client "
                  f"{level['client_cpu_cores']:.2f}, idle {list(level['idle_peers_cpu_cores'].values())[0]:.2f}, "
                  f"other processes {level['other_cpu_cores']:.2f}", flush=True)


def server_result(s: Server) -> dict:
    levels = s.record["rounds"]
    summary = {k: spread([lv[k] for lv in levels]) for k in ("tok_per_s", "ttft_p50", "ttft_p99")}
    return {"settings": s.settings, **s.record, "peak_rss_mb": s.tree.peak / 2**20, "summary": summary}


# --- decode steps, in process -------------------------------------------------------------------

def step_ms(engine: Engine, batch: int, steps: int, tag: str) -> float:
    """Mean time of one decode step of `batch` sequences (40-token prompts, prefilled first); the requests dropped after."""
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True, temperature=0)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", list(range(100, 140)), params)
    while engine.num_waiting or any(s.in_prefill for s in engine.scheduler.running):
        engine.step()
    engine.step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ms = 1e3 * (time.perf_counter() - start) / steps
    engine.abort_all()
    return ms


def decode_steps(spec_path: Path, single: dict, args) -> dict | None:
    """None for top-k > 1: each request then runs on several members, whose batches this does not model."""
    spec, pool = load_composition(spec_path), ExpertPool()
    if spec.router.top_k > 1:
        return None

    def engine(s: CompositionSpec, batch: int) -> tuple[Engine, int]:
        return Engine(build(s, pool), EngineConfig(max_num_seqs=batch, max_model_len=512), pool.packer), batch

    engines = {e.name: engine(spec.member(e).model_copy(update={"dtype": args.dtype}),
                              len(range(j, args.clients, len(spec.experts))))  # clients j, j + E, ...
               for j, e in enumerate(spec.experts)}
    engines[ALONE] = engine(parse_composition(single | {"dtype": args.dtype}), args.clients)
    rounds = []
    me = psutil.Process()
    for r in range(1, args.rounds + 1):
        busy, own, start = busy_seconds(), sum(me.cpu_times()[:2]), time.perf_counter()
        ms = {name: step_ms(e, batch, args.steps, f"r{r}") for name, (e, batch) in engines.items()}
        wall = time.perf_counter() - start
        other = (busy_seconds() - busy - (sum(me.cpu_times()[:2]) - own)) / wall
        alone = ms.pop(ALONE)
        rounds.append({"round": r, "members_ms": ms, "largest_alone_ms": alone, "decode_bound": alone / sum(ms.values()),
                       "other_cpu_cores": other})
        print(f"round {r} decode step ms: {ms}, alone {alone:.1f}", flush=True)
    return {
        "batches": {name: batch for name, (_, batch) in engines.items()}, "steps": args.steps, "rounds": rounds,
        "summary": {"members_ms": {m: spread([x["members_ms"][m] for x in rounds]) for m in rounds[0]["members_ms"]},
                    "largest_alone_ms": spread([x["largest_alone_ms"] for x in rounds]),
                    "decode_bound": spread([x["decode_bound"] for x in rounds])},
    }


# --- the run ------------------------------------------------------------------------------------

def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["servers"])
    s = [results["servers"][n]["summary"]["tok_per_s"] for n in names]
    med = [x["median"] for x in s]
    err = [[m - x["min"] for m, x in zip(med, s)], [x["max"] - m for m, x in zip(med, s)]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(names, med, yerr=err, capsize=4, color=["tab:blue", "tab:gray"])
    ax.set_ylabel(f"output tok/s (median, min-max of {results['method']['rounds']} rounds)")
    ax.set_title(f"{results['method']['clients']} clients over 3 domains; ratio {fmt(results['ratio'], 2)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(ROOT / "examples/zoo/specs/hetero/route_keywords.yaml"))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (route, then the largest member alone)")
    p.add_argument("--round-seconds", type=float, default=20, help="clients start new requests until this has passed")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per engine and round")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/route_throughput"))
    args = p.parse_args()
    started = time.perf_counter()
    spec = Path(args.spec).resolve()
    single = largest_member(spec)
    results = {
        "machine": machine(), "commit": commit(), "spec": str(spec.relative_to(ROOT)), "single": single["experts"][0]["name"],
        "method": {"rounds": args.rounds, "round_seconds": args.round_seconds, "clients": args.clients,
                   "new_tokens": args.new_tokens, "order": "per round: route, then the largest member alone",
                   "tok_per_s": "output tokens of the requests started before the deadline / (end of the last - start)"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "alone-spec.yaml").write_text(yaml.safe_dump(single))
        servers = [make_server("route", spec, load_composition(spec).name, tmp, args),
                   make_server("alone", tmp / "alone-spec.yaml", single["name"], tmp, args)]
        try:
            serve_rounds(servers, args)
        finally:
            for s in servers:
                s.stop()
    route, alone = (server_result(s) for s in servers)
    results["servers"] = {"route": route, ALONE: alone}
    by_round = {lv["round"]: lv["tok_per_s"] for lv in alone["rounds"]}
    results["ratio"] = spread([lv["tok_per_s"] / by_round[lv["round"]] for lv in route["rounds"]])
    if (steps := decode_steps(spec, single, args)) is not None:
        results["decode_steps"] = steps
    results["machine"]["load_1m_end"] = os.getloadavg()[0]
    results["wall_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"route / largest member alone, per round: {fmt(results['ratio'], 2)}x (target: at least 1 / 1.5 = 0.67x)")


if __name__ == "__main__":
    main()
