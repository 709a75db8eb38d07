"""Many compositions over one base, served by one mergeserve: what an A/B alias, 8 and 100 compositions cost.

Four scenarios, each one `mergeserve serve` process (a JSON config with `compositions`, `aliases`,
`dtype`, `engine`, started like benchmarks/serving.py's servers; ready when GET /ready answers 200
and the admin API lists every composition as ready), all over SmolLM2-135M-Instruct:
- `one`: examples/demo_moe.yaml alone (BTX, hidden top-2 over the zoo's math, german and code
  LoRA experts); clients ask for `smollm2-moe`;
- `ab`: that and examples/zoo/specs/btx_centroid.yaml (same base and experts, centroid router),
  behind an alias `ab` = {smollm2-moe: 1, btx-centroid: 1}, sticky none; clients ask for `ab`;
- `eight`: 8 compositions c0..c7 of the zoo's experts (hidden top-2, centroid top-2, hidden top-1,
  centroid top-1, random top-2, hidden top-2 with routed attention, hidden top-2 of math+code and
  of german+code), spec files in the run's temp dir; client c asks for c(c mod 8);
- `hundred`: 100 (`--hundred N`) compositions p000..p099, BTX random-router top-2 of adapters
  (j, j+1 mod 100) of the 100-adapter rank-16 pool that benchmarks/lora_pool.py writes
  (.cache/lora_pool, written here when missing); client c's i-th request asks for p((7c + i) mod N);
- `X_own` (one_own, ab_own, ...): scenario X with `engine.placement: own`, every composition in
  an engine of its own as before one engine per base: today's cost, measured in the same run.

Driving is serving.py's: the official `openai` client, streaming chat, temperature 0, ignore_eos,
`--new-tokens` tokens a request; in a level, `c` clients send requests back to back until
`--round-seconds` have passed (each finishes the request it is in), and
    tok/s = (output tokens of those requests) / (end of the last of them - level start),
TTFT p50/p99 over the level's requests (see serving.py). Every server is started one at a time,
warmed up (every composition answers one 2-token request, then `max(--concurrency)` requests go at
once through the scenario's model choice, so no build or first use is measured) and kept alive;
`--rounds` rounds, each: for each concurrency, each scenario once, in `--scenarios` order. With
`--one-server-at-a-time` a scenario's server runs all its rounds alone, then stops (less memory,
no interleaving across scenarios).

Recorded per scenario: settings (config written, command line), seconds to the first and to all
compositions ready, RSS of the process tree after warm-up and its peak (sampled every 0.5 s over
the run), every level, per concurrency a `spread` (benchmarks/common.py) of each metric over the
rounds, and `placements`: each composition's `placement` from GET /admin/compositions/{name}
(null where the server does not report one). Ratios ab/one, eight/one, hundred/one of tok/s are
taken per round and summarised as spreads, and so are X_own/one_own and one/one_own. The temp dir (specs, configs, server logs) is kept.
A server that does not start (a failed build, no answer, or memory: its start is stopped before
the machine's available memory would fall below `--min-available-mb`, projected from the RSS
each composition built so far added) gets its log's tail printed and `failed` recorded; the
others are measured, and the run exits non-zero at the end.
After the rounds, each warm server gets `--add-times` compositions added one after the other
(PUT BTX with the centroid router over the same base and experts, then DELETE): `add_to_warm`
records the build_seconds the server reports for each, as a spread, and where each was placed.
Writes OUT.json and OUT.png (default benchmarks/results/shared_base.*).

    .venv/bin/python benchmarks/shared_base.py [--scenarios one,ab,eight,hundred] [--rounds 3]
        [--round-seconds 20] [--concurrency 1,8,16] [--new-tokens 64] [--dtype auto] [--threads N]
        [--hundred 100] [--one-server-at-a-time] [--out benchmarks/results/shared_base]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from common import commit, machine, spread
from lora_pool import BASE, write_adapter
from serving import (Server, cpu_snapshot, drive, free_port, mergeserve_dtype, one_request, plot, ratios, rotating_prompt, run_rounds,
                     summarise)

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "examples/zoo/specs"
DEMO, CENTROID = ROOT / "examples/demo_moe.yaml", SPECS / "btx_centroid.yaml"
SCENARIOS = ("one", "ab", "eight", "hundred")  # each also as X_own: placement own (an engine per composition)
POOL, POOL_RANK = 100, 16
ADMIN_KEY = "shared-base-bench"
Pick = Callable[[int, int], str]  # (client, its request index) -> model name


@dataclass
class Scenario(Server):
    """A mergeserve server for one scenario: its compositions, and which model each request asks for."""

    log_dir: Path = Path(tempfile.gettempdir())
    compositions: list[str] = field(default_factory=list)
    pick: Pick = lambda c, i: ""  # noqa: E731

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.name}.log"


# --- the scenarios' specs and configs --------------------------------------------------------------

def zoo_experts(names: tuple[str, ...] | None = None) -> list[dict]:
    """The zoo's experts (name, absolute source, prompts) from experts.yaml."""
    listed = yaml.safe_load((SPECS / "experts.yaml").read_text())
    return [{**e, "source": str((SPECS / e["source"]).resolve())} for e in listed if names is None or e["name"] in names]


def base_path() -> str:
    from mergeserve.spec import resolve_source

    return resolve_source(BASE, ROOT)


def write_spec(tmp: Path, spec: dict) -> str:
    path = tmp / "specs" / f"{spec['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def eight_specs(tmp: Path) -> list[str]:
    routers = [({"kind": "hidden", "top_k": 2}, None), ({"kind": "centroid", "top_k": 2}, None),
               ({"kind": "hidden", "top_k": 1}, None), ({"kind": "centroid", "top_k": 1}, None),
               ({"kind": "random", "top_k": 2}, None), ({"kind": "hidden", "top_k": 2, "attention": "routed"}, None),
               ({"kind": "hidden", "top_k": 2}, ("math", "code")), ({"kind": "hidden", "top_k": 2}, ("german", "code"))]
    base = base_path()
    return [write_spec(tmp, {"name": f"c{i}", "base": base, "method": "btx", "router": router,
                             "experts": zoo_experts(subset)})
            for i, (router, subset) in enumerate(routers)]


def hundred_specs(tmp: Path, n: int) -> list[str]:
    """Composition j < n: random-router top-2 BTX of pool adapters j and j+1 (mod 100), seed j."""
    folders = [write_adapter(ROOT / ".cache/lora_pool" / f"r{POOL_RANK}-{i:03d}", i, POOL_RANK) for i in range(POOL)]
    base = base_path()
    return [write_spec(tmp, {"name": f"p{j:03d}", "base": base, "method": "btx",
                             "router": {"kind": "random", "top_k": 2, "seed": j},
                             "experts": [{"name": f"a{k:03d}", "source": str(folders[k])} for k in (j, (j + 1) % POOL)]})
            for j in range(n)]


def scenario_parts(name: str, tmp: Path, n: int) -> tuple[list[str], list[str], dict, Pick, str]:
    """(spec paths, composition names, aliases, pick, pick described) of a scenario (`X_own`: X's)."""
    name = name.removesuffix("_own")
    if name == "one":
        return [str(DEMO)], ["smollm2-moe"], {}, lambda c, i: "smollm2-moe", "smollm2-moe"
    if name == "ab":
        alias = {"ab": {"targets": {"smollm2-moe": 1, "btx-centroid": 1}, "sticky": "none"}}
        return [str(DEMO), str(CENTROID)], ["smollm2-moe", "btx-centroid"], alias, lambda c, i: "ab", "ab"
    if name == "eight":
        return eight_specs(tmp), [f"c{i}" for i in range(8)], {}, lambda c, i: f"c{c % 8}", "c(client mod 8)"
    if name == "hundred":
        return (hundred_specs(tmp, n), [f"p{j:03d}" for j in range(n)], {}, lambda c, i: f"p{(7 * c + i) % n:03d}",
                f"p((7 * client + request index) mod {n})")
    raise SystemExit(f"unknown scenario {name!r} ({', '.join(SCENARIOS)})")


def make_scenario(name: str, tmp: Path, args: argparse.Namespace) -> Scenario:
    specs, names, aliases, pick, described = scenario_parts(name, tmp, args.hundred)
    engine = {"max_num_seqs": max(args.concurrency), "max_model_len": args.max_model_len}
    if args.threads:
        engine["threads"] = args.threads
    if name.endswith("_own"):  # every composition in an engine of its own, as before one engine per base
        engine["placement"] = "own"
    config = {"compositions": specs, "aliases": aliases, "dtype": args.dtype, "lora": "factored", "engine": engine,
              "max_compositions": max(16, len(specs) + 1)}  # + 1: add_to_warm's
    return config_scenario(name, tmp, config, names, pick, {"requests_ask_for": described, "dtype_requested": args.dtype,
                                                             "threads": args.threads})


def config_scenario(name: str, tmp: Path, config: dict, names: list[str], pick: Pick, settings: dict) -> Scenario:
    """`mergeserve serve` on a free port with `config` (the admin key added), written to tmp/NAME.json,
    serving the compositions `names`; requests ask for `pick`'s. `settings`: what else to record."""
    config = config | {"admin_key": ADMIN_KEY}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(config, indent=1))
    port = free_port()
    cmd = [sys.executable, "-m", "mergeserve.cli", "serve", "--config", str(path), "--port", str(port)]
    settings = {"kind": "mergeserve", "compositions": len(names), **settings, "config_file": str(path),
                "config": {**config, "admin_key": "(set)"}, "command": shlex.join(cmd)}
    return Scenario(name, cmd, "/ready", names[0], port, settings, {"MERGESERVE_ADMIN_KEY": ADMIN_KEY},
                    log_dir=tmp, compositions=names, pick=pick)


# --- starting, readiness, warm-up ------------------------------------------------------------------

def admin_get(s: Scenario, path: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{s.port}/admin{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def states(s: Scenario) -> dict[str, dict] | None:
    """The admin API's view of each composition; None while the server does not answer in time."""
    try:
        return {c["name"]: c for c in admin_get(s, "/compositions")["data"]}
    except OSError:
        return None


def check_memory(s: Scenario, ready: int, first: tuple[int, int], floor_mb: float) -> None:
    """Raise before the machine runs out: below `floor_mb` available, or when the RSS each
    composition added so far (from `first` = (ready, RSS) at the first look), times those still
    to build, would not fit in what is available above the floor."""
    available, floor = psutil.virtual_memory().available, floor_mb * 2**20
    if available < floor:
        raise RuntimeError(f"only {available / 2**20:.0f} MB available with {ready}/{len(s.compositions)} compositions ready")
    if ready - first[0] >= 4 and ready < len(s.compositions):
        each = (s.tree.rss() - first[1]) / (ready - first[0])
        need = each * (len(s.compositions) - ready)
        if need > available - floor:
            raise RuntimeError(f"does not fit: {ready}/{len(s.compositions)} compositions ready, {each / 2**20:.0f} MB each, "
                               f"{need / 2**20:.0f} MB more needed, {available / 2**20:.0f} MB available "
                               f"(keeping {floor_mb:.0f} MB free)")


def wait_all_ready(s: Scenario, args: argparse.Namespace) -> None:
    """Until the admin API lists every composition as ready; a failed build, an exit, the timeout
    or memory running short raises."""
    start, first = time.monotonic(), None
    while True:
        seen = states(s)
        if seen is not None:
            if failed := [f"{n}: {c['error']}" for n, c in seen.items() if c["state"] == "failed"]:
                raise RuntimeError(f"{len(failed)} compositions failed to build, first {failed[0]}")
            ready = sum(seen.get(n, {}).get("state") == "ready" for n in s.compositions)
            if ready == len(s.compositions):
                return
            first = first or (ready, s.tree.rss())
            check_memory(s, ready, first, args.min_available_mb)
        if s.proc.poll() is not None or time.monotonic() - start > args.start_timeout:
            raise RuntimeError(f"exited ({s.proc.returncode}) or not all ready after {args.start_timeout:.0f} s")
        time.sleep(1)


async def warm_up(s: Scenario, concurrency: int, new_tokens: int) -> None:
    """Every composition once (a 2-token request, `concurrency` at a time), then `concurrency`
    requests at once as client 0..c-1 would send them (the run's batch shapes)."""
    import openai

    client = openai.AsyncOpenAI(base_url=s.url, api_key="bench", max_retries=0, timeout=600)
    gate, done, begin = asyncio.Semaphore(concurrency), [0], time.monotonic()

    async def first_use(i: int, model: str) -> None:
        async with gate:
            await one_request(client, model, rotating_prompt(i, 0), 2)  # a prefill and a decode step
        done[0] += 1
        if done[0] % 10 == 0:
            print(f"  warm-up: {done[0]}/{len(s.compositions)} compositions in {time.monotonic() - begin:.0f} s", flush=True)

    try:
        await asyncio.gather(*(first_use(i, m) for i, m in enumerate(s.compositions)))
        await asyncio.gather(*(one_request(client, s.pick(c, 0), rotating_prompt(c, 0), new_tokens) for c in range(concurrency)))
    finally:
        await client.close()


def placement(body: dict) -> object:
    """A composition's `placement` (top level, else its backend's), None where there is none."""
    return body["placement"] if "placement" in body else (body.get("backend") or {}).get("placement")


def placements(s: Scenario) -> dict[str, object]:
    return {n: placement(admin_get(s, f"/compositions/{n}")) for n in s.compositions}


def log_tail(s: Scenario, lines: int = 40) -> str:
    try:
        return "\n".join(s.log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def start(s: Scenario, args: argparse.Namespace) -> bool:
    """Start, wait for every composition, warm up; record timings and RSS. On failure: the log's
    tail printed, the failure recorded, the server stopped, False."""
    print(f"{s.name}: {len(s.compositions)} compositions, {s.settings['command']}", flush=True)
    begin = time.monotonic()
    try:
        s.record["first_ready_seconds"] = s.start(args.start_timeout)
        wait_all_ready(s, args)
        s.record["ready_seconds"] = time.monotonic() - begin
        asyncio.run(warm_up(s, max(args.concurrency), args.new_tokens))
        s.record["warmup_seconds"] = time.monotonic() - begin - s.record["ready_seconds"]
        s.record["placements"] = placements(s)
    except Exception as e:  # noqa: BLE001 - reported with the log's tail; the other scenarios go on
        print(f"{s.name} failed to start: {e}\n--- last lines of {s.log} ---\n{log_tail(s)}\n---", file=sys.stderr, flush=True)
        s.record["failed"] = str(e)
        s.stop()
        return False
    s.record["rss_after_warmup_mb"] = s.tree.rss() / 2**20
    s.record["available_memory_after_warmup_mb"] = psutil.virtual_memory().available / 2**20
    s.settings["dtype_resolved"] = mergeserve_dtype(s)
    print(f"  all ready in {s.record['ready_seconds']:.0f} s, {s.record['rss_after_warmup_mb']:.0f} MB after warm-up, "
          f"{s.record['available_memory_after_warmup_mb'] / 1024:.1f} GiB available", flush=True)
    return True


# --- measuring -------------------------------------------------------------------------------------

def measure(s: Scenario, peers: list[Scenario], concurrency: int, args: argparse.Namespace) -> dict:
    """One level on `s`, with the CPU cores each live server and this client used meanwhile."""
    before, begin = cpu_snapshot(peers), time.perf_counter()
    level = asyncio.run(drive(s.url, s.pick, concurrency, args.round_seconds, args.new_tokens))
    after, wall = cpu_snapshot(peers), time.perf_counter() - begin
    cores = {k: (after[k] - before[k]) / wall for k in after}
    level["server_cpu_cores"], level["client_cpu_cores"] = cores.pop(s.name), cores.pop("client")
    level["idle_peers_cpu_cores"] = cores
    return level


def report(r: int, c: int, s: Scenario, level: dict) -> None:
    print(f"round {r} c={c:>2} {s.name:>7}: {level['tok_per_s']:6.1f} tok/s, {level['requests']} requests "
          f"({level['models_asked']} models), TTFT p50 {level['ttft_p50']:.3f} s p99 {level['ttft_p99']:.3f} s; "
          f"server {level['server_cpu_cores']:.2f} cores", flush=True)


def admin_send(s: Scenario, method: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{s.port}/admin{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def add_to_warm(s: Scenario, times: int) -> None:
    """PUT a composition over the warm server's base and experts (BTX, centroid router: its
    calibration runs the prompts through the composition) `times` times, each under a new name,
    deleting it after; records the build_seconds the server reports (build, calibration and
    placement, from the build's start to serving) and where it was placed."""
    spec = {"base": base_path(), "method": "btx", "router": {"kind": "centroid", "top_k": 2}, "experts": zoo_experts()}
    seconds, placed = [], []
    for i in range(times):
        name = f"added-{i}"
        admin_send(s, "PUT", f"/compositions/{name}", spec)
        deadline = time.monotonic() + 120
        while (status := admin_get(s, f"/compositions/{name}"))["state"] == "building" and time.monotonic() < deadline:
            time.sleep(0.05)
        seconds.append(status["build_seconds"])
        placed.append(placement(status))
        admin_send(s, "DELETE", f"/compositions/{name}")
    s.record["add_to_warm"] = {"build_seconds": spread(seconds), "placements": placed, "spec": spec}


# --- the run -------------------------------------------------------------------------------------

def run(servers: list[Scenario], args: argparse.Namespace) -> None:
    """Start the servers (all, or one at a time), measure those that started, then (`--add-times`)
    time adding a composition to each warm server; stop them."""
    try:
        for group in [[s] for s in servers] if args.one_server_at_a_time else [servers]:
            live = [s for s in group if start(s, args)]
            run_rounds(live, args, measure, report)
            for s in live if args.add_times else []:
                try:
                    add_to_warm(s, args.add_times)
                except OSError as e:  # recorded; the rounds' results are still written
                    s.record["add_to_warm"] = {"error": str(e)}
            for s in group:
                s.stop()
    finally:
        for s in servers:
            s.stop()


def scenario_result(s: Scenario) -> dict:
    peak = s.tree.peak / 2**20 if s.tree else None
    return {"settings": s.settings, **s.record, "peak_rss_mb": peak, "summary": summarise(s.record)}


def parse_args() -> argparse.Namespace:
    ints = lambda v: [int(x) for x in v.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", default=",".join(SCENARIOS), type=lambda v: v.split(","))
    p.add_argument("--concurrency", default="1,8,16", type=ints)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all scenarios")
    p.add_argument("--round-seconds", type=float, default=20, help="clients start new requests until this has passed")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--dtype", default="auto", help="mergeserve's dtype (auto: by CPU flags and a measurement)")
    p.add_argument("--threads", type=int, default=None, help="mergeserve's engine.threads (default: its own)")
    p.add_argument("--start-timeout", type=float, default=1800, help="seconds a server may take until all compositions are ready")
    p.add_argument("--hundred", type=int, default=POOL, choices=range(2, POOL + 1), metavar="N",
                   help="compositions in scenario `hundred` (fewer where 100 do not fit)")
    p.add_argument("--min-available-mb", type=float, default=2048,
                   help="a server's start fails before the machine's available memory would fall below this")
    p.add_argument("--add-times", type=int, default=3, help="compositions added to each warm server after the rounds (0: none)")
    p.add_argument("--one-server-at-a-time", action="store_true", help="each scenario's server alone: all its rounds, then stop")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/shared_base"), help="writes OUT.json and OUT.png")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shared_base-"))
    print("specs, configs and server logs in", tmp, flush=True)
    results = {
        "machine": machine() | {"memory_mb": psutil.virtual_memory().total / 2**20}, "commit": commit(), "tmp_dir": str(tmp),
        "method": {
            "rounds": args.rounds, "round_seconds": args.round_seconds, "concurrency": args.concurrency,
            "new_tokens": args.new_tokens, "max_model_len": args.max_model_len, "scenarios": args.scenarios,
            "hundred_compositions": args.hundred,
            "order": "one server per scenario at a time, all its rounds" if args.one_server_at_a_time
                     else "all servers live; per round, per concurrency, scenarios in this order",
            "tok_per_s": "output tokens of the requests started before the deadline / (end of the last of them - level start)",
            "warm_up": "every composition one 2-token request, then max(concurrency) requests of new_tokens at once",
            "rss": "process tree, RSS summed over its processes, sampled every 0.5 s",
        },
    }
    servers = [make_scenario(name, tmp, args) for name in args.scenarios]
    run(servers, args)
    results["scenarios"] = {s.name: scenario_result(s) for s in servers}
    results["ratios"] = {f"{n}_over_one": ratios(results["scenarios"], n, "one") for n in args.scenarios if n != "one"}
    for n in args.scenarios:  # engines of their own: X_own against one_own, and one against one_own
        if n.endswith("_own") and n != "one_own" and "one_own" in args.scenarios:
            results["ratios"][f"{n}_over_one_own"] = ratios(results["scenarios"], n, "one_own")
    if "one" in args.scenarios and "one_own" in args.scenarios:
        results["ratios"]["one_over_one_own"] = ratios(results["scenarios"], "one", "one_own")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot({**results, "servers": results["scenarios"], "spec": "one base, " + ", ".join(args.scenarios)}, out.with_suffix(".png"))
    print(json.dumps({n: r["summary"] for n, r in results["scenarios"].items()} | {"ratios": results["ratios"]}, indent=1))
    if failed := [s.name for s in servers if "failed" in s.record]:
        raise SystemExit(f"failed to start: {', '.join(failed)} (see their log tails above and `failed` in {out.with_suffix('.json')})")


if __name__ == "__main__":
    main()
