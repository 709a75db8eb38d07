"""`mergeserve shrink`: merge experts whose routing and weights are alike into fewer experts (M-SMoE).

1. Routing statistics of the composition:
   - from calibration text: each expert's usage (its share of the top-k picks) and, per pair
     of experts, the cosine of their router logits over every token, averaged over layers
     (M-SMoE's routing-policy similarity);
   - or from a live server's `/metrics` (`mergeserve:expert_tokens_total`): the usage, with
     the cosine of the experts' task vectors (from the LoRA factors) as the similarity.
2. Groups, as M-SMoE forms them: the N most used experts are dominant, and every other expert
   joins the dominant one it is most similar to.
3. Each group becomes one LoRA expert: the usage-weighted average of its members' deltas,
   sum_i f_i B_i A_i (M-SMoE), or with `merge="sum"` their plain sum, sum_i B_i A_i (task
   arithmetic at lambda 1: every member keeps its whole delta, at the price of the others'
   interference), exact as a rank-sum adapter (factors side by side, nothing dense).
   Experts are whole adapters here, so groups are formed once for all layers (M-SMoE groups
   per layer).

It writes OUT/<group>/ (PEFT adapters) and OUT/spec.yaml, the same composition over the
merged experts (their prompts joined, a `learned` router replaced by `hidden`).
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mergeserve.calibration import data_files, file_rows, read_texts
from mergeserve.composition import ComposedModel
from mergeserve.weights import LowRank
from mergeserve.engine.layers import Batch
from mergeserve.engine.model import Capture, Transformer
from mergeserve.experts import Checkpoint, CheckpointError, ExpertPool
from mergeserve.experts.peft_adapter import save_factors
from mergeserve.kernels import router_logits
from mergeserve.learn.compose import build
from mergeserve.merge.btx import load_experts
from mergeserve.spec import CompositionSpec, SpecError, load_composition


@dataclass
class RoutingStats:
    usage: torch.Tensor  # [E], sums to 1
    similarity: torch.Tensor  # [E, E]


def shrink(
    spec_path: str | Path, to: int, out: str | Path, data: list[str | Path] | None = None, metrics_url: str | None = None,
    samples: int = 8, seq_len: int = 256, merge: Literal["usage", "sum"] = "usage",
) -> Path:
    spec = load_composition(spec_path)
    names = [e.name for e in spec.experts]
    if not spec.is_moe or not 1 <= to < len(names):
        raise SpecError(f"{spec_path}: shrink takes an MoE spec (btx or mergeme) to fewer experts, 1 to {len(names) - 1}; got --to {to}")
    pool = ExpertPool()
    base, experts = load_experts(spec, pool)
    deltas = [_factored(e, name, base) for e, name in zip(experts, names)]
    if metrics_url is not None:
        stats = RoutingStats(metrics_usage(metrics_url, spec.name, names), task_vector_similarity(deltas))
    elif data:
        texts = [read_texts(f) for f in data_files(data)]
        composed = build(spec, pool)
        stats = routing_stats(composed, file_rows(texts, composed.tokenizer, samples, seq_len, seed=0))
    else:
        raise ValueError("give calibration text (--data) or a live server's metrics (--metrics URL)")
    groups = group_experts(stats, to)
    return write_shrunk(spec, Path(out), groups, names, deltas, stats.usage, merge)


def _factored(expert: Checkpoint, name: str, base: Checkpoint) -> dict[str, LowRank]:
    """The expert's deltas as LoRA factors; an expert with dense tensors of its own is refused."""
    dense = [k for k, t in expert.stored.items() if t.data_ptr() != base.stored[k].data_ptr()]
    if dense or not expert.factored:
        raise CheckpointError(f"expert {name!r} ({expert.source}): shrink merges LoRA adapters kept as factors; "
                              f"this one is dense ({dense[0] if dense else 'no factors'})")
    return expert.factored


@torch.inference_mode()
def routing_stats(composed: ComposedModel, tokens: torch.Tensor) -> RoutingStats:
    """Usage and router-logit similarity of the experts on `tokens` [B, T] (one forward each row)."""
    model = Transformer(composed, max_len=tokens.shape[1])
    e = composed.num_experts
    gram = torch.zeros(e, e, dtype=torch.float64)  # sum over layers and tokens of logits_i * logits_j
    for row in tokens:
        captured = Capture(ffn=[])
        model(Batch(row.unsqueeze(0), torch.arange(row.numel()).unsqueeze(0), None), capture=captured)
        for x, layer in zip(captured.ffn, composed.layers):
            logits = router_logits(x, layer.router, composed.router_subspace).double()  # [T, E]
            gram += logits.T @ logits
    usage = model.expert_load.sum(0).double()
    return RoutingStats((usage / usage.sum()).float(), cosines(gram))


def metrics_usage(url: str, model: str, names: list[str]) -> torch.Tensor:
    """Each expert's share of the picks in a live server's `mergeserve:expert_tokens_total`."""
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (an operator-given http URL)
        text = response.read().decode()
    picks = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "mergeserve:expert_tokens_total" and s.labels.get("model") == model and s.labels.get("expert") in picks:
                picks[s.labels["expert"]] += s.value
    total = sum(picks.values())
    if total == 0:
        raise ValueError(f"{url}: no mergeserve:expert_tokens_total samples for model {model!r} (has it served traffic?)")
    return torch.tensor([picks[n] / total for n in names])


def task_vector_similarity(deltas: list[dict[str, LowRank]]) -> torch.Tensor:
    """Cosine of the experts' task vectors, from the factors: <B1 A1, B2 A2> = sum((B1^T B2) * (A1 A2^T))."""
    e = len(deltas)
    gram = torch.zeros(e, e, dtype=torch.float64)
    keys = set().union(*deltas)
    for key in keys:
        for i in range(e):
            for j in range(i, e):
                if key in deltas[i] and key in deltas[j]:
                    wi, wj = deltas[i][key], deltas[j][key]
                    bi, bj = wi.scaled_b(torch.float64), wj.scaled_b(torch.float64)
                    dot = ((bi.T @ bj) * (wi.a.double() @ wj.a.double().T)).sum()
                    gram[i, j] += dot
                    gram[j, i] += dot if i != j else 0
    return cosines(gram)


def cosines(gram: torch.Tensor) -> torch.Tensor:
    """The cosine matrix [E, E] of vectors given by their Gram matrix (a zero vector has cosine 0)."""
    norms = gram.diagonal().sqrt().clamp_min(1e-30)
    return (gram / torch.outer(norms, norms)).float()


def group_experts(stats: RoutingStats, to: int) -> list[list[int]]:
    """M-SMoE grouping: the `to` most used experts lead, every other joins its most similar leader."""
    leaders = sorted(torch.argsort(stats.usage, descending=True, stable=True)[:to].tolist())
    groups = {i: [i] for i in leaders}
    for j in range(len(stats.usage)):
        if j not in groups:
            groups[max(leaders, key=lambda i: float(stats.similarity[i, j]))].append(j)
    return [sorted(g) for g in groups.values()]


def merged_deltas(members: list[dict[str, LowRank]], weights: list[float]) -> dict[str, LowRank]:
    """sum_i w_i B_i A_i per projection, as one LowRank of rank sum r_i (factors side by side)."""
    out = {}
    for key in sorted(set().union(*members)):
        parts = [(m[key], w) for m, w in zip(members, weights) if key in m]
        base = parts[0][0].base
        a = torch.cat([p.a.float() for p, _ in parts])
        b = torch.cat([p.scaled_b(torch.float32) * w for p, w in parts], dim=1)
        out[key] = LowRank(base, a, b, 1.0)
    return out


def write_shrunk(
    spec: CompositionSpec, out: Path, groups: list[list[int]], names: list[str], deltas: list[dict[str, LowRank]],
    usage: torch.Tensor, merge: Literal["usage", "sum"] = "usage",
) -> Path:
    experts = []
    for group in groups:
        total = float(usage[group].sum())
        weights = [float(usage[i]) / total if total else 1 / len(group) for i in group]  # unused experts: equal parts
        if merge == "sum":
            weights = [1.0] * len(group)
        name = "-".join(names[i] for i in group)
        save_factors(out / name, merged_deltas([deltas[i] for i in group], weights), spec.base)
        members = [spec.experts[i] for i in group]
        experts.append({"name": name, "source": name, "prompts": [p for m in members for p in m.prompts],
                        "negative_prompts": [p for m in members for p in m.negative_prompts]})
    router = spec.router.model_dump(exclude={"weights"}, exclude_defaults=True)
    if spec.router.kind == "learned":  # its rows were trained for the old experts
        router["kind"] = "hidden" if all(e["prompts"] for e in experts) else "arrow"
    router["top_k"] = min(spec.router.top_k, len(experts))
    suffix = "" if merge == "usage" else f"-{merge}"
    shrunk = {"name": f"{spec.name}-{len(experts)}{suffix}", "base": spec.base, "method": spec.method,
              **({"merge": spec.merge.model_dump(by_alias=True, exclude_defaults=True)} if spec.method == "mergeme" else {}),
              "router": router, "experts": experts}
    path = out / "spec.yaml"
    path.write_text(f"# {spec.name} shrunk to {len(experts)} experts by `mergeserve shrink` (groups merged by {merge}); usage "
                    f"{dict(zip(names, [round(float(u), 3) for u in usage]))}\n" + yaml.safe_dump(shrunk, sort_keys=False, allow_unicode=True))
    return path
