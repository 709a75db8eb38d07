"""Where the task-vector router's evidence comes from, and two variants of it, scored on dev and test splits.

`seq-dynamic-tv` scores cos(-grad L_base(x), tau_i) over every projection of every layer at once
(engine/task_vector.py). On the zoo's texts the gradient's mass is not spread over the model: a few
layers and the first position (the attention sink, whose activations are large and carry no
content) hold most of |g|^2. This benchmark asks whether the router routes better without that:
- `positions`: `all` (what ships), or `skip_first` (the first position's term dropped from every g);
- `cosine`: `global` (what ships), or `per_layer` (the mean over layers of each layer's cosine).

Each variant is calibrated as `mergeserve calibrate-router` does (learn/router_temperature.py) on
`short_chat_dev`, then scored on dev splits (a seeded sample of each domain's training texts,
`short_chat_dev`, the second set's `other_dev`) and on the test sets (`short_chat`, and the eval's
long texts of `heldout` and `other`, routed on their first route_tokens tokens), with misrouted
texts named. Choose a variant on the dev splits only.

    .venv/bin/python benchmarks/task_vector_ablation.py   # about 20 minutes on 2 cores

Writes benchmarks/results/task_vector_ablation.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine  # noqa: E402
from short_prompt_routing import ZOO, long_texts, prompts  # noqa: E402

from mergeserve.calibration import read_jsonl  # noqa: E402
from mergeserve.engine.task_vector import TaskVectorScorer, backward_with_hooks, linear_grad_stats, routed_keys, tau_sq_norm  # noqa: E402
from mergeserve.eval.metrics import tokenize  # noqa: E402
from mergeserve.eval.scoring import EvalSettings  # noqa: E402
from mergeserve.experts import ExpertPool  # noqa: E402
from mergeserve.learn.compose import build  # noqa: E402
from mergeserve.learn.router_temperature import fit_calibration  # noqa: E402
from mergeserve.spec import load_composition  # noqa: E402
from mergeserve.zoo.splits import train_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
Row = tuple[int, int, list[int], tuple[int, int] | None]  # (expert index, index in its file, tokens, span)


def train_texts(composed, per_domain: int = 100) -> list[Row]:
    """The first route_tokens tokens of a seeded sample of each domain's training texts (long enough to score)."""
    settings, rows = EvalSettings(), []
    for e, name in enumerate(composed.expert_names):
        texts = [x["text"] for x in read_jsonl(train_path(name))]
        random.Random(0).shuffle(texts)
        ids = tokenize(composed.tokenizer, texts[:2 * per_domain], settings.max_tokens)
        rows += [(e, i, x[:settings.route_tokens], None) for i, x in enumerate(ids) if len(x) > settings.route_tokens][:per_domain]
    return rows


def weight_stats(scorer: TaskVectorScorer, keys: list[str], row: Row, skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """<g_k, tau_ik> [K, E] and |g_k|^2 [K] of one prompt for every routed weight k, its first `skip` positions dropped."""
    dots, sq = {}, {}

    def accumulate(key: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        d, s = linear_grad_stats(x[:, skip:], delta[:, skip:], scorer.taus[key])
        dots[key], sq[key] = d[0], s[0]

    _, _, ids, span = row
    with torch.enable_grad():
        backward_with_hooks(scorer.model, [ids], accumulate, [span] if span else None)
    return torch.stack([dots[k] for k in keys]), torch.stack([sq[k] for k in keys])


def cosines(dots: torch.Tensor, sq: torch.Tensor, tau_sq: torch.Tensor, per_layer: bool, layers: int) -> torch.Tensor:
    """Scores [N, E] from dots [N, K, E], sq [N, K] and |tau|^2 [K, E]: one cosine over every weight, or the mean of each layer's."""
    groups = dots.shape[1] // layers if per_layer else dots.shape[1]
    d = dots.double().unflatten(1, (-1, groups)).sum(2)  # [N, G, E]
    g = sq.double().unflatten(1, (-1, groups)).sum(2).sqrt()  # [N, G]
    t = tau_sq.double().unflatten(0, (-1, groups)).sum(1).sqrt()  # [G, E]
    return (-d / (g.unsqueeze(2) * t).clamp_min(1e-30)).mean(1).float()  # -: the descent direction


def figures(scores: torch.Tensor, truth: torch.Tensor, rows: list[Row], names: list[str], offsets: torch.Tensor) -> dict:
    guess = (scores + offsets).argmax(1)
    right = guess == truth
    return {"texts": len(rows), "accuracy": float(right.float().mean()),
            "by_domain": {d: float(right[truth == i].float().mean()) for i, d in enumerate(names)},
            "misrouted": [{"domain": names[e], "index": i, "to": names[g]} for (e, i, _, _), g in zip(rows, guess.tolist()) if g != e]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="seq_dynamic_tv.yaml")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/task_vector_ablation.json"))
    args = p.parse_args()
    composed = build(load_composition(ZOO / "specs" / args.spec), ExpertPool())
    names, routing = list(composed.expert_names), composed.mixture_routing
    scorer = TaskVectorScorer(routing.base, routing.experts)
    layers = routing.base.config.num_hidden_layers
    keys = routed_keys(layers)
    tau_sq = torch.tensor([[0.0 if t is None else float(tau_sq_norm(t)) for t in scorer.taus[k]] for k in keys])  # [K, E]
    chat = lambda split: [(e, i, ids, span) for i, (e, ids, span) in enumerate(prompts(composed, split))]  # noqa: E731
    long = lambda held_out: [(e, i, ids, None) for e, i, ids in long_texts(composed, held_out)]  # noqa: E731
    dev = {"train": train_texts(composed), "short_chat_dev": chat("short_chat_dev"), "other_dev": long("other_dev")}
    test = {"short_chat": chat("short_chat"), "heldout": long("heldout"), "other": long("other")}
    results = {"machine": machine(), "commit": commit(), "spec": args.spec, "dev": list(dev), "test": list(test), "variants": {}}
    for skip, positions in ((0, "all"), (1, "skip_first")):
        stats = {name: [weight_stats(scorer, keys, row, skip) for row in rows] for name, rows in (dev | test).items()}
        stacked = {name: (torch.stack([d for d, _ in s]), torch.stack([q for _, q in s])) for name, s in stats.items()}
        dots, sq = stacked["short_chat_dev"]
        share = sq.double().unflatten(1, (layers, -1)).sum(2)  # [N, layers]: where |g|^2 lies, on the calibration prompts
        results[f"grad_share_by_layer_{positions}"] = (share / share.sum(1, keepdim=True)).mean(0).tolist()
        for per_layer, cosine in ((False, "global"), (True, "per_layer")):
            scores = {name: cosines(d, q, tau_sq, per_layer, layers) for name, (d, q) in stacked.items()}
            truth = {name: torch.tensor([r[0] for r in rows]) for name, rows in (dev | test).items()}
            t, offsets = fit_calibration(scores["short_chat_dev"], truth["short_chat_dev"])
            variant = {"positions": positions, "cosine": cosine, "inverse_temperature": t, "offsets": dict(zip(names, offsets.tolist()))}
            for name, rows in (dev | test).items():
                variant[name] = figures(scores[name], truth[name], rows, names, offsets)
            variant["dev_right"] = sum(round(variant[n]["accuracy"] * variant[n]["texts"]) for n in dev)
            variant["dev_texts"] = sum(len(rows) for rows in dev.values())
            results["variants"][f"{positions}/{cosine}"] = variant
            print(f"{positions}/{cosine}", {n: round(variant[n]["accuracy"], 3) for n in dev | test}, flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
