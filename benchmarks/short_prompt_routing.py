"""Sequence routers on short first-turn chat prompts: does the domain's expert get the most weight?

The prompts: `examples/zoo/data/<domain>/short_chat.jsonl`, hand-written questions of at most 40
tokens, one set per domain, written apart from every training template and document. Each is
templated as the server templates a chat (the base's chat template, one user message), and
scored by each mixture router in `--specs` on the whole templated prompt (the router before
issue 26) and on the user's message alone (SamplingParams.route_span, what the server sends
now), uncalibrated (every offset 0). Then calibrated: the router's inverse temperature and
per-expert offsets fitted (learn/router_temperature.py, what `mergeserve calibrate-router`
writes) on a split of their own, `short_chat_dev.jsonl` (other hand-written prompts), and scored
on `short_chat.jsonl`. A perplexity router is calibrated on both of its scales: the paper's 1/PPL,
and the mean log-likelihood per token (`router.score: log_likelihood`), on which the offsets are
log-priors. Reported per router and way: accuracy (the domain's expert has the largest weight)
per domain and overall, the mean weight on the right expert, and the share of prompts an unsure
router (router.min_margin, `--min-margin`) would mix over every expert.
Then the same calibrated routers on long texts, as `mergeserve eval` routes them: the first
`route_tokens` tokens of each held-out text of both sets (`heldout`, `other`; the eval's first
`per_domain` texts per domain, those long enough to score), with the misrouted texts named.
Writes benchmarks/results/short_prompt_routing.json.

    .venv/bin/python benchmarks/short_prompt_routing.py [--specs seq_dynamic.yaml seq_dynamic_tv.yaml] [--min-margin 0.2]
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
from mergeserve.eval.datasets import SETS, load_eval_data  # noqa: E402
from mergeserve.eval.metrics import tokenize  # noqa: E402
from mergeserve.eval.scoring import EvalSettings  # noqa: E402
from mergeserve.experts import ExpertPool  # noqa: E402
from mergeserve.learn.router_temperature import fit_calibration, labelled_prompts  # noqa: E402
from mergeserve.learn.compose import build  # noqa: E402
from mergeserve.spec import load_composition  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "examples/zoo"


def prompts(composed, split: str = "short_chat") -> list[tuple[int, list[int], tuple[int, int] | None]]:
    """(expert index, templated prompt tokens, the user message's span) of every prompt of `split`,
    as `mergeserve calibrate-router` reads them."""
    return labelled_prompts(composed, {d: [ZOO / "data" / d / f"{split}.jsonl"] for d in composed.expert_names}, chat=True)


def long_texts(composed, held_out: str) -> list[tuple[int, int, list[int]]]:
    """(expert index, the text's index in its file, its first route_tokens tokens) of each text
    `mergeserve eval` scores on `held_out`: the first per_domain of each domain, long enough to score."""
    settings = EvalSettings()
    names = list(composed.expert_names)
    data = load_eval_data(ZOO / "data", tuple(names), settings.per_domain, held_out=held_out)
    rows = []
    for e, name in enumerate(names):
        ids = tokenize(composed.tokenizer, [x["text"] for x in data.domains[name]], settings.max_tokens)
        rows += [(e, i, x[:settings.route_tokens]) for i, x in enumerate(ids) if len(x) > settings.route_tokens]
    return rows


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


def route(router: MixtureRouter, names: list[str], rows, dev_rows, min_margin: float) -> dict:
    """Routing figures on `rows`; the calibrated ones fitted on `dev_rows`."""
    def scored(on, whole=False):  # [N, E] raw scores, and each prompt's expert [N]
        scores = torch.cat([router.scores([ids], None if whole else [span]) for _, ids, span in on])
        return scores, torch.tensor([e for e, _, _ in on])

    whole, truth = scored(rows, whole=True)
    content, _ = scored(rows)
    dev, dev_truth = scored(dev_rows)
    out = {"whole_prompt": evaluate(whole, truth, names, 1.0, min_margin),
           "user_message": evaluate(content, truth, names, 1.0, min_margin)}
    scales = {"calibrated": lambda x: x}
    if router.routing.kind == "perplexity":  # both scales, from whichever the spec scores on
        to_log = (lambda x: x) if router.routing.score == "log_likelihood" else torch.log
        scales = {"calibrated_log_likelihood": to_log, "calibrated_inverse_perplexity": lambda x: to_log(x).exp()}
    fits = {name: fit_calibration(scale(dev), dev_truth) for name, scale in scales.items()}  # (t, offsets)
    for name, scale in scales.items():
        t, offsets = fits[name]
        out[name] = evaluate(scale(content), truth, names, t, min_margin, offsets)
    for held_out in SETS:  # long texts, routed on their first tokens as the eval routes them
        texts = long_texts(router.composed, held_out)
        scores, text_truth = scored([(e, ids, None) for e, _, ids in texts])
        for name, scale in scales.items():
            t, offsets = fits[name]
            guess = (scale(scores) + offsets).argmax(1)
            out[f"{name}_long_{held_out}"] = evaluate(scale(scores), text_truth, names, t, min_margin, offsets) | {
                "misrouted": [{"domain": names[e], "index": i, "to": names[g]}
                              for (e, i, _), g in zip(texts, guess.tolist()) if g != e]}
    out["prompt_tokens_median"] = float(torch.tensor([len(ids) for _, ids, _ in rows]).float().median())
    out["user_message_tokens_median"] = float(torch.tensor([s[1] - s[0] for _, _, s in rows if s]).float().median())
    out["calibration_prompts"] = len(dev_rows)
    out["route_tokens"] = EvalSettings().route_tokens
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", nargs="+", default=["seq_dynamic.yaml", "seq_dynamic_tv.yaml"])
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
        result = {"kind": spec.router.kind, "prompts": len(rows)} | route(router, names, rows, prompts(composed, "short_chat_dev"), args.min_margin)
        results["routers"][spec.name] = result
        print(spec.name, {k: round(v["accuracy"], 3) for k, v in result.items() if isinstance(v, dict)}, flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    with torch.no_grad():  # not inference mode: the task-vector router differentiates the base model
        main()
