"""`mergeserve train-router`: train only the gate rows of an MoE composition on unlabeled text.

The composition runs as transformers' MixtralForCausalLM built in memory from the export
mapping (mixtral.py): its router is ours (softmax over all experts -> top-k -> renormalise),
and it computes the next-token loss and the Switch/Mixtral load-balancing loss
`N * sum_i f_i * P_i` itself. Every tensor but the L gate rows [E, D] is frozen; the rows
start from the spec's own router (hidden, random, or a learned file to continue from).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import MixtralForCausalLM, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup
from transformers.initialization import no_init_weights

from mergeserve.composition import ComposedModel, dense
from mergeserve.experts import ExpertPool
from mergeserve.export.mixtral import check_mixtral, mixtral_config, mixtral_tensors
from mergeserve.merge import build
from mergeserve.router.learned import save_rows
from mergeserve.spec import SpecError, load_composition
from mergeserve.zoo.splits import pack, read_jsonl

DATA_SUFFIXES = (".jsonl", ".txt")
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
    """Build the spec's composition, train its gate rows on `data`, write them to `out`."""
    spec = load_composition(spec_path)
    if not spec.is_moe or len(spec.experts) < 2:
        raise SpecError(f"{spec_path}: train-router needs an MoE spec (method btx or mergeme) with at least two experts")
    if spec.router.top_k < 2:
        raise SpecError(f"{spec_path}: router.top_k: {NO_GRADIENT_AT_TOP_1}")
    files = data_files(data)
    texts = [read_texts(f) for f in files]  # bad data fails here, before the slow build
    composed = build(spec, ExpertPool())
    model = mixtral_for_training(composed, cfg.alpha)
    tokens = pack_files(texts, composed.tokenizer, cfg.steps * cfg.batch_size, cfg.seq_len, cfg.seed)
    result = train_rows(model, tokens, cfg, progress)
    save_rows(out, result.rows, composed.expert_names, {
        "base": spec.base, "composition": spec.name, "init": spec.router.kind, "top_k": composed.top_k,
        "hidden_size": composed.config.hidden_size, "num_layers": len(composed.layers),
        "data": [str(f) for f in files], "tokens": int(tokens.numel()), **asdict(cfg),
        "lm_loss_first": result.lm_loss[0], "lm_loss_final": result.final_lm_loss,
        "aux_loss_first": result.aux_loss[0], "aux_loss_final": result.final_aux_loss,
    })
    return result


def check_trainable(composed: ComposedModel) -> None:
    """Raise ValueError for what the Mixtral training forward cannot compute."""
    if any(b is not None for layer in composed.layers for b in (layer.attn.q_bias, layer.attn.k_bias, layer.attn.v_bias)):
        raise ValueError(
            f"composition {composed.name!r}: train-router runs the model as transformers' Mixtral, which has no "
            f"attention biases; its {composed.config.model_type} base has them (Qwen2). Llama and Mistral bases only"
        )
    if composed.top_k < 2:
        raise ValueError(f"composition {composed.name!r}: {NO_GRADIENT_AT_TOP_1}")
    try:
        check_mixtral(composed)
    except ValueError as e:
        raise ValueError(f"train-router runs the composition as transformers' Mixtral: {e}") from None


def mixtral_for_training(composed: ComposedModel, alpha: float) -> MixtralForCausalLM:
    """The composition as a Mixtral model whose only trainable parameters are the gate rows.

    Frozen tensors are the composition's own (no copy) except the experts, which Mixtral
    stores fused; the gate rows are copies, so training leaves the composition untouched.
    """
    check_trainable(composed)
    config = mixtral_config(composed.config, composed.num_experts, composed.top_k, tied=False)
    config.router_aux_loss_coef, config.router_jitter_noise = alpha, 0.0
    with no_init_weights():  # every parameter is assigned below; skip the random init
        model = MixtralForCausalLM(config)
    model.load_state_dict(_fused_state_dict(composed), strict=True, assign=True)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".mlp.gate.weight"))
    return model.eval()  # no dropout: train the forward that is served


def _fused_state_dict(composed: ComposedModel) -> dict[str, torch.Tensor]:
    """mixtral_tensors' hub layout (per-expert w1/w2/w3) in the layout transformers' Mixtral module holds."""
    hub = mixtral_tensors(composed, tied=False)
    out = {k: t for k, t in hub.items() if ".block_sparse_moe." not in k}
    for n, layer in enumerate(composed.layers):
        p, e = f"model.layers.{n}.", range(len(layer.experts))
        out[p + "mlp.gate.weight"] = layer.router.detach().clone()
        w = {x: [dense(hub[p + f"block_sparse_moe.experts.{i}.{x}.weight"]) for i in e] for x in ("w1", "w2", "w3")}
        out[p + "mlp.experts.gate_up_proj"] = torch.stack([torch.cat(gu) for gu in zip(w["w1"], w["w3"])])  # [E, 2I, D]
        out[p + "mlp.experts.down_proj"] = torch.stack(w["w2"])  # [E, D, I]
    return out


def gate_rows(model: MixtralForCausalLM) -> list[torch.Tensor]:
    return [layer.mlp.gate.weight for layer in model.model.layers]


def losses(model: MixtralForCausalLM, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Total, next-token and load-balancing loss of `batch` [B, T]; total = lm + alpha * aux."""
    out = model(input_ids=batch, labels=batch, output_router_logits=True, use_cache=False)
    return out.loss, out.loss - model.router_aux_loss_coef * out.aux_loss, out.aux_loss


def train_rows(model: MixtralForCausalLM, tokens: torch.Tensor, cfg: RouterTrainConfig, progress: bool = True) -> RouterTrainResult:
    """AdamW on the model's gate rows over `tokens` [steps * B, T]; step i reads rows [i*B, (i+1)*B)."""
    rows = gate_rows(model)
    opt = torch.optim.AdamW(rows, lr=cfg.lr, weight_decay=0.0)  # decay would pull the rows to zero, not to their init
    schedule = get_cosine_schedule_with_warmup(opt, min(cfg.warmup_steps, cfg.steps // 2), cfg.steps)
    result = RouterTrainResult(rows)
    bar = tqdm(range(cfg.steps), desc="router", unit="step", disable=not progress)
    for step in bar:
        total, lm, aux = losses(model, tokens[step * cfg.batch_size:(step + 1) * cfg.batch_size])
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        schedule.step()
        result.lm_loss.append(lm.item())
        result.aux_loss.append(aux.item())
        bar.set_postfix(loss=f"{lm.item():.3f}", balance=f"{aux.item():.3f}")
    result.rows = [r.detach().clone() for r in rows]
    return result


def data_files(paths: list[str | Path]) -> list[Path]:
    """The .jsonl and .txt files named, or found (recursively) in the folders named."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in DATA_SUFFIXES and f.is_file())
            if not found:
                raise ValueError(f"{p}: no .jsonl or .txt files in this folder")
            files += found
        elif not p.is_file():
            raise FileNotFoundError(f"{p}: no such file or folder")
        elif p.suffix not in DATA_SUFFIXES:
            raise ValueError(f"{p}: calibration data must be .jsonl (one {{\"text\": ...}} per line) or .txt")
        else:
            files.append(p)
    return files


def read_texts(path: Path) -> list[str]:
    """A .jsonl file's `text` fields, or a .txt file as one document."""
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    try:
        examples = read_jsonl(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON lines: {e}") from e
    if not examples or not all(isinstance(e, dict) and isinstance(e.get("text"), str) for e in examples):
        raise ValueError(f"{path}: every line must be a JSON object with a string \"text\" field")
    return [e["text"] for e in examples]


def pack_files(texts: list[list[str]], tokenizer: PreTrainedTokenizerBase, rows: int, seq_len: int, seed: int) -> torch.Tensor:
    """`rows` sequences [rows, T] from the texts of each file, the files taking turns so every batch mixes them evenly."""
    per_file = -(-rows // len(texts))
    packed = [pack(t, tokenizer, per_file, seq_len, seed) for t in texts]  # F x [per_file, T]
    return torch.stack(packed, dim=1).reshape(-1, seq_len)[:rows]  # row j from file j % F
