"""Turn a batch of logits into next tokens: greedy, temperature, top-k, top-p, seeds, logprobs."""

from __future__ import annotations

import torch

from mergeserve.engine.sequence import SamplingParams

# Temperatures below this sample greedily: dividing by a denormal like 5e-324 overflows the logits
# to inf and the softmax to nan (vLLM draws the same line).
MIN_TEMPERATURE = 1e-5


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] -> logits with tokens outside top-k / the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already >= p
        drop[0] = False  # the likeliest token always stays, even for a top_p that rounds to 0 in float32
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] -> next tokens [B] and log-probabilities [B, V] of the unmodified distribution
    (None when no request asks for logprobs: the log-softmax over the vocabulary is not free)."""
    logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
    tokens = torch.argmax(logits, dim=-1)
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.temperature < MIN_TEMPERATURE:
            continue
        scaled = _filter(logits[row] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(scaled, dim=-1)
        tokens[row] = torch.multinomial(probs, 1, generator=gen)[0]
    return tokens, logprobs
