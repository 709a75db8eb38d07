"""Composition build time: mergeserve in memory against mergekit-moe to a servable checkpoint.

The composition: the zoo's three LoRA experts plus the base itself as a fourth, generalist
expert, top-2, `hidden` gate initialisation from each expert's prompts (the same prompts
for both tools). In one run:
(a) mergeserve: load the four sources into a cold ExpertPool (GGUF dequantisation, LoRA
    factors), then build the composition from the warm pool several times, for BTX and
    MergeME-TIES (each build includes the router's calibration forward passes), and also
    time the build plus the Engine over it (fused, packed: what a server swaps in);
(b) mergekit-moe (`--mergekit-moe PATH`, default: found on PATH; skipped when absent) on the
    same experts written out as dense fp32 Hugging Face folders (writing them is not timed),
    `gate_mode: hidden`, fp32, to an output folder transformers and vLLM load.
Writes benchmarks/results/build_time.json.

    .venv/bin/python benchmarks/build_time.py [--repeats 3] [--mergekit-moe /tmp/mk/bin/mergekit-moe]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from mergeserve.engine.engine import Engine
from mergeserve.experts import ExpertPool
from mergeserve.export import export_dense
from mergeserve.kernels.capability import resolve_dtype
from mergeserve.merge import build
from mergeserve.spec import CompositionSpec, load_composition, parse_composition

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "examples" / "zoo" / "specs"
GENERALIST_PROMPTS = ["The weather was lovely, so we walked along the river and talked about the week."]


def four_expert_spec(method: str) -> CompositionSpec:
    """The zoo's BTX spec with the base added as a generalist expert."""
    spec = load_composition(SPECS / "btx.yaml")
    experts = [e.model_dump() for e in spec.experts]
    experts.append({"name": "generalist", "source": spec.base, "prompts": GENERALIST_PROMPTS})
    return parse_composition({"name": f"zoo4-{method}", "base": spec.base, "method": method,
                              "router": {"kind": "hidden", "top_k": 2}, "experts": experts})


def time_mergeserve(repeats: int, dtype: torch.dtype) -> dict:
    spec = four_expert_spec("btx")
    pool = ExpertPool(dtype=dtype)
    start = time.perf_counter()
    for source in [spec.base] + [e.source for e in spec.experts]:
        pool.get_expert(source, spec.base)
    result = {"pool_load_s": time.perf_counter() - start}
    for method in ("btx", "mergeme"):
        spec = four_expert_spec(method)
        times, servable = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            composed = build(spec, pool)
            times.append(time.perf_counter() - start)
            Engine(composed, packer=pool.packer)  # what the server does next: fused, packed, ready to step
            servable.append(time.perf_counter() - start)
        result[f"{method}_build_s"] = {"median": statistics.median(times), "all": times}
        result[f"{method}_build_and_engine_s"] = {"median": statistics.median(servable), "all": servable}
    return result


def write_dense_experts(spec: CompositionSpec, folder: Path) -> dict[str, Path]:
    """Each expert (and the base) as a dense fp32 Hugging Face folder, for mergekit."""
    pool, out = ExpertPool(), {}
    for e in spec.experts:
        one = parse_composition({"name": e.name, "base": spec.base, "experts": [{"name": e.name, "source": e.source}]})
        out[e.name] = export_dense(build(one, pool), folder / e.name)
    return out


def time_mergekit(exe: str, spec: CompositionSpec, work: Path) -> dict:
    folders = write_dense_experts(spec, work / "experts")
    config = {
        "base_model": str(folders["generalist"]), "gate_mode": "hidden", "dtype": "float32",
        "experts": [{"source_model": str(folders[e.name]), "positive_prompts": e.prompts} for e in spec.experts],
    }
    (work / "moe.yaml").write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    run = subprocess.run([exe, str(work / "moe.yaml"), str(work / "out")],
                         capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode:
        raise SystemExit(f"mergekit-moe failed ({run.returncode}):\n{run.stderr[-3000:]}")
    written = sum(f.stat().st_size for f in (work / "out").rglob("*") if f.is_file())
    return {"seconds": seconds, "bytes_written": written, "command": f"{exe} moe.yaml out"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mergekit-moe", default=shutil.which("mergekit-moe"), help="path of mergekit-moe (skipped if none)")
    p.add_argument("--dtype", default="auto", help="the pool's weight format, as a serve config's `dtype` (auto: as the demo serves)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "build_time.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "composition": "zoo math/german/code LoRA experts + the base as generalist, top-2, hidden gate",
        "dtype": str(resolve_dtype(args.dtype)).removeprefix("torch."),
        "mergeserve": time_mergeserve(args.repeats, resolve_dtype(args.dtype)),
    }
    if args.mergekit_moe:
        with tempfile.TemporaryDirectory() as tmp:
            result["mergekit_moe"] = time_mergekit(args.mergekit_moe, four_expert_spec("btx"), Path(tmp))
        ms = result["mergeserve"]
        result["ratio_mergekit_over_mergeserve_warm"] = result["mergekit_moe"]["seconds"] / ms["btx_build_s"]["median"]
        result["ratio_mergekit_over_mergeserve_cold"] = result["mergekit_moe"]["seconds"] / (ms["pool_load_s"] + ms["btx_build_s"]["median"])
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
