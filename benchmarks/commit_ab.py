"""The engine's decode throughput at this working tree against an earlier commit, interleaved.

A refactor should not change speed; this says whether it did, within the machine's noise. The
earlier commit is checked out into a temporary git worktree; each round runs, in its own process
and in alternating order, greedy decoding of `--new-tokens` tokens for 1, 8 and 16 sequences on
the spec's composition (fp32, the in-process Engine, no HTTP), in each tree. Every round is kept,
with the ratio this tree / the base per round. Writes benchmarks/results/commit_ab.json.

    .venv/bin/python benchmarks/commit_ab.py [--base HEAD~1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import commit, machine, spread  # noqa: E402


def measure(spec: str, batches: list[int], new_tokens: int) -> dict[int, float]:
    """Tokens per second of the tree this process imports (run with PYTHONPATH set to it)."""
    from mergeserve.engine.engine import Engine
    from mergeserve.engine.sequence import SamplingParams
    from mergeserve.experts import ExpertPool
    from mergeserve.spec import EngineConfig, load_composition

    try:
        from mergeserve.learn.compose import build
    except ImportError:  # before the builder moved to learn/
        from mergeserve.merge import build
    engine = Engine(build(load_composition(spec), ExpertPool()), EngineConfig(max_model_len=512))
    prompts = [engine.tokenizer.encode(f"Question {i}: what is {i} plus {i + 1}?") for i in range(max(batches))]
    engine.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    out = {}
    for b in batches:
        start = time.perf_counter()
        engine.generate(prompts[:b], params)
        out[b] = b * new_tokens / (time.perf_counter() - start)
    return out


def run_in(tree: Path, args: argparse.Namespace) -> dict[int, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", "--spec", args.spec, "--batches", args.batches,
           "--new-tokens", str(args.new_tokens)]
    env = os.environ | {"PYTHONPATH": str(tree)}
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="HEAD~1", help="the commit to compare against")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--spec", default="examples/demo_moe.yaml", help="relative to each tree")
    p.add_argument("--batches", default="1,8,16")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/commit_ab.json"))
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.measure:
        print(json.dumps(measure(args.spec, batches, args.new_tokens)))
        return
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), base_rev], cwd=ROOT, check=True)
        try:
            rounds = []
            for r in range(args.rounds):
                order = [("head", ROOT), ("base", base)][:: 1 if r % 2 == 0 else -1]  # alternate who goes first
                rounds.append({name: run_in(tree, args) for name, tree in order})
                print(f"round {r + 1}: " + "; ".join(f"{n} " + ", ".join(f"b={b} {v:.1f}" for b, v in rounds[-1][n].items())
                                                      for n in ("head", "base")), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    result = {
        "machine": machine(), "commit": commit(), "base": base_rev, "spec": args.spec, "new_tokens": args.new_tokens,
        "rounds": rounds,
        "tok_s": {b: {n: spread([r[n][b] for r in rounds]) for n in ("head", "base")} for b in batches},
        "head_over_base": {b: spread([r["head"][b] / r["base"][b] for r in rounds]) for b in batches},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for b in batches:
        s = result["head_over_base"][b]
        print(f"b={b}: this tree / {base_rev} = {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})")


if __name__ == "__main__":
    main()
