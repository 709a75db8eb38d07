"""Decode throughput: mergeserve's Engine against transformers' Mixtral on the exported checkpoint.

Builds the composition from a spec, then in one run measures greedy decoding of
`--new-tokens` tokens at batch 1 and at `--batch` concurrent sequences, fp32, on
(a) mergeserve's Engine (continuous batching: add the requests, step until done),
(b) transformers' MixtralForCausalLM.generate on the checkpoint export_mixtral writes
(left padding for the batch), and
(c) with --server, `mergeserve serve` in its own process, driven over HTTP by 1 and
`--batch` concurrent streaming clients of the official openai package (the whole stack).
`--rounds` rounds, interleaved: in each, for each batch size (1, then `--batch`), every side
in turn ((a), (b), then (c) with --server; each side warmed up once per batch size before
round 1). Every round is kept, with the CPU cores other processes on the machine used during it
(`other_cpu_cores`); each figure is a spread over the rounds (median, min, max;
benchmarks/common.py), and so are the ratios mergeserve / transformers, taken per round.
Writes benchmarks/results/decode_throughput.json.

    .venv/bin/python benchmarks/decode_throughput.py [SPEC] [--new-tokens 64] [--batch 8] [--rounds 3] [--server]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psutil
import torch
import transformers
from transformers import MixtralForCausalLM, PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import busy_seconds, commit, machine, spread  # noqa: E402

from mergeserve.engine.engine import Engine  # noqa: E402
from mergeserve.engine.sequence import SamplingParams  # noqa: E402
from mergeserve.experts import ExpertPool  # noqa: E402
from mergeserve.export import export_mixtral  # noqa: E402
from mergeserve.kernels.capability import usable_cpus  # noqa: E402
from mergeserve.learn.compose import build  # noqa: E402
from mergeserve.spec import EngineConfig, load_composition  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map works.",
    "Was ist die Hauptstadt von Deutschland?",
    "What is 17 times 23? Think step by step.",
    "def fibonacci(n):",
    "List three facts about the moon.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Translate 'good morning' into French, Spanish and German.",
]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, batch: int) -> list[list[int]]:
    return [tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids for i in range(batch)]


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict[str, float | None]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"bench-{i}", ids, params)
    first: dict[str, float] = {}
    generated = 0
    while engine.has_work():
        for out in engine.step():
            if out.new_token_ids and out.request_id not in first:
                first[out.request_id] = time.perf_counter() - start
            generated += len(out.new_token_ids)
    return summarise(generated, time.perf_counter() - start, list(first.values()))


def run_transformers(
    model: MixtralForCausalLM, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], new_tokens: int,
) -> dict[str, float | None]:
    # Left padding so every row's last prompt token sits at the end.
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id)
    start = time.perf_counter()
    model.generate(**batch, max_new_tokens=1, **kwargs)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(**batch, max_new_tokens=new_tokens, **kwargs)
    wall = time.perf_counter() - start
    generated = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    return summarise(generated, wall, [ttft] * len(prompts))


def run_server_clients(client, model: str, prompts: list[str], new_tokens: int) -> dict[str, float | None]:
    """One streaming completion per prompt, all at once; counts tokens from the usage chunk."""
    from concurrent.futures import ThreadPoolExecutor

    def one(prompt: str) -> tuple[int, float]:
        start, ttft, tokens = time.perf_counter(), None, 0
        stream = client.completions.create(
            model=model, prompt=prompt, max_tokens=new_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].text:
                ttft = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return tokens, ttft or 0.0

    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        done = list(pool.map(one, prompts))
    return summarise(sum(t for t, _ in done), time.perf_counter() - start, [f for _, f in done])


@contextmanager
def served(spec_path: str, batch: int):
    """`mergeserve serve` on a free loopback port in a child process; yields an openai client."""
    import socket
    import subprocess
    import sys
    import urllib.request

    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "serve.yaml"
        config.write_text(json.dumps({
            "compositions": [str(Path(spec_path).resolve())], "dtype": "float32", "engine": {"max_num_seqs": max(8, batch)},
        }))
        cmd = [sys.executable, "-m", "mergeserve.cli", "serve", "--config", str(config), "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2)
                    break
                except OSError:
                    if proc.poll() is not None:
                        raise RuntimeError(f"mergeserve serve exited with {proc.returncode}")
                    time.sleep(1)
            yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def own_seconds() -> float:
    """CPU seconds of this process and its live children (the served mergeserve with --server)."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def summarise(generated: int, wall: float, ttfts: list[float]) -> dict[str, float | None]:
    # Decode rate leaves the prefill out: tokens after each sequence's first, over the time after the last first token.
    decode_time = wall - max(ttfts)
    return {
        "generated_tokens": generated,
        "wall_s": round(wall, 3),
        "tok_per_s": round(generated / wall, 2),
        "decode_tok_per_s": round((generated - len(ttfts)) / decode_time, 2) if decode_time > 0 else None,
        "ttft_mean_s": round(sum(ttfts) / len(ttfts), 3),
        "ttft_max_s": round(max(ttfts), 3),
    }


def table(results: dict[str, dict[str, dict]]) -> str:
    """Medians over the rounds."""
    lines = [f"{'backend':<16}{'batch':>6}{'tok/s':>9}{'decode tok/s':>14}{'TTFT mean s':>13}"]
    nan = {"median": float("nan")}
    for backend, runs in results.items():
        for batch, r in runs.items():
            s = r["summary"]
            lines.append(f"{backend:<16}{batch:>6}{s['tok_per_s']['median']:>9.2f}"
                         f"{s.get('decode_tok_per_s', nan)['median']:>14.2f}{s['ttft_mean_s']['median']:>13.3f}")
    return "\n".join(lines)


def summary(runs: list[dict]) -> dict:
    """Each figure of `runs` (one per round) as a spread; a figure missing from some round is left out."""
    keys = [k for k in runs[0] if k != "round" and all(r.get(k) is not None for r in runs)]
    return {k: spread([r[k] for r in runs]) for k in keys}


def ratios(results: dict, num: str, den: str) -> dict:
    """num's figure over den's, round by round, as a spread per batch size."""
    out = {}
    for batch, a in results.get(num, {}).items():
        b = {r["round"]: r for r in results[den][batch]["rounds"]}
        out[f"batch_{batch}"] = {
            k: spread([r[k] / b[r["round"]][k] for r in a["rounds"]])
            for k in ("tok_per_s", "decode_tok_per_s")
            if all(r[k] and b[r["round"]][k] for r in a["rounds"])
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default=str(ROOT / "examples" / "demo_moe.yaml"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the sides and batch sizes")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_throughput.json"))
    parser.add_argument("--server", action="store_true", help="also measure over HTTP with streaming openai clients")
    parser.add_argument("--export-dir", help="keep the exported Mixtral checkpoint here (default: a temporary folder)")
    args = parser.parse_args()

    started, info = time.perf_counter(), machine()
    spec = load_composition(args.spec).model_copy(update={"dtype": "float32"})
    start = time.perf_counter()
    composed = build(spec, ExpertPool())
    build_s = time.perf_counter() - start
    engine = Engine(composed, EngineConfig(max_num_seqs=max(8, args.batch)))
    tokenizer = composed.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    sizes = {"1": prompt_ids(tokenizer, 1), str(args.batch): prompt_ids(tokenizer, args.batch)}
    texts = {"1": PROMPTS[:1], str(args.batch): [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]}
    rounds: dict[str, dict[str, list[dict]]] = {}

    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        model = MixtralForCausalLM.from_pretrained(export_mixtral(composed, args.export_dir or tmp), dtype=torch.float32)
        model.eval().generation_config.eos_token_id = None  # always generate all new tokens, as ignore_eos does
        sides = {
            "mergeserve": lambda batch, n: run_engine(engine, sizes[batch], n),
            "transformers": lambda batch, n: run_transformers(model, tokenizer, sizes[batch], n),
        }
        if args.server:
            client = stack.enter_context(served(args.spec, args.batch))
            sides["mergeserve-http"] = lambda batch, n: run_server_clients(client, composed.name, texts[batch], n)
        for batch in sizes:
            for run in sides.values():
                run(batch, 4)  # warm-up at this batch size
        for r in range(1, args.rounds + 1):
            for batch in sizes:
                for side, run in sides.items():
                    busy, own, start = busy_seconds(), own_seconds(), time.perf_counter()
                    res = run(batch, args.new_tokens)
                    res["other_cpu_cores"] = (busy_seconds() - busy - (own_seconds() - own)) / (time.perf_counter() - start)
                    rounds.setdefault(side, {}).setdefault(batch, []).append({"round": r, **res})
                    print(f"round {r} batch {batch:>2} {side:>15}: {res['tok_per_s']:7.2f} tok/s "
                          f"(other processes {res['other_cpu_cores']:.2f} cores)", flush=True)

    results = {side: {b: {"rounds": rs, "summary": summary(rs)} for b, rs in by_batch.items()}
               for side, by_batch in rounds.items()}
    report = {
        "machine": info | {"load_1m_end": os.getloadavg()[0]}, "commit": commit(),
        "spec": str(Path(args.spec).resolve().relative_to(ROOT)),
        "composition": {
            "name": composed.name, "experts": composed.expert_names, "top_k": composed.top_k,
            "layers": len(composed.layers), "build_s": round(build_s, 2),
        },
        "settings": {
            "new_tokens": args.new_tokens, "batch": args.batch, "greedy": True,
            "prompt_tokens": [len(p) for p in sizes[str(args.batch)]],
            "mergeserve": {"dtype": "float32", "threads": torch.get_num_threads(), "in_process": True},
            "transformers": {"version": transformers.__version__, "dtype": "float32", "threads": torch.get_num_threads(),
                             "model": "MixtralForCausalLM on the export_mixtral checkpoint, left padding"},
            **({"mergeserve-http": {"dtype": "float32", "threads": usable_cpus(), "max_num_seqs": max(8, args.batch),
                                    "client": "openai, streaming completions, one thread per request"}}
               if args.server else {}),
        },
        "method": {"rounds": args.rounds, "order": "per round, per batch size, the sides in turn",
                   "decode_tok_per_s": "tokens after each sequence's first / time after the last first token",
                   "other_cpu_cores": "CPU cores every other process on the machine used during the run (what disturbed it)"},
        "results": results,
        "ratio_mergeserve_over_transformers": ratios(results, "mergeserve", "transformers"),
        "wall_s": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print("mergeserve / transformers, median of the per-round ratios:",
          json.dumps({b: {k: round(v["median"], 2) for k, v in r.items()}
                      for b, r in report["ratio_mergeserve_over_transformers"].items()}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
