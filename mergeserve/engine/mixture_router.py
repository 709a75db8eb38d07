"""Scoring for MergeME mixture routers (composition.MixtureRouting): alpha [B, E] per prompt.

One Engine owns one MixtureRouter and calls it once per request, when the request is
admitted (Engine._route_admitted); the choice holds for every token of the request, prompt
included. A one-token prompt predicts nothing and gives every expert the same score; ties
go to the lower expert index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergeserve.composition import ComposedModel
from mergeserve.engine.layers import Batch, next_token_targets, padded_groups
from mergeserve.engine.model import Transformer
from mergeserve.engine.task_vector import TaskVectorScorer

HEAD_CHUNK = 1024  # tokens per [chunk, V] logits block when scoring


class MixtureRouter:
    def __init__(self, composed: ComposedModel, max_batch_tokens: int = 1024) -> None:
        """Builds what scoring needs up front (the task-vector base model), off the request path.

        max_batch_tokens: padded tokens per scoring forward (bounds activation memory).
        """
        self.composed = composed
        self.routing = composed.mixture_routing
        self.max_batch_tokens = max_batch_tokens
        r = self.routing
        self.task_vector = TaskVectorScorer(r.base, r.experts) if r.kind == "task_vector" else None

    def scores(self, prompts: list[list[int]], spans: list[tuple[int, int] | None] | None = None) -> torch.Tensor:
        """score_i of every prompt and expert, [B, E], in batches of at most `max_batch_tokens`.
        spans: per prompt, the tokens [start, end) it is scored on (a chat's user content); None: all."""
        spans = spans or [None] * len(prompts)
        out = torch.empty(len(prompts), self.composed.num_experts)
        for group in padded_groups([len(p) for p in prompts], self.max_batch_tokens):
            chunk, chunk_spans = [prompts[i] for i in group], [spans[i] for i in group]
            if self.task_vector is not None:
                out[group] = self.task_vector.scores(chunk, chunk_spans)
            else:
                out[group] = mean_log_likelihoods(self.composed, chunk, chunk_spans)
        if self.task_vector is None and self.routing.score == "inverse_perplexity":
            out = out.exp()  # 1 / PPL
        return out

    def weights(self, prompts: list[list[int]], bias: torch.Tensor | None = None,
                spans: list[tuple[int, int] | None] | None = None) -> torch.Tensor:
        """Routing weights alpha of every prompt, [B, E]: at most k nonzero entries per row, summing to 1.

        bias [B, E], added to the scores before the top k (a request's expert_bias); -inf
        excludes an expert, so a row allowing fewer than k experts has fewer nonzero entries.
        """
        scores = self.scores(prompts, spans)
        r = self.routing
        if r.offsets is not None:
            scores = scores + r.offsets
        return top_k_softmax(scores if bias is None else scores + bias, r.top_k, r.temperature, r.min_margin)


def expert_model(composed: ComposedModel, e: int) -> ComposedModel:
    """Expert e's own dense model inside `composed`: its layers, the shared embeddings and head."""
    return ComposedModel(
        name=f"{composed.name}:{composed.expert_names[e]}", config=composed.config, tokenizer=composed.tokenizer,
        embed=composed.embed, norm=composed.norm, lm_head=composed.lm_head,
        layers=[layer.expert_layers[e] for layer in composed.layers], expert_names=[composed.expert_names[e]],
        top_k=1,
    )


def top_k_softmax(scores: torch.Tensor, k: int, temperature: float = 1.0, min_margin: float = 0.0) -> torch.Tensor:
    """alpha [B, E] = softmax(temperature * top-k scores) on the k best experts, 0 elsewhere. A row
    whose two best weigh within `min_margin` of each other in the softmax over every expert (an
    unsure router) takes that softmax instead: every expert mixed."""
    top, ids = torch.sort(scores, dim=1, descending=True, stable=True)  # stable: ties to the lower index
    weights = torch.softmax(temperature * top[:, :k], dim=1)  # [B, k]
    alpha = torch.zeros_like(scores).scatter_(1, ids[:, :k], weights)
    if min_margin <= 0 or scores.shape[1] < 2:
        return alpha
    every = torch.softmax(temperature * scores, dim=1)  # [B, E]
    best = torch.topk(every, 2, dim=1).values  # [B, 2]
    unsure = (best[:, 0] - best[:, 1]) < min_margin  # [B]
    return torch.where(unsure.unsqueeze(1), every, alpha)


@torch.inference_mode()
def mean_log_likelihoods(composed: ComposedModel, prompts: list[list[int]],
                         spans: list[tuple[int, int] | None] | None = None) -> torch.Tensor:
    """log(1 / PPL(prompt | expert e)), the mean log-probability per token, for every prompt and
    expert, [B, E], over each prompt's span of tokens (layers.next_token_targets): one padded
    forward per expert."""
    batch = Batch.right_padded(prompts)
    predicted, targets, row, counts = next_token_targets(batch, spans)
    out = []
    for e in range(composed.num_experts):
        model = Transformer(expert_model(composed, e), max_len=batch.tokens.shape[1])
        hidden = model(batch)[:, :-1][predicted]  # [N, D]
        nll = token_nll(hidden, composed.lm_head, targets)  # [N]
        mean_nll = torch.zeros(len(prompts)).index_add_(0, row, nll) / counts  # [B]
        out.append(-mean_nll)
    return torch.stack(out, dim=1)


def token_nll(hidden: torch.Tensor, lm_head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) of each token, [N], computing the [N, V] logits a chunk at a time."""
    out = []
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = F.linear(hidden[start:start + HEAD_CHUNK].to(lm_head.dtype), lm_head).float()  # [chunk, V]; bf16 weights take bf16 input
        out.append(F.cross_entropy(logits, targets[start:start + HEAD_CHUNK], reduction="none"))
    return torch.cat(out) if out else hidden.new_zeros(0)
