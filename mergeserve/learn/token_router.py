"""`mergeserve train-router`: train only the router rows of an MoE composition on unlabeled text.

The composition runs through the engine's own forward (engine/model.py, no KV cache), so
what is trained is exactly what is served: LoRA experts stay factored, Qwen2 biases and
routed attention run as they do in the server. The rows (every layer's FFN router, and
with routed attention its attention router) are copied into leaf tensors that alone get
gradients; the composition itself is left untouched. The loss is next-token cross-entropy
plus alpha times the Switch/Mixtral load-balancing loss `N * sum_i f_i * P_i` over every
router (transformers' `load_balancing_loss_func`). The rows start from the spec's own
router (hidden, random, or a learned file to continue from).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mergeserve.calibration import data_files, file_rows, read_texts
from mergeserve.composition import ComposedModel
from mergeserve.engine.layers import Batch
from mergeserve.engine.model import Capture, Transformer
from mergeserve.experts import ExpertPool
from mergeserve.kernels import router_logits
from mergeserve.learn.compose import build
from mergeserve.router import ROUTER_FIELD, routed_sites
from mergeserve.router.learned import save_rows
from mergeserve.spec import SpecError, load_composition

NO_GRADIENT_AT_TOP_1 = (
    "with top_k=1 the renormalised gate weight is always 1, so the router gets no gradient from the "
    "next-token loss; train with router.top_k 2 or more (the rows can be served with top_k 1)"
)


@dataclass(frozen=True)
class RouterTrainConfig:
    # 50 x 4 x 256 = 51k tokens: enough for 3 x 576 parameters per layer, and minutes on two cores.
    steps: int = 50
    batch_size: int = 4
    seq_len: int = 256
    # Adam moves each row entry by about lr per step; the zoo's hidden-init entries are ~0.1,
    # so 50 steps can move them by up to the same again, but not overshoot in one step.
    lr: float = 2e-3
    warmup_steps: int = 5
    alpha: float = 0.01  # weight of the load-balancing loss
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.seq_len) < 1 or self.warmup_steps < 0:
            raise ValueError(f"steps, batch size and sequence length must be at least 1, warmup at least 0: {self}")
        if self.lr <= 0 or self.alpha < 0:
            raise ValueError(f"lr must be positive and alpha not negative, got lr={self.lr}, alpha={self.alpha}")


@dataclass
class RouterTrainResult:
    rows: list[torch.Tensor]  # L x [E, D]
    attention_rows: list[torch.Tensor] | None = None  # L x [E, D], with routed attention
    lm_loss: list[float] = field(default_factory=list)  # per step
    aux_loss: list[float] = field(default_factory=list)  # per step, before the alpha weight

    # Reported as the mean of the last steps: one batch's loss is too noisy.
    @property
    def final_lm_loss(self) -> float:
        return _tail_mean(self.lm_loss)

    @property
    def final_aux_loss(self) -> float:
        return _tail_mean(self.aux_loss)


def _tail_mean(values: list[float], steps: int = 10) -> float:
    tail = values[-steps:]
    return sum(tail) / len(tail)


def train_router(
    spec_path: str | Path, data: list[str | Path], out: str | Path, cfg: RouterTrainConfig = RouterTrainConfig(),
    progress: bool = True,
) -> RouterTrainResult:
    """Build the spec's composition, train its router rows on `data`, write them to `out`."""
    spec = load_composition(spec_path)
    if not spec.is_moe or len(spec.experts) < 2 or spec.mixture_routed:
        raise SpecError(f"{spec_path}: train-router needs an MoE spec (method btx or mergeme) with a token router and at least two experts")
    if spec.router.top_k < 2:
        raise SpecError(f"{spec_path}: router.top_k: {NO_GRADIENT_AT_TOP_1}")
    files = data_files(data)
    texts = [read_texts(f) for f in files]  # bad data fails here, before the slow build
    composed = build(spec, ExpertPool())
    trainer = RouterTrainer(composed, cfg.alpha, cfg.seq_len)
    tokens = file_rows(texts, composed.tokenizer, cfg.steps * cfg.batch_size, cfg.seq_len, cfg.seed)
    result = train_rows(trainer, tokens, cfg, progress)
    save_rows(out, result.rows, composed.expert_names, {
        "base": spec.base, "composition": spec.name, "init": spec.router.kind, "top_k": composed.top_k,
        "attention": spec.router.attention, "hidden_size": composed.config.hidden_size, "num_layers": len(composed.layers),
        "data": [str(f) for f in files], "tokens": int(tokens.numel()), **asdict(cfg),
        "lm_loss_first": result.lm_loss[0], "lm_loss_final": result.final_lm_loss,
        "aux_loss_first": result.aux_loss[0], "aux_loss_final": result.final_aux_loss,
    }, attention_rows=result.attention_rows)
    return result


class RouterTrainer:
    """The composition's forward with its router rows as the only tensors that learn."""

    def __init__(self, composed: ComposedModel, alpha: float, max_len: int = 2048) -> None:
        if composed.top_k < 2:
            raise ValueError(f"composition {composed.name!r}: {NO_GRADIENT_AT_TOP_1}")
        if any(layer.router is None for layer in composed.layers):
            raise ValueError(f"composition {composed.name!r}: train-router trains token routers; it has MoE layers without one")
        self.composed, self.alpha = composed, alpha
        self.sites = routed_sites(composed)
        # site -> L leaf copies [E, D]; the model runs a shallow copy of the composition holding them.
        self.rows = {site: [getattr(layer, ROUTER_FIELD[site]).detach().clone().requires_grad_() for layer in composed.layers]
                     for site in self.sites}
        layers = [replace(layer, **{ROUTER_FIELD[s]: self.rows[s][n] for s in self.sites}) for n, layer in enumerate(composed.layers)]
        self.model = Transformer(replace(composed, layers=layers), max_len=max_len)

    def parameters(self) -> list[torch.Tensor]:
        return [r for site in self.sites for r in self.rows[site]]

    def losses(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Total, next-token and load-balancing loss of `tokens` [B, T]; total = lm + alpha * aux."""
        captured = Capture(ffn=[], attention=[])
        batch = Batch(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None, key_len=tokens.shape[1])
        hidden = self.model(batch, capture=captured)
        logits = self.model.logits(hidden[:, :-1])  # [B, T-1, V]
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        gate_logits = [router_logits(x, r, self.composed.router_subspace)  # [tokens, E] each
                       for site in self.sites for x, r in zip(getattr(captured, site), self.rows[site])]
        aux = load_balancing_loss_func(tuple(gate_logits), self.composed.num_experts, self.composed.top_k)
        return lm + self.alpha * aux, lm, aux


def train_rows(trainer: RouterTrainer, tokens: torch.Tensor, cfg: RouterTrainConfig, progress: bool = True) -> RouterTrainResult:
    """AdamW on the trainer's router rows over `tokens` [steps * B, T]; step i reads rows [i*B, (i+1)*B)."""
    params = trainer.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # decay would pull the rows to zero, not to their init
    schedule = get_cosine_schedule_with_warmup(opt, min(cfg.warmup_steps, cfg.steps // 2), cfg.steps)
    result = RouterTrainResult([])
    bar = tqdm(range(cfg.steps), desc="router", unit="step", disable=not progress)
    for step in bar:
        total, lm, aux = trainer.losses(tokens[step * cfg.batch_size:(step + 1) * cfg.batch_size])
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        schedule.step()
        result.lm_loss.append(lm.item())
        result.aux_loss.append(aux.item())
        bar.set_postfix(loss=f"{lm.item():.3f}", balance=f"{aux.item():.3f}")
    result.rows = [r.detach().clone() for r in trainer.rows["ffn"]]
    if "attention" in trainer.rows:
        result.attention_rows = [r.detach().clone() for r in trainer.rows["attention"]]
    return result
