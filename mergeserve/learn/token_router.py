"""`mergeserve train-router`: train only the router rows of an MoE composition on unlabeled text.

The composition runs through the engine's own forward (engine/model.py, no KV cache), so
what is trained is exactly what is served: LoRA experts stay factored, Qwen2 biases and
routed attention run as they do in the server. The rows (every layer's FFN router, and
with routed attention its attention router) are copied into leaf tensors that alone get
gradients; the composition itself is left untouched. The loss is next-token cross-entropy
plus alpha times the Switch/Mixtral load-balancing loss `N * sum_i f_i * P_i` over every
router (transformers' `load_balancing_loss_func`). The rows start from the spec's own
router (hidden, random, or a learned file to continue from).

So that the rows generalise beyond their training texts (issue 26, where learned rows kept less
of an expert's gain on other sources than the training-free `hidden` rows they started from):
- `anchor` adds `anchor * sum ||rows - initial rows||^2`, pulling towards the training-free
  start rather than towards zero (L2-SP);
- `mixed` builds each row from segments of the files in turn, so rows switch domain
  mid-sequence, as chats and mixed documents do;
- with validation texts (texts of other sources than training's), the next-token loss on them is
  measured every `eval_every` steps, and the rows of the best measurement are kept (early stopping).
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
    anchor: float = 0.0  # weight of the squared distance to the initial (training-free) rows
    mixed: bool = False  # rows of segments from the files in turn, instead of each row from one file
    eval_every: int = 10  # steps between validation measurements (with validation texts)
    val_rows: int = 8  # validation sequences of seq_len tokens, the files taking turns

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.seq_len) < 1 or self.warmup_steps < 0:
            raise ValueError(f"steps, batch size and sequence length must be at least 1, warmup at least 0: {self}")
        if self.lr <= 0 or self.alpha < 0 or self.anchor < 0:
            raise ValueError(f"lr must be positive, alpha and anchor not negative, got lr={self.lr}, alpha={self.alpha}, anchor={self.anchor}")
        if min(self.eval_every, self.val_rows) < 1:
            raise ValueError(f"eval_every and val_rows must be at least 1: {self}")
        if self.mixed and self.seq_len % MIXED_PARTS:
            raise ValueError(f"mixed rows are {MIXED_PARTS} segments: seq_len must be a multiple of {MIXED_PARTS}, got {self.seq_len}")


@dataclass
class RouterTrainResult:
    rows: list[torch.Tensor]  # L x [E, D]
    attention_rows: list[torch.Tensor] | None = None  # L x [E, D], with routed attention
    lm_loss: list[float] = field(default_factory=list)  # per step
    aux_loss: list[float] = field(default_factory=list)  # per step, before the alpha weight
    val_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, next-token loss on validation texts)
    best_step: int | None = None  # the kept rows' step, with validation texts (0: the initial rows)

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


MIXED_PARTS = 4  # a mixed row: this many segments, from the files in turn


def training_rows(texts: list[list[str]], tokenizer, cfg: RouterTrainConfig) -> torch.Tensor:
    """[steps * B, T] token rows, each from one file, the files taking turns; or with `mixed`,
    each row MIXED_PARTS segments of T / MIXED_PARTS tokens from the files in turn, so that a row
    switches domain mid-sequence while every domain keeps its even share."""
    rows = cfg.steps * cfg.batch_size
    if not cfg.mixed:
        return file_rows(texts, tokenizer, rows, cfg.seq_len, cfg.seed)
    segments = file_rows(texts, tokenizer, rows * MIXED_PARTS, cfg.seq_len // MIXED_PARTS, cfg.seed)  # [rows * P, T / P]
    return segments.reshape(rows, cfg.seq_len)


def train_router(
    spec_path: str | Path, data: list[str | Path], out: str | Path, cfg: RouterTrainConfig = RouterTrainConfig(),
    progress: bool = True, val: list[str | Path] | None = None,
) -> RouterTrainResult:
    """Build the spec's composition, train its router rows on `data`, write them to `out`.

    `val`: files of validation texts; the rows with the lowest next-token loss on them are kept."""
    spec = load_composition(spec_path)
    if not spec.is_moe or len(spec.experts) < 2 or spec.mixture_routed:
        raise SpecError(f"{spec_path}: train-router needs an MoE spec (method btx or mergeme) with a token router and at least two experts")
    if spec.router.top_k < 2:
        raise SpecError(f"{spec_path}: router.top_k: {NO_GRADIENT_AT_TOP_1}")
    files = data_files(data)
    texts = [read_texts(f) for f in files]  # bad data fails here, before the slow build
    val_files = data_files(val) if val else []
    val_texts = [read_texts(f) for f in val_files]
    composed = build(spec, ExpertPool())
    trainer = RouterTrainer(composed, cfg.alpha, cfg.seq_len, cfg.anchor)
    tokens = training_rows(texts, composed.tokenizer, cfg)
    held = file_rows(val_texts, composed.tokenizer, cfg.val_rows, cfg.seq_len, cfg.seed) if val_texts else None
    result = train_rows(trainer, tokens, cfg, progress, held)
    save_rows(out, result.rows, composed.expert_names, {
        "base": spec.base, "composition": spec.name, "init": spec.router.kind, "top_k": composed.top_k,
        "attention": spec.router.attention, "hidden_size": composed.config.hidden_size, "num_layers": len(composed.layers),
        "data": [str(f) for f in files], "tokens": int(tokens.numel()), **asdict(cfg),
        "lm_loss_first": result.lm_loss[0], "lm_loss_final": result.final_lm_loss,
        "aux_loss_first": result.aux_loss[0], "aux_loss_final": result.final_aux_loss,
        "val": [str(f) for f in val_files], "val_loss": result.val_loss, "best_step": result.best_step,
    }, attention_rows=result.attention_rows)
    return result


class RouterTrainer:
    """The composition's forward with its router rows as the only tensors that learn."""

    def __init__(self, composed: ComposedModel, alpha: float, max_len: int = 2048, anchor: float = 0.0) -> None:
        if composed.top_k < 2:
            raise ValueError(f"composition {composed.name!r}: {NO_GRADIENT_AT_TOP_1}")
        if any(layer.router is None for layer in composed.layers):
            raise ValueError(f"composition {composed.name!r}: train-router trains token routers; it has MoE layers without one")
        self.composed, self.alpha, self.anchor = composed, alpha, anchor
        self.sites = routed_sites(composed)
        # site -> L leaf copies [E, D]; the model runs a shallow copy of the composition holding them.
        self.rows = {site: [getattr(layer, ROUTER_FIELD[site]).detach().clone().requires_grad_() for layer in composed.layers]
                     for site in self.sites}
        self.initial = self.snapshot()  # the training-free rows the anchor pulls towards
        layers = [replace(layer, **{ROUTER_FIELD[s]: self.rows[s][n] for s in self.sites}) for n, layer in enumerate(composed.layers)]
        self.model = Transformer(replace(composed, layers=layers), max_len=max_len)

    def parameters(self) -> list[torch.Tensor]:
        return [r for site in self.sites for r in self.rows[site]]

    def snapshot(self) -> dict[str, list[torch.Tensor]]:
        return {site: [r.detach().clone() for r in rows] for site, rows in self.rows.items()}

    @torch.no_grad()
    def restore(self, rows: dict[str, list[torch.Tensor]]) -> None:
        for site, saved in rows.items():
            for r, s in zip(self.rows[site], saved):
                r.copy_(s)

    @torch.no_grad()
    def next_token_loss(self, tokens: torch.Tensor, batch_size: int) -> float:
        """Mean next-token loss over `tokens` [N, T], `batch_size` rows at a time."""
        return sum(self.losses(tokens[i:i + batch_size])[1].item() * len(tokens[i:i + batch_size])
                   for i in range(0, len(tokens), batch_size)) / len(tokens)

    def losses(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Total, next-token and load-balancing loss of `tokens` [B, T];
        total = lm + alpha * aux + anchor * (squared distance of the rows to their start)."""
        captured = Capture(ffn=[], attention=[])
        batch = Batch(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None, key_len=tokens.shape[1])
        hidden = self.model(batch, capture=captured)
        logits = self.model.logits(hidden[:, :-1])  # [B, T-1, V]
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        gate_logits = [router_logits(x, r, self.composed.router_subspace)  # [tokens, E] each
                       for site in self.sites for x, r in zip(getattr(captured, site), self.rows[site])]
        aux = load_balancing_loss_func(tuple(gate_logits), self.composed.num_experts, self.composed.top_k)
        total = lm + self.alpha * aux
        if self.anchor:
            total = total + self.anchor * sum(((r - r0) ** 2).sum() for site in self.sites
                                              for r, r0 in zip(self.rows[site], self.initial[site]))
        return total, lm, aux


def train_rows(
    trainer: RouterTrainer, tokens: torch.Tensor, cfg: RouterTrainConfig, progress: bool = True, held: torch.Tensor | None = None,
) -> RouterTrainResult:
    """AdamW on the trainer's router rows over `tokens` [steps * B, T]; step i reads rows [i*B, (i+1)*B).

    `held` [N, T]: validation rows, measured before training and every `eval_every` steps; the
    trainer ends holding the rows of the lowest measurement."""
    params = trainer.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # decay would pull the rows to zero, not to their init
    schedule = get_cosine_schedule_with_warmup(opt, min(cfg.warmup_steps, cfg.steps // 2), cfg.steps)
    result = RouterTrainResult([])
    best = None
    if held is not None:
        result.val_loss.append((0, trainer.next_token_loss(held, cfg.batch_size)))
        best = (result.val_loss[-1][1], 0, trainer.snapshot())
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
        if held is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            result.val_loss.append((step + 1, trainer.next_token_loss(held, cfg.batch_size)))
            if result.val_loss[-1][1] < best[0]:
                best = (result.val_loss[-1][1], step + 1, trainer.snapshot())
    if best is not None:
        result.best_step = best[1]
        trainer.restore(best[2])
    result.rows = [r.detach().clone() for r in trainer.rows["ffn"]]
    if "attention" in trainer.rows:
        result.attention_rows = [r.detach().clone() for r in trainer.rows["attention"]]
    return result
