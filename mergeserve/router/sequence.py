"""MergeME sequence-level routers: one choice of experts per request, made from its prompt.

For prompt x, alpha = softmax(t * topk(score)) over the experts, zero outside the top k:
- perplexity: score_i = 1 / PPL(x | expert i), under expert i's own model (its decoder
  layers with the composition's shared embeddings, final norm and head);
- task_vector: score_i = cos(-grad_theta L_base(x), tau_i), the base's descent direction on x
  against expert i's task vector (see router/task_vector.py for the sign).
t is `router.scale` when the spec sets it (an inverse temperature: larger is sharper),
otherwise 1, the paper's form. A one-token prompt predicts nothing and gives every expert
the same score; ties go to the lower expert index.

The choice holds for every token of the request, prompt included. The engine asks for it
once, when the request is admitted (Engine._route_admitted), and keeps alpha [E] on the
Sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mergeserve.composition import Attention, ComposedModel, ExpertFFN, Layer
from mergeserve.engine.layers import Batch
from mergeserve.engine.model import Transformer
from mergeserve.experts import Checkpoint
from mergeserve.spec import CompositionSpec

HEAD_CHUNK = 1024  # tokens per [chunk, V] logits block when scoring


@dataclass(eq=False)
class SequenceRouter:
    kind: str  # "perplexity" | "task_vector"
    attention: str  # "separate" | "merged"
    top_k: int
    temperature: float  # multiplies the scores before the softmax
    base: Checkpoint  # the pool's own; task_vector differentiates the base model
    experts: list[Checkpoint]  # the pool's own, in expert order
    max_batch_tokens: int = 1024  # padded tokens per scoring forward (bounds activation memory)
    _state: dict = field(default_factory=dict, repr=False)  # lazily built helpers (task_vector)

    @property
    def separate(self) -> bool:
        return self.attention == "separate"

    def scores(self, composed: ComposedModel, prompts: list[list[int]]) -> torch.Tensor:
        """score_i of every prompt and expert, [B, E], in batches of at most `max_batch_tokens`."""
        out = torch.empty(len(prompts), composed.num_experts)
        for group in padded_groups([len(p) for p in prompts], self.max_batch_tokens):
            chunk = [prompts[i] for i in group]
            if self.kind == "perplexity":
                out[group] = inverse_perplexities(composed, chunk)
            else:
                from mergeserve.router.task_vector import task_vector_scores

                out[group] = task_vector_scores(self, chunk)
        return out

    def route(
        self, composed: ComposedModel, prompts: list[list[int]], bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Routing weights alpha of every prompt, [B, E]: at most k nonzero entries per row, summing to 1.

        bias [B, E], added to the scores before the top k (a request's expert_bias); -inf
        excludes an expert, so a row allowing fewer than k experts has fewer nonzero entries.
        """
        scores = self.scores(composed, prompts)
        return top_k_softmax(scores if bias is None else scores + bias, self.top_k, self.temperature)


def attach_sequence_router(
    composed: ComposedModel, spec: CompositionSpec, base: Checkpoint, experts: list[Checkpoint],
) -> None:
    """Give every layer its experts' own decoder layers and the composition its sequence router."""
    for n, layer in enumerate(composed.layers):
        layer.expert_layers = [own_layer(e, n) for e in experts]
        layer.router = None
    r = spec.router
    composed.sequence_router = SequenceRouter(
        kind=r.kind, attention=r.attention, top_k=composed.top_k,
        temperature=r.scale if "scale" in r.model_fields_set else 1.0, base=base, experts=experts,
    )
    if r.kind == "task_vector":  # at build time, off the request path
        from mergeserve.router.task_vector import prepare

        prepare(composed.sequence_router)


def own_layer(expert: Checkpoint, n: int) -> Layer:
    """Decoder layer n of `expert` as a dense Layer of the pool's tensors (a LoRA expert's as
    factors over the base: no copy either way)."""
    t, w, p = expert.stored, expert.weight, f"model.layers.{n}."
    attn = Attention(
        *(w(p + f"self_attn.{x}_proj.weight") for x in "qkvo"),
        *(t.get(p + f"self_attn.{x}_proj.bias") for x in "qkv"),
    )
    ffn = ExpertFFN(*(w(p + f"mlp.{x}_proj.weight") for x in ("gate", "up", "down")))
    return Layer(t[p + "input_layernorm.weight"], attn, t[p + "post_attention_layernorm.weight"], [ffn])


def expert_model(composed: ComposedModel, e: int) -> ComposedModel:
    """Expert e's own dense model inside `composed`: its layers, the shared embeddings and head."""
    return ComposedModel(
        name=f"{composed.name}:{composed.expert_names[e]}", config=composed.config, tokenizer=composed.tokenizer,
        embed=composed.embed, norm=composed.norm, lm_head=composed.lm_head,
        layers=[layer.expert_layers[e] for layer in composed.layers], expert_names=[composed.expert_names[e]],
        top_k=1,
    )


def top_k_softmax(scores: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """alpha [B, E] = softmax(temperature * top-k scores) on the k best experts, 0 elsewhere."""
    top, ids = torch.sort(scores, dim=1, descending=True, stable=True)  # stable: ties to the lower index
    weights = torch.softmax(temperature * top[:, :k], dim=1)  # [B, k]
    return torch.zeros_like(scores).scatter_(1, ids[:, :k], weights)


def padded_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length so each right-padded group has at most `max_tokens` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] * (len(groups[-1]) + 1) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@torch.inference_mode()
def inverse_perplexities(composed: ComposedModel, prompts: list[list[int]]) -> torch.Tensor:
    """1 / PPL(prompt | expert e) for every prompt and expert, [B, E]: one padded forward per expert."""

    batch = Batch.right_padded(prompts)
    predicted, targets, row, counts = next_token_targets(batch)
    out = []
    for e in range(composed.num_experts):
        model = Transformer(expert_model(composed, e), max_len=batch.tokens.shape[1])
        hidden = model(batch)[:, :-1][predicted]  # [N, D]
        nll = token_nll(hidden, composed.lm_head, targets)  # [N]
        mean_nll = torch.zeros(len(prompts)).index_add_(0, row, nll) / counts  # [B]
        out.append(torch.exp(-mean_nll))
    return torch.stack(out, dim=1)


def next_token_targets(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of a right-padded Batch: which positions predict a real token [B, T-1] (position t predicts
    token t+1), those tokens [N], the prompt of each [N], and predictions per prompt [B] (at least 1)."""
    predicted = batch.real()[:, 1:]
    targets = batch.tokens[:, 1:][predicted]
    row = torch.arange(len(predicted)).unsqueeze(1).expand_as(predicted)[predicted]
    counts = torch.bincount(row, minlength=len(predicted)).clamp_min(1)
    return predicted, targets, row, counts


def token_nll(hidden: torch.Tensor, lm_head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) of each token, [N], computing the [N, V] logits a chunk at a time."""
    out = []
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = F.linear(hidden[start:start + HEAD_CHUNK], lm_head).float()  # [chunk, V]
        out.append(F.cross_entropy(logits, targets[start:start + HEAD_CHUNK], reduction="none"))
    return torch.cat(out) if out else hidden.new_zeros(0)
