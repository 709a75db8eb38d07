"""Task-vector routing scores cos(-grad_theta L_base(x), tau_i), every prompt and expert in one pass.

The sign: fine-tuning on a domain moves theta down that domain's loss gradient, so the
expert trained on data like x is the one whose tau_i points along the descent direction
-grad L_base(x). With +grad (the formula as usually quoted) top-k picks the least related
experts: on the SmolLM2 zoo's held-out sets, cos(grad L, tau_i) was lowest for the
example's own expert in 36 of 36 examples, and -grad routes all 36 to their own expert.

theta: the attention and FFN projection matrices of every layer (q, k, v, o, gate, up,
down); tau_i = W_i - W_base on them. Embeddings, norms and head are left out (LoRA
experts leave them at the base's values). L_base(x) is the base model's mean next-token
loss on the prompt.

One forward and backward of the base (transformers' model over the pool's base tensors)
for the whole right-padded batch, with the loss summed over the prompts. For a linear
layer y = x W^T, prompt b's gradient is g_b = sum_t delta_t x_t^T over its tokens
(delta_t = dL/dy_t; padding and other prompts' tokens have no path to L_b, so their
delta is 0). Without forming g_b for every prompt:
  <g_b, tau> = sum_t delta_t . (tau x_t)
  |g_b|^2    = sum_{t,s} (delta_t . delta_s)(x_t . x_s)   (per-prompt Gram matrices)
and, once T^2 exceeds the weight's size, g_b itself [Dout, Din] is the smaller object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mergeserve.engine.layers import Batch, next_token_targets
from mergeserve.experts import Checkpoint
from mergeserve.experts.checkpoint import hf_module

PROJECTIONS = tuple(f"self_attn.{x}_proj" for x in "qkvo") + tuple(f"mlp.{x}_proj" for x in ("gate", "up", "down"))


def routed_keys(num_layers: int) -> list[str]:
    """Hugging Face names of the weight matrices task vectors are taken over."""
    return [f"model.layers.{n}.{p}.weight" for n in range(num_layers) for p in PROJECTIONS]


@dataclass(frozen=True)
class LowRankTau:
    """tau = b @ a: a LoRA expert's factors (scale folded into b)."""

    b: torch.Tensor  # [Dout, r]
    a: torch.Tensor  # [r, Din]


@dataclass(frozen=True)
class DenseTau:
    """tau = w - w0, never formed: every use is a difference of two uses of the pool's own tensors."""

    w: torch.Tensor  # the expert's [Dout, Din]
    w0: torch.Tensor  # the base's


Tau = LowRankTau | DenseTau


def tau(expert: Checkpoint, base: Checkpoint, key: str) -> Tau | None:
    """tau = W_expert - W_base for one weight; None where the expert shares the base's tensor."""
    if key in expert.factored:
        w = expert.factored[key]
        return LowRankTau(w.scaled_b(torch.float32), w.a.float())
    w, w0 = expert.tensors[key], base.tensors[key]
    return None if w.data_ptr() == w0.data_ptr() else DenseTau(w, w0)


def tau_sq_norm(t: Tau) -> torch.Tensor:
    if isinstance(t, LowRankTau):
        b, a = t.b.double(), t.a.double()
        return ((b.T @ b) * (a @ a.T)).sum()  # |b a|_F^2 = tr(a^T b^T b a)
    return (t.w.double() - t.w0.double()).pow(2).sum()  # once, at build


def tau_apply(x: torch.Tensor, t: Tau) -> torch.Tensor:
    """x tau^T, [..., Dout]."""
    if isinstance(t, LowRankTau):
        return F.linear(F.linear(x, t.a), t.b)
    return F.linear(x.to(t.w.dtype), t.w).float() - F.linear(x.to(t.w0.dtype), t.w0).float()


def tau_inner(g: torch.Tensor, t: Tau) -> torch.Tensor:
    """<g_b, tau> for g [B, Dout, Din], [B]."""
    if isinstance(t, LowRankTau):
        return ((g @ t.a.T) * t.b).sum((1, 2))  # <g, b a> = <g a^T, b>
    return (g * t.w).sum((1, 2)) - (g * t.w0).sum((1, 2))


def tau_norms(taus: dict[str, list[Tau | None]], num_experts: int) -> torch.Tensor:
    """|tau_i| over all routed weights, [E]."""
    sq = torch.zeros(num_experts, dtype=torch.float64)
    for per_expert in taus.values():
        for i, t in enumerate(per_expert):
            if t is not None:
                sq[i] += tau_sq_norm(t)
    return sq.sqrt().float()


def linear_grad_stats(x: torch.Tensor, delta: torch.Tensor, taus: list[Tau | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, Din], delta [B, T, Dout] -> <g_b, tau_i> [B, E] and |g_b|^2 [B] for one weight."""
    x, delta = x.float(), delta.float()  # the statistics in fp32 whatever the weights
    b, t, _ = x.shape
    zero = x.new_zeros(b)
    if t * t <= delta.shape[2] * x.shape[2]:
        dots = [zero if tau is None else (delta * tau_apply(x, tau)).sum((1, 2)) for tau in taus]
        gram_x, gram_d = x @ x.transpose(1, 2), delta @ delta.transpose(1, 2)  # [B, T, T]
        return torch.stack(dots, dim=1), (gram_x * gram_d).sum((1, 2))
    g = delta.transpose(1, 2) @ x  # [B, Dout, Din]: each prompt's own gradient
    dots = [zero if tau is None else tau_inner(g, tau) for tau in taus]
    return torch.stack(dots, dim=1), g.pow(2).sum((1, 2))


class TaskVectorScorer:
    """cos(-grad L_base(prompt), tau_i) for every prompt and expert; builds the base model and |tau_i| once."""

    def __init__(self, base: Checkpoint, experts: list[Checkpoint]) -> None:
        self.base, self.experts = base, experts
        self.model = hf_module(base).eval().requires_grad_(False)
        # Built once: factors cast to fp32, dense deltas as views of the pool's tensors.
        self.taus = {key: [tau(e, base, key) for e in experts] for key in routed_keys(base.config.num_hidden_layers)}
        self.tau_norms = tau_norms(self.taus, len(experts))  # [E]

    def scores(self, prompts: list[list[int]], spans: list[tuple[int, int] | None] | None = None) -> torch.Tensor:
        """[B, E]; spans: the tokens of each prompt whose loss counts (layers.next_token_targets)."""
        with torch.inference_mode(False), torch.enable_grad():  # the engine steps in inference mode
            dots = torch.zeros(len(prompts), len(self.experts))  # <g_b, tau_i>
            sq = torch.zeros(len(prompts))  # |g_b|^2

            def accumulate(key: str, x: torch.Tensor, delta: torch.Tensor) -> None:
                d, s = linear_grad_stats(x, delta, self.taus[key])
                dots.add_(d)
                sq.add_(s)

            backward_with_hooks(self.model, prompts, accumulate, spans)
        norms = sq.sqrt().unsqueeze(1) * self.tau_norms.unsqueeze(0)  # [B, E]
        return torch.where(norms > 0, -dots / norms.clamp_min(1e-30), 0.0)  # -: the descent direction


def backward_with_hooks(model: torch.nn.Module, prompts: list[list[int]], accumulate,
                        spans: list[tuple[int, int] | None] | None = None) -> None:
    """Backward of sum_b mean-token-loss_b (over spans[b]), calling accumulate(key, x, delta) for every routed linear."""
    keys = set(routed_keys(model.config.num_hidden_layers))
    handles = []

    def watch(key: str):
        def hook(_module, inputs, output):
            x = inputs[0].detach()
            output.register_hook(lambda grad: accumulate(key, x, grad.detach()))
        return hook

    for name, module in model.named_modules():
        if name + ".weight" in keys:
            handles.append(module.register_forward_hook(watch(name + ".weight")))
    try:
        sequence_loss(model, prompts, spans).backward()
    finally:
        for h in handles:
            h.remove()


def sequence_loss(model: torch.nn.Module, prompts: list[list[int]], spans: list[tuple[int, int] | None] | None = None) -> torch.Tensor:
    """sum over prompts of each one's mean next-token loss (over its span); right padding, causal attention only."""
    batch = Batch.right_padded(prompts)
    predicted, targets, row, counts = next_token_targets(batch, spans)
    embeds = model.get_input_embeddings()(batch.tokens).detach().requires_grad_()  # [B, T, D]: the graph starts here
    hidden = model.model(inputs_embeds=embeds, use_cache=False).last_hidden_state  # [B, T, D]
    logits = model.lm_head(hidden[:, :-1][predicted])  # [N, V]
    nll = F.cross_entropy(logits, targets, reduction="none")  # [N]
    return (nll / counts[row]).sum()
