"""Where the demo composition routes each domain's tokens: every expert's share per MoE layer.

The demo composition (examples/demo.yaml: SmolLM2-135M with the zoo's math, german and code LoRA
experts, BTX, hidden-state router, top-2) reads the first `--examples` held-out texts of each
domain (examples/zoo/data/<domain>/heldout.jsonl, the eval harness's set), each cut to
`--max-tokens` tokens, one forward per text. The routing is the engine's own: the router
statistics every forward adds to (Transformer.expert_weight and expert_load, what /metrics
serves as expert_tokens_total), read once per domain. Per domain and layer, an expert's share is
the routing weight it got over the weight all experts got (top-k weights sum to 1 per token), and
its pick share the top-k picks it got over all picks.

Writes benchmarks/results/routing_heatmap.json and routing_heatmap.png (one panel per domain:
rows layers, columns experts, colour the weight share).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/routing_heatmap.py [--examples 16] [--max-tokens 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine  # noqa: E402

from mergeserve.calibration import read_jsonl  # noqa: E402
from mergeserve.engine.layers import Batch  # noqa: E402
from mergeserve.engine.model import Transformer  # noqa: E402
from mergeserve.experts import ExpertPool  # noqa: E402
from mergeserve.learn.compose import build  # noqa: E402
from mergeserve.spec import load_serve_config  # noqa: E402
from mergeserve.zoo.splits import heldout_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "routing_heatmap.json"


@torch.inference_mode()
def domain_routing(model: Transformer, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The router statistics that `rows` (one forward each) add: weight and picks, [L, E] each."""
    model.expert_weight.zero_()
    model.expert_load.zero_()
    for ids in rows:
        tokens = torch.tensor([ids])
        model(Batch(tokens, torch.arange(len(ids)).unsqueeze(0), None))
    return model.expert_weight.clone(), model.expert_load.clone()


def shares(counts: torch.Tensor) -> list[list[float]]:
    """Each layer's row of counts [L, E] over its sum."""
    return (counts.double() / counts.double().sum(1, keepdim=True).clamp_min(1e-12)).tolist()


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains, experts = list(result["domains"]), result["experts"]
    layers = result["moe_layers"]
    fig, axes = plt.subplots(1, len(domains), figsize=(2.2 * len(domains) + 1.6, 0.16 * len(layers) + 2.2), sharey=True,
                             constrained_layout=True)
    for ax, domain in zip(axes, domains):
        image = ax.imshow(result["domains"][domain]["weight_share"], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{domain} texts")
        ax.set_xticks(range(len(experts)), experts)
        ax.set_xlabel("expert")
    axes[0].set_ylabel("layer")
    axes[0].set_yticks(range(0, len(layers), 5), [layers[i] for i in range(0, len(layers), 5)])
    fig.colorbar(image, ax=axes, label="share of routing weight", shrink=0.9)
    fig.suptitle(f"{result['composition']}: expert share per layer, held-out texts of each domain")
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "examples" / "demo.yaml", help="serve config; its first composition is measured")
    p.add_argument("--examples", type=int, default=16, help="held-out texts per domain, the first N (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens kept per text (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = machine()
    spec = load_serve_config(args.config).compositions[0]
    t0 = time.perf_counter()
    composed = build(spec, ExpertPool())
    model = Transformer(composed, max_len=args.max_tokens)
    experts = list(composed.expert_names)
    moe_layers = [i for i, layer in enumerate(composed.layers) if layer.is_moe]
    result = {
        "machine": started, "commit": commit(), "composition": spec.name, "config": str(args.config.resolve().relative_to(ROOT)),
        "router": {"kind": spec.router.kind, "top_k": spec.router.top_k}, "dtype": "float32",
        "examples_per_domain": args.examples, "max_tokens": args.max_tokens, "threads": args.threads,
        "experts": experts, "moe_layers": moe_layers, "domains": {},
    }
    for domain in experts:  # the zoo's experts are named after their domains
        texts = [e["text"] for e in read_jsonl(heldout_path(domain))[:args.examples]]
        rows = [composed.tokenizer(t, add_special_tokens=False)["input_ids"][:args.max_tokens] for t in texts]
        weight, load = domain_routing(model, rows)
        weight, load = weight[moe_layers], load[moe_layers]
        total = weight.sum(0) / weight.sum()
        result["domains"][domain] = {
            "texts": len(rows), "tokens": sum(map(len, rows)),
            "weight_share": shares(weight), "pick_share": shares(load),
            "mean_weight_share": dict(zip(experts, total.tolist())),  # over every layer
            "own_expert_weight_share": float(total[experts.index(domain)]),
        }
        print(domain, {e: round(s, 3) for e, s in result["domains"][domain]["mean_weight_share"].items()}, flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
