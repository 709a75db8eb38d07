"""A route composition (whole models, each request routed to one) against its largest member alone.

16 streaming clients (the official `openai` client) send chat requests, client i always from
domain i % 3 (math, German, code), so the route composition's keyword router spreads them over
its three member models. The same clients, prompts and token counts then go to the largest
member served alone. Each engine batches its own member's requests; the executor steps the
member engines in turn. Reported: output tok/s of both, TTFT p50, and the ratio.

Then, in this process with nothing else running, the cause: the median time of one decode step
of each member at the batch its clients make (client i's domain is member i % 3, as the keyword
router sends them) and of the largest member at all the clients. `decode_bound` is the ratio if
serving were decode steps alone: one step of the largest member against one of every member.

    .venv/bin/python benchmarks/route_throughput.py [--spec examples/zoo/specs/hetero/route_keywords.yaml]

Writes benchmarks/results/route_throughput.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import CACHE, ROOT, cpu_flags, free_port, one_request, pct, server  # noqa: E402

from mergeserve.engine.engine import Engine  # noqa: E402
from mergeserve.engine.sequence import SamplingParams  # noqa: E402
from mergeserve.experts import ExpertPool  # noqa: E402
from mergeserve.merge import build  # noqa: E402
from mergeserve.spec import CompositionSpec, EngineConfig, load_composition, parse_composition  # noqa: E402

DOMAIN_PROMPTS = [
    ["Question: Mia saves $6 every week for 8 weeks, then spends $29 on shoes. How many dollars does Mia have left?",
     "Question: There are 6 crates with 8 melons in each crate, and 5 more melons on the floor. How many melons are there in all?"],
    ["Die Paketverwaltung ist eines der wichtigsten Werkzeuge eines Debian-Systems. Erklären Sie, wie sie funktioniert.",
     "Bevor Sie den Rechner neu starten, sollten Sie prüfen, ob alle Dienste richtig konfiguriert sind."],
    ["def read_lines(path, encoding=\"utf-8\"):\n    \"\"\"Return the lines of a text file.\"\"\"",
     "import os\nimport sys\n\ndef walk_files(root):\n    for dirpath, dirnames, filenames in os.walk(root):"],
]


async def drive(base_url: str, model: str, clients: int, rounds: int, new_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=900)

    async def worker(w: int) -> list[dict]:
        prompts = DOMAIN_PROMPTS[w % len(DOMAIN_PROMPTS)]
        return [await one_request(client, model, prompts[r % len(prompts)], new_tokens) for r in range(rounds)]

    for prompts in DOMAIN_PROMPTS:  # warm every member up
        await one_request(client, model, prompts[0], 4)
    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
    wall = time.perf_counter() - start
    await client.close()
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "output_tokens": tokens, "seconds": wall,
            "tok_per_s": tokens / wall, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99)}


def largest_member(spec_path: Path) -> dict:
    """The route spec's largest member (by checkpoint bytes) as a composition of its own."""
    spec = load_composition(spec_path)
    size = {e.name: sum(f.stat().st_size for f in Path(e.source).glob("*.safetensors")) for e in spec.experts}
    member = next(e for e in spec.experts if e.name == max(size, key=size.get))
    return {"name": f"alone-{member.name}", "base": member.source, "experts": [{"name": member.name, "source": member.source}]}


def serve_cmd(composition: str | dict, port: int, tmp: Path, name: str, args) -> list[str]:
    config = tmp / f"{name}.yaml"
    if isinstance(composition, dict):
        (tmp / f"{name}-spec.yaml").write_text(yaml.safe_dump(composition))
        composition = str(tmp / f"{name}-spec.yaml")
    engine = {"max_num_seqs": args.clients, "max_model_len": 512}
    config.write_text(json.dumps({"compositions": [composition], "dtype": args.dtype, "engine": engine}))
    return [sys.executable, "-m", "mergeserve.cli", "serve", "--config", str(config), "--port", str(port)]


def run(name: str, cmd: list[str], port: int, model: str, args) -> dict:
    print(f"{name}: serving {model}", flush=True)
    log = CACHE / "route_throughput" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with server(cmd, port, "/ready", log) as (url, rss):
        level = asyncio.run(drive(url, model, args.clients, args.rounds, args.new_tokens))
    print(f"  {level['tok_per_s']:.1f} tok/s, TTFT p50 {level['ttft_p50']:.3f} s", flush=True)
    return level | {"peak_rss_mb": rss.peak / 2**20}


def decode_step_ms(spec: CompositionSpec, batch: int, pool: ExpertPool, steps: int = 16) -> float:
    """Median time of one decode step of `batch` sequences (40-token prompts, prefilled first)."""
    engine = Engine(build(spec, pool), EngineConfig(max_num_seqs=batch, max_model_len=512), pool.packer)
    for i in range(batch):
        engine.add_request(f"r{i}", list(range(100, 140)), SamplingParams(max_tokens=steps + 8, ignore_eos=True, temperature=0))
    while engine.num_waiting or any(s.in_prefill for s in engine.scheduler.running):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def decode_steps(spec_path: Path, single: dict, args) -> dict | None:
    """None for top-k > 1: each request then runs on several members, whose batches this does not model."""
    spec, pool = load_composition(spec_path), ExpertPool()
    if spec.router.top_k > 1:
        return None
    members = {e.name: decode_step_ms(spec.member(e).model_copy(update={"dtype": args.dtype}),
                                      len(range(j, args.clients, len(spec.experts))), pool)
               for j, e in enumerate(spec.experts)}
    alone = decode_step_ms(parse_composition(single | {"dtype": args.dtype}), args.clients, pool)
    return {"members_ms": members, "largest_alone_ms": alone, "decode_bound": alone / sum(members.values())}


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["servers"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(names, [results["servers"][n]["tok_per_s"] for n in names], color=["tab:blue", "tab:gray"])
    ax.set_ylabel("output tok/s")
    ax.set_title(f"{results['clients']} clients over 3 domains; ratio {results['ratio']:.2f}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", default=str(ROOT / "examples/zoo/specs/hetero/route_keywords.yaml"))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/route_throughput"))
    args = p.parse_args()
    spec = Path(args.spec).resolve()
    single = largest_member(spec)
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "spec": str(spec.relative_to(ROOT)),
               "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
               "clients": args.clients, "rounds": args.rounds, "new_tokens": args.new_tokens, "dtype": args.dtype,
               "single": single["experts"][0]["name"], "servers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        port = free_port()
        results["servers"]["route"] = run("route", serve_cmd(str(spec), port, tmp, "route", args), port,
                                          load_composition(spec).name, args)
        port = free_port()
        results["servers"]["largest member alone"] = run("single", serve_cmd(single, port, tmp, "single", args), port,
                                                         single["name"], args)
    results["ratio"] = results["servers"]["route"]["tok_per_s"] / results["servers"]["largest member alone"]["tok_per_s"]
    if (steps := decode_steps(spec, single, args)) is not None:
        results["decode_steps"] = steps
        print(f"decode step ms: {steps}")
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"route / largest member alone: {results['ratio']:.2f}x (target: at least 1 / 1.5 = 0.67x)")


if __name__ == "__main__":
    main()
