"""Sequence routers on short first-turn chat prompts: does the domain's expert get the most weight?

The prompts: `examples/zoo/data/<domain>/short_chat.jsonl`, hand-written questions of at most 40
tokens, one set per domain, written apart from every training template and document. Each is
templated as the server templates a chat (the base's chat template, one user message), and
scored by each mixture router in `--specs` on the whole templated prompt (the router before
issue 26) and on the user's message alone (SamplingParams.route_span, what the server sends
now). Then calibrated: the prompts are split in two halves per domain (alternate lines); the
router's inverse temperature and per-expert offsets are fitted on one half
(learn/router_temperature.py, what `mergeserve calibrate-router` writes) and scored on the
other, against the uncalibrated router on that same half. Reported per router and way: accuracy
(the domain's expert has the largest weight) per domain and overall, the mean weight on the
right expert, and the share of prompts an unsure router (router.min_margin, `--min-margin`)
would mix over every expert.
Writes benchmarks/results/short_prompt_routing.json.

    .venv/bin/python benchmarks/short_prompt_routing.py [--specs seq_dynamic.yaml task_vector.yaml] [--min-margin 0.2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine  # noqa: E402

from mergeserve.engine.mixture_router import MixtureRouter  # noqa: E402
from mergeserve.experts import ExpertPool  # noqa: E402
from mergeserve.learn.router_temperature import fit_calibration, labelled_prompts  # noqa: E402
from mergeserve.learn.compose import build  # noqa: E402
from mergeserve.spec import load_composition  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "examples/zoo"


def prompts(composed) -> list[tuple[int, list[int], tuple[int, int] | None]]:
    """(expert index, templated prompt tokens, the user message's span) of every short chat prompt,
    as `mergeserve calibrate-router` reads them."""
    return labelled_prompts(composed, {d: [ZOO / "data" / d / "short_chat.jsonl"] for d in composed.expert_names}, chat=True)


def evaluate(scores: torch.Tensor, truth: torch.Tensor, names: list[str], t: float, min_margin: float,
             offsets: torch.Tensor | None = None) -> dict:
    """Routing figures of scores [N, E] against truth [N] under softmax(t * (scores + offsets))."""
    every = torch.softmax(t * (scores if offsets is None else scores + offsets), dim=1)  # [N, E]
    right = every.argmax(1) == truth
    best = torch.topk(every, 2, dim=1).values
    return {"prompts": len(truth), "accuracy": float(right.float().mean()),
            "by_domain": {d: float(right[truth == i].float().mean()) for i, d in enumerate(names)},
            "mean_weight_on_right_expert": float(every[torch.arange(len(truth)), truth].mean()),
            "unsure_share": float(((best[:, 0] - best[:, 1]) < min_margin).float().mean()),
            "inverse_temperature": t, "offsets": None if offsets is None else dict(zip(names, offsets.tolist()))}


def route(router: MixtureRouter, names: list[str], rows, min_margin: float) -> dict:
    whole = torch.cat([router.scores([ids]) for _, ids, _ in rows])  # [N, E]
    content = torch.cat([router.scores([ids], [span]) for _, ids, span in rows])
    truth = torch.tensor([e for e, _, _ in rows])
    fit = torch.tensor([i % 2 == 0 for i in range(len(rows))])  # alternate lines of each domain's file
    t = router.routing.temperature
    t_fit, offsets = fit_calibration(content[fit], truth[fit])
    held = ~fit
    return {
        "whole_prompt": evaluate(whole, truth, names, t, min_margin),
        "user_message": evaluate(content, truth, names, t, min_margin),
        "held_out_half": {"user_message": evaluate(content[held], truth[held], names, t, min_margin),
                          "user_message_calibrated": evaluate(content[held], truth[held], names, t_fit, min_margin, offsets)},
        "prompt_tokens_median": float(torch.tensor([len(ids) for _, ids, _ in rows]).float().median()),
        "user_message_tokens_median": float(torch.tensor([s[1] - s[0] for _, _, s in rows if s]).float().median()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", nargs="+", default=["seq_dynamic.yaml", "task_vector.yaml"])
    p.add_argument("--min-margin", type=float, default=0.2)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/short_prompt_routing.json"))
    args = p.parse_args()
    pool = ExpertPool()
    results = {"machine": machine(), "commit": commit(), "args": vars(args), "routers": {}}
    for name in args.specs:
        spec = load_composition(ZOO / "specs" / name)
        composed = build(spec, pool)
        router, names = MixtureRouter(composed), list(composed.expert_names)
        rows = prompts(composed)
        result = {"kind": spec.router.kind, "prompts": len(rows)} | route(router, names, rows, args.min_margin)
        results["routers"][spec.name] = result
        held = result["held_out_half"]
        print(spec.name, {k: round(result[k]["accuracy"], 3) for k in ("whole_prompt", "user_message")},
              {k: round(v["accuracy"], 3) for k, v in held.items()}, flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    with torch.no_grad():  # not inference mode: the task-vector router differentiates the base model
        main()
