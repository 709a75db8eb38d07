"""Composition build time: mergeserve in memory against mergekit-moe to a servable checkpoint, in interleaved rounds.

The composition: the zoo's three LoRA experts plus the base itself as a fourth, generalist
expert, top-2, `hidden` gate initialisation from each expert's prompts (the same prompts for
both tools). Each of `--rounds` rounds measures, in this order:
1. cold: a new ExpertPool loads the four sources (GGUF dequantisation, LoRA factors;
   `pool_load_s`), then builds the BTX composition once (`cold_btx_build_s`); `cold_s` is the sum;
2. warm BTX: the BTX composition built again from that pool (`btx_build_s`; each build includes
   the router's calibration forward passes), and the build plus the Engine over it (fused,
   packed: what a server swaps in; `btx_build_and_engine_s`);
3. warm MergeME-TIES: the same for `mergeme` (`mergeme_build_s`, `mergeme_build_and_engine_s`);
4. mergekit-moe (`--mergekit-moe PATH`, default: found on PATH; skipped when absent) on the same
   experts written out once, before round 1 and untimed, as dense float32 Hugging Face folders;
   `gate_mode: hidden`, `--mergekit-dtype` (default float32), to a fresh output folder that
   transformers and vLLM load (`mergekit_moe_s`: the subprocess's wall time, start to exit).
Every round is kept; each figure is summarised as `spread` (median, min, max; benchmarks/common.py),
and so are the ratios, taken per round: cold = mergekit_moe_s / cold_s, warm = mergekit_moe_s / btx_build_s.
The two sides differ in dtype and in what their `hidden` gate reads: see `notes` in the output.

Writes benchmarks/results/build_time.json (or `--out`).

    .venv/bin/python benchmarks/build_time.py [--rounds 3] [--mergekit-moe .venv/bin/mergekit-moe] [--out /tmp/build_time.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from common import commit, machine, spread
from mergeserve.engine.engine import Engine
from mergeserve.experts import ExpertPool
from mergeserve.export import export_dense
from mergeserve.kernels.capability import resolve_dtype
from mergeserve.learn.compose import build
from mergeserve.spec import CompositionSpec, load_composition, parse_composition

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "examples" / "zoo" / "specs"
GENERALIST_PROMPTS = ["The weather was lovely, so we walked along the river and talked about the week."]

NOTES = {
    "dtype": (
        "The two sides do not compute in the same dtype: mergeserve builds in its pool's dtype (`mergeserve.dtype`, "
        "bfloat16 where `auto` measures it faster, else float32), mergekit-moe merges and writes `mergekit_moe.dtype` "
        "(float32 unless --mergekit-dtype) from float32 inputs, and runs its gate's forward passes in bfloat16 "
        "whatever that dtype (mergekit/moe/router.py loads the base with torch_dtype=bfloat16)."
    ),
    "hidden_gate_mergeserve": (
        "mergeserve/router/hidden.py: the state each router actually sees, i.e. the post-attention, normalised "
        "(post_attention_layernorm) hidden state of the composed model itself, every layer's FFN forced to the "
        "expert whose prompts run; the mean over every token of the expert's prompts (no BOS added). "
        "Row i = scale * d_i / |d_i|^2 with d_i = mean_i - reference_i (the negative prompts' mean, else the mean "
        "of the other experts' means), so an expert's mean state scores `scale` logits above the reference."
    ),
    "hidden_gate_mergekit": (
        "mergekit-moe 0.1.5, gate_mode hidden (mergekit/moe/router.py get_gate_params): the base model alone "
        "(base_model, here the base's dense folder), loaded with transformers in bfloat16, output_hidden_states; "
        "layer l reads hidden_states[l], the residual stream entering layer l, before its input norm and attention "
        "(not normalised); `hidden` takes the last position of each row of the batch of the expert's prompts, each "
        "prefixed with the BOS token (<|im_start|> here) and right-padded (SmolLM2's tokenizer pads on the right), "
        "so for every prompt shorter than the longest it reads a pad position (`hidden_avg` would average all "
        "positions, pads included); averaged over the prompts, minus the negative prompts' state if any, then "
        "scaled to unit length. No reference from the other experts."
    ),
    "cold": (
        "Rounds run in one process: from round 2 on the sources are in the OS page cache for both sides (mergekit "
        "reads dense folders written before round 1), so `cold` means a new pool, not a cold disk."
    ),
}


def four_expert_spec(method: str) -> CompositionSpec:
    """The zoo's BTX spec with the base added as a generalist expert."""
    spec = load_composition(SPECS / "btx.yaml")
    experts = [e.model_dump() for e in spec.experts]
    experts.append({"name": "generalist", "source": spec.base, "prompts": GENERALIST_PROMPTS})
    return parse_composition({"name": f"zoo4-{method}", "base": spec.base, "method": method,
                              "router": {"kind": "hidden", "top_k": 2}, "experts": experts})


def timed(fn) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def time_build(spec: CompositionSpec, pool: ExpertPool, prefix: str) -> dict[str, float]:
    """One build from `pool`, then the Engine over it (what the server does next: fused, packed, ready to step)."""
    start = time.perf_counter()
    composed = build(spec, pool)
    built = time.perf_counter() - start
    Engine(composed, packer=pool.packer)
    return {f"{prefix}_build_s": built, f"{prefix}_build_and_engine_s": time.perf_counter() - start}


def mergeserve_round(dtype: torch.dtype) -> dict[str, float]:
    """Cold pool load and first BTX build, then a warm BTX and a warm MergeME-TIES build from that pool."""
    btx, mergeme = four_expert_spec("btx"), four_expert_spec("mergeme")
    pool = ExpertPool(dtype=dtype)
    _, load = timed(lambda: [pool.get_expert(s, btx.base) for s in [btx.base] + [e.source for e in btx.experts]])
    _, first = timed(lambda: build(btx, pool))
    out = {"pool_load_s": load, "cold_btx_build_s": first, "cold_s": load + first}
    out |= time_build(btx, pool, "btx")
    out |= time_build(mergeme, pool, "mergeme")
    del pool
    gc.collect()
    return out


def write_dense_experts(spec: CompositionSpec, folder: Path) -> dict[str, Path]:
    """Each expert (and the base) as a dense float32 Hugging Face folder, for mergekit."""
    pool, out = ExpertPool(dtype=torch.float32), {}
    for e in spec.experts:
        one = parse_composition({"name": e.name, "base": spec.base, "experts": [{"name": e.name, "source": e.source}]})
        out[e.name] = export_dense(build(one, pool), folder / e.name)
    return out


def mergekit_config(spec: CompositionSpec, folders: dict[str, Path], dtype: str, path: Path) -> Path:
    config = {
        "base_model": str(folders["generalist"]), "gate_mode": "hidden", "dtype": dtype,
        "experts": [{"source_model": str(folders[e.name]), "positive_prompts": e.prompts} for e in spec.experts],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def mergekit_round(exe: str, config: Path, out: Path, threads: int) -> dict[str, float]:
    """One mergekit-moe run to a fresh folder, on `threads` torch threads as mergeserve: its wall time and the
    bytes it wrote (the folder is removed after)."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    run, seconds = timed(lambda: subprocess.run([exe, str(config), str(out)], capture_output=True, text=True, env=env))
    if run.returncode:
        raise SystemExit(f"mergekit-moe failed ({run.returncode}):\n{run.stderr[-3000:]}")
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shutil.rmtree(out)
    return {"mergekit_moe_s": seconds, "mergekit_moe_bytes_written": written}


def find_mergekit_moe() -> str | None:
    beside = Path(sys.executable).parent / "mergekit-moe"
    return shutil.which("mergekit-moe") or (str(beside) if beside.exists() else None)


def mergekit_version(exe: str) -> str:
    """The mergekit version of the environment `exe` lives in."""
    python = Path(exe).parent / "python"
    probe = "import importlib.metadata as m; print(m.version('mergekit'))"
    run = subprocess.run([str(python), "-c", probe], capture_output=True, text=True) if python.exists() else None
    return run.stdout.strip() if run and run.returncode == 0 else "unknown"


def summarise(rounds: list[dict]) -> tuple[dict, dict]:
    """Every figure as a spread over the rounds, and the per-round ratios as spreads."""
    keys = [k for k in rounds[0] if k != "round"]
    summary = {k: spread([r[k] for r in rounds]) for k in keys}
    ratios = {}
    if "mergekit_moe_s" in rounds[0]:
        ratios["mergekit_over_mergeserve_cold"] = spread([r["mergekit_moe_s"] / r["cold_s"] for r in rounds])
        ratios["mergekit_over_mergeserve_warm"] = spread([r["mergekit_moe_s"] / r["btx_build_s"] for r in rounds])
    return summary, ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mergekit-moe", default=find_mergekit_moe(), help="path of mergekit-moe (default: on PATH or beside "
                   "this python; skipped if none)")
    p.add_argument("--mergekit-dtype", default="float32", help="mergekit-moe's `dtype` (its merge and output)")
    p.add_argument("--dtype", default="auto", help="the pool's weight format, as a serve config's `dtype` (auto: as the demo serves)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of both sides (mergekit-moe: OMP_NUM_THREADS)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "build_time.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype)
    result = {
        "machine": machine(), "commit": commit(),
        "composition": "zoo math/german/code LoRA experts + the base as generalist, top-2, hidden gate",
        "method": {"rounds": args.rounds,
                   "order": "each round: mergeserve cold (new pool + BTX build), warm BTX, warm MergeME-TIES, then mergekit-moe"},
        "mergeserve": {"dtype_requested": args.dtype, "dtype": str(dtype).removeprefix("torch."),
                       "threads": torch.get_num_threads()},
        "notes": NOTES,
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = None
        if args.mergekit_moe:
            spec = four_expert_spec("btx")
            config = mergekit_config(spec, write_dense_experts(spec, work / "experts"), args.mergekit_dtype, work / "moe.yaml")
            result["mergekit_moe"] = {
                "version": mergekit_version(args.mergekit_moe), "dtype": args.mergekit_dtype, "gate_forward_dtype": "bfloat16",
                "inputs": "dense float32 Hugging Face folders (written before round 1, not timed)",
                "threads": args.threads, "command": f"{args.mergekit_moe} moe.yaml out",
                "config": yaml.safe_load(config.read_text()),
            }
        else:
            result["mergekit_moe"] = {"skipped": "no mergekit-moe on PATH and no --mergekit-moe"}
        rounds = []
        for r in range(1, args.rounds + 1):
            row = {"round": r, **mergeserve_round(dtype)}
            if config is not None:
                row |= mergekit_round(args.mergekit_moe, config, work / "out", args.threads)
            print(json.dumps(row), flush=True)
            rounds.append(row)
    result["rounds"] = rounds
    result["summary"], result["ratios"] = summarise(rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"summary": result["summary"], "ratios": result["ratios"]}, indent=1))


if __name__ == "__main__":
    main()
