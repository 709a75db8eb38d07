"""`mergeserve tune-merge`: learn a merge coefficient per expert per layer from unlabeled text.

Expert Merging (and AdaMerging's entropy objective as an option). The merged model is
base + sum_i c[n, i] tau_i in layer n. With LoRA experts that is the per-request merging
forward (router.attention: dynamic) with every token's gate set to the layer's row of c:
the task vectors stay low-rank factors and only c [L, E] gets gradients.

Objective `expert_merging`: on each expert's own calibration text, the merged model's
residual stream after every layer and its next-token distribution are pulled towards that
expert's (relative squared error of the states, plus KL(expert || merged)). `entropy`:
the merged model's mean predictive entropy on all the text (AdaMerging). Both add
`reg * mean (c - c0)^2`, c0 the spec's own merge (lambda * weight), where training starts.

Granularity `important` is Expert Merging++'s importance-guided chunking: the first half of the
steps learn c [L, E]; each layer's importance, sum_i |c[n, i]| |tau_i in layer n|_F over the
layer's parameter count, picks the `fine_fraction` most important layers; the second half learns
attention and FFN apart in those layers only (the others keep one coefficient for both).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mergeserve.calibration import data_files, file_rows, read_texts
from mergeserve.composition import ComposedModel
from mergeserve.engine.layers import Batch
from mergeserve.engine.mixture_router import expert_model
from mergeserve.engine.model import Capture, Transformer
from mergeserve.engine.task_vector import tau, tau_sq_norm
from mergeserve.experts import ExpertPool
from mergeserve.learn.compose import build
from mergeserve.merge import coefficients
from mergeserve.spec import CompositionSpec, SpecError, load_composition
from mergeserve.spec.router import PerplexityRouterSpec


@dataclass(frozen=True)
class TuneConfig:
    steps: int = 30
    batch_size: int = 2  # sequences of each expert's text per step
    seq_len: int = 256
    lr: float = 0.02  # Adam moves each coefficient by about this per step
    objective: Literal["expert_merging", "entropy"] = "expert_merging"
    # layer: a coefficient per expert per layer; module: attention and FFN apart in every layer;
    # important: attention and FFN apart in the most important layers only (Expert Merging++).
    granularity: Literal["layer", "module", "important"] = "layer"
    fine_fraction: float = 0.25  # important: the share of layers that get a coefficient per module
    hidden_weight: float = 1.0  # the states' term against the KL term
    reg: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.seq_len) < 1 or self.lr <= 0 or self.reg < 0 or self.hidden_weight < 0 \
                or not 0 < self.fine_fraction <= 1:
            raise ValueError(f"steps, batch size, sequence length and lr must be positive, reg and hidden_weight not negative, "
                             f"fine_fraction in (0, 1]: {self}")


@dataclass
class TuneResult:
    coefficients: torch.Tensor  # [L, E] or [L, 2, E]
    init: torch.Tensor  # [L, E] or [L, 2, E]
    loss: list[float] = field(default_factory=list)  # per step, regulariser included
    fine_layers: list[int] = field(default_factory=list)  # important: the layers split into attention and FFN


def tune_merge(
    spec_path: str | Path, data: dict[str, list[str | Path]], out: str | Path, cfg: TuneConfig = TuneConfig(),
    progress: bool = True,
) -> TuneResult:
    """Learn the coefficients of the spec's merge from each expert's text (`data`: expert -> files)."""
    spec = load_composition(spec_path)
    names = [e.name for e in spec.experts]
    if (spec.is_moe and spec.method != "mergeme") or len(names) < 2:
        raise SpecError(f"{spec_path}: tune-merge learns the coefficients of a task-vector merge (a dense method, or mergeme's shared layers) of two or more experts")
    if missing := [n for n in names if n not in data]:
        raise ValueError(f"no calibration text for the experts {missing} (give --data NAME=PATH, or a folder with a subfolder per expert)")
    texts = {n: [read_texts(f) for f in data_files(data[n])] for n in names}  # bad data fails before the slow build
    composed = build(merging_spec(spec), ExpertPool())
    init = torch.tensor([[spec.merge.lambda_ * e.weight for e in spec.experts]] * len(composed.layers))  # [L, E]
    if cfg.granularity == "module":
        init = _per_module(init)
    tokens = {n: file_rows(texts[n], composed.tokenizer, cfg.steps * cfg.batch_size, cfg.seq_len, cfg.seed) for n in names}
    if cfg.granularity == "important":
        norms = tau_norms(spec, ExpertPool(), len(composed.layers))
        result = train_important(composed, [tokens[n] for n in names], init, norms, cfg, progress)
    else:
        result = train_coefficients(composed, [tokens[n] for n in names], init, cfg, progress)
    coefficients.save(out, result.coefficients, names, {
        "base": spec.base, "composition": spec.name, "method": spec.merge.method, **asdict(cfg),
        "loss_first": result.loss[0], "loss_final": sum(result.loss[-5:]) / len(result.loss[-5:]),
        "data": {n: [str(f) for f in data_files(data[n])] for n in names}, "fine_layers": result.fine_layers,
    })
    return result


def merging_spec(spec: CompositionSpec) -> CompositionSpec:
    """The spec's experts as a per-request merging composition: what the training forward runs."""
    return spec.model_copy(update={
        "method": "mergeme", "merge": spec.merge.model_copy(update={"coefficients": None}),
        "router": PerplexityRouterSpec(attention="dynamic", top_k=len(spec.experts)),
    })


def tau_norms(spec: CompositionSpec, pool: ExpertPool, num_layers: int) -> torch.Tensor:
    """|tau_i|_F per layer, module (attention, FFN) and expert, over the parameter count: [L, 2, E]."""
    base = pool.get(spec.base)
    experts = [pool.get_expert(e.source, e.base or spec.base) for e in spec.experts]
    sq, count = torch.zeros(num_layers, 2, len(experts), dtype=torch.float64), torch.zeros(num_layers, 2, 1)
    for key, w0 in base.tensors.items():
        if (layer := coefficients.layer_of(key)) is None or w0.dim() != 2:
            continue
        module = 0 if ".self_attn." in key else 1
        count[layer, module] += w0.numel()
        for i, expert in enumerate(experts):
            if (t := tau(expert, base, key)) is not None:
                sq[layer, module, i] += tau_sq_norm(t)
    return (sq.sqrt() / count.clamp(min=1)).float()


def layer_importance(c: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Expert Merging++'s normalised importance of each layer: sum_i |c[n, i]| |tau_i|_F / params, [L], sums to 1.
    c [L, E]; norms [L, 2, E] from tau_norms."""
    score = (c.abs().unsqueeze(1) * norms).sum((1, 2))  # [L]
    return score / score.sum().clamp(min=1e-30)


def train_important(
    composed: ComposedModel, tokens: list[torch.Tensor], init: torch.Tensor, norms: torch.Tensor, cfg: TuneConfig,
    progress: bool = True,
) -> TuneResult:
    """Layer coefficients for the first half of the steps, then attention and FFN apart in the most important layers."""
    first_steps = max(1, cfg.steps // 2)
    rows = first_steps * cfg.batch_size
    first = train_coefficients(composed, [t[:rows] for t in tokens], init, replace(cfg, steps=first_steps), progress)
    fine = torch.zeros(len(init), dtype=torch.bool)  # [L]
    k = max(1, round(cfg.fine_fraction * len(init)))
    fine[layer_importance(first.coefficients, norms).topk(k).indices] = True
    rest = replace(cfg, steps=max(1, cfg.steps - first_steps))
    second = train_coefficients(composed, [t[rows:] for t in tokens], _per_module(init), rest, progress,
                                start=_per_module(first.coefficients), tied=~fine)
    return TuneResult(second.coefficients, second.init, first.loss + second.loss, fine.nonzero().flatten().tolist())


def _per_module(table: torch.Tensor) -> torch.Tensor:
    return table.unsqueeze(1).repeat(1, 2, 1)  # [L, E] -> [L, 2, E]


def train_coefficients(
    composed: ComposedModel, tokens: list[torch.Tensor], init: torch.Tensor, cfg: TuneConfig, progress: bool = True,
    start: torch.Tensor | None = None, tied: torch.Tensor | None = None,
) -> TuneResult:
    """Adam on c [L, E] (or [L, 2, E]) from `start` (default `init`, which the regulariser pulls towards);
    tokens: each expert's rows [steps * B, T], step i reads rows [i*B, (i+1)*B). `tied` [L] bool: layers
    whose attention and FFN share one coefficient (their two rows see the mean of the two gradients)."""
    student = Transformer(composed, max_len=cfg.seq_len)
    c = (init if start is None else start).clone().requires_grad_()
    teachers = [Transformer(expert_model(composed, e), max_len=cfg.seq_len) for e in range(composed.num_experts)]
    opt = torch.optim.Adam([c], lr=cfg.lr)
    result = TuneResult(c, init)
    bar = tqdm(range(cfg.steps), desc="tune-merge", unit="step", disable=not progress)
    for step in bar:
        table = _tie(c, tied)
        rows = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
        loss = sum(_loss(student, table, teacher, t[rows], cfg) for teacher, t in zip(teachers, tokens)) / len(teachers)
        loss = loss + cfg.reg * (table - init).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        result.loss.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    result.coefficients = _tie(c, tied).detach().clone()
    return result


def _tie(c: torch.Tensor, tied: torch.Tensor | None) -> torch.Tensor:
    if tied is None:
        return c
    return torch.where(tied[:, None, None], c.mean(1, keepdim=True).expand_as(c), c)  # [L, 2, E]


def _loss(student: Transformer, table: torch.Tensor, teacher: Transformer, tokens: torch.Tensor, cfg: TuneConfig) -> torch.Tensor:
    """The objective on one batch of `tokens` [B, T], the student merged as `table` ([L, E] or [L, 2, E])."""
    batch = Batch(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None, key_len=tokens.shape[1])
    mine = Capture(layers=[])
    logits = student.logits(student(batch, capture=mine, coefficients=table))  # [B, T, V]
    log_p = F.log_softmax(logits, dim=-1)
    if cfg.objective == "entropy":
        return -(log_p.exp() * log_p).sum(-1).mean()
    theirs = Capture(layers=[])
    with torch.no_grad():
        target = F.log_softmax(teacher.logits(teacher(batch, capture=theirs)), dim=-1)
    states = sum((s - t).pow(2).sum(-1).mean() / t.pow(2).sum(-1).mean() for s, t in zip(mine.layers, theirs.layers))
    kl = F.kl_div(log_p.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
    return cfg.hidden_weight * states / len(mine.layers) + kl
