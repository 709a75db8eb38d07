"""Arithmetic in short first-turn chat questions, asked of served compositions as a new user would.

The 25 hand-written math prompts of `examples/zoo/data/math/short_chat.jsonl` (at most 40
tokens, none from a training template, each with its answer) go to one `mergeserve serve` through
the official `openai` client, as chat messages (the server applies the chat template; a sequence
router scores the user's message), greedy, at most 160 new tokens. A reply is right when the
number after its last `Answer:` is the answer, or, for a reply without that line, its last
number (lm-eval's flexible extract). For compositions that route, the response's `experts`
field says whether the math expert got the most weight. Writes benchmarks/results/short_chat_math.json.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/short_chat_math.py [--specs base math btx seq_dynamic seq_dynamic_tv]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine  # noqa: E402
from memory_compositions import start  # noqa: E402
from serving import Server, free_port  # noqa: E402

from mergeserve.calibration import read_jsonl  # noqa: E402
from mergeserve.eval.metrics import extract_answer, matches  # noqa: E402
from mergeserve.server.state import dump_spec  # noqa: E402
from mergeserve.spec import load_composition  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "examples/zoo/data/math/short_chat.jsonl"
OUT = ROOT / "benchmarks/results/short_chat_math.json"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def answer_of(reply: str) -> tuple[str | None, bool]:
    """The reply's answer, and whether it came from an `Answer:` line."""
    if (found := extract_answer(reply)) is not None:
        return found, True
    numbers = NUMBER.findall(reply)
    return (numbers[-1].replace(",", "") if numbers else None), False


async def ask_all(url: str, model: str, problems: list[dict], new_tokens: int) -> list[dict]:
    import openai

    async with openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=900) as client:
        async def one(p: dict) -> dict:
            r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": p["text"]}],
                                                     max_tokens=new_tokens, temperature=0)
            reply = r.choices[0].message.content or ""
            got, formatted = answer_of(reply)
            experts = (r.model_extra or {}).get("experts") or {}
            top = max(experts, key=experts.get) if experts else None
            return {"prompt": p["text"], "answer": p["answer"], "reply": reply, "extracted": got, "answer_line": formatted,
                    "correct": got is not None and matches(got, p["answer"]), "experts": experts, "top_expert": top}

        return await asyncio.gather(*(one(p) for p in problems))


def summary(rows: list[dict]) -> dict:
    n = len(rows)
    routed = [r for r in rows if r["top_expert"] is not None]
    return {"accuracy": sum(r["correct"] for r in rows) / n, "correct": sum(r["correct"] for r in rows), "n": n,
            "answer_line": sum(r["answer_line"] for r in rows) / n,
            "math_on_top": sum(r["top_expert"] == "math" for r in routed) / len(routed) if routed else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--specs", nargs="+", default=["base", "math", "btx", "seq_dynamic", "seq_dynamic_tv"], help="names under examples/zoo/specs")
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--timeout", type=float, default=1200)
    args = p.parse_args()
    problems = read_jsonl(PROMPTS)
    specs = [dump_spec(load_composition(ROOT / "examples/zoo/specs" / f"{name}.yaml")) for name in args.specs]
    config = {"compositions": specs, "dtype": "float32", "engine": {"max_num_seqs": 32, "max_model_len": 2048}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config))
        port = free_port()
        cmd = [sys.executable, "-m", "mergeserve.cli", "serve", "--config", str(path), "--port", str(port)]
        server = Server("short-chat-math", cmd, "/ready", specs[0]["name"], port, {"models": [s["name"] for s in specs]})
        try:
            start(server, args.timeout)
            rows = {s["name"]: asyncio.run(ask_all(server.url, s["name"], problems, args.new_tokens)) for s in specs}
        finally:
            server.stop()
    results = {name: summary(r) for name, r in rows.items()}
    for name, s in results.items():
        print(f"{name}: {s['correct']}/{s['n']} right, {s['answer_line']:.0%} with an Answer: line, math on top {s['math_on_top']}")
    OUT.write_text(json.dumps({"machine": machine(), "commit": commit(), "prompts": str(PROMPTS.relative_to(ROOT)),
                               "new_tokens": args.new_tokens, "results": results, "replies": rows}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
