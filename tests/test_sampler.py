"""The sampler draws from the distribution it claims to, after temperature, top-k and top-p."""

from __future__ import annotations

import torch

from mergeserve.engine.sampler import sample
from mergeserve.engine.sequence import SamplingParams

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def frequencies(params: SamplingParams, draws: int = 4000) -> torch.Tensor:
    logits = LOGITS.expand(draws, -1).clone()
    gens = [torch.Generator().manual_seed(i) for i in range(draws)]
    tokens, _ = sample(logits, [params] * draws, gens)
    return torch.bincount(tokens, minlength=len(LOGITS)).float() / draws


def test_temperature_sampling_matches_the_softmax():
    for temperature in (1.0, 0.5, 2.0):
        expected = torch.softmax(LOGITS / temperature, dim=-1)
        got = frequencies(SamplingParams(temperature=temperature))
        assert (got - expected).abs().sum() / 2 < 0.03, (temperature, got, expected)


def test_top_k_and_top_p_renormalise_what_they_keep():
    probs = torch.softmax(LOGITS, dim=-1)  # about [.55, .20, .12, .07, .03, .003]
    top2 = frequencies(SamplingParams(top_k=2))
    torch.testing.assert_close(top2[:2], probs[:2] / probs[:2].sum(), atol=0.03, rtol=0)
    assert top2[2:].sum() == 0
    # top_p=0.8 keeps the smallest prefix whose mass reaches 0.8: the first three tokens.
    nucleus = frequencies(SamplingParams(top_p=0.8))
    torch.testing.assert_close(nucleus[:3], probs[:3] / probs[:3].sum(), atol=0.03, rtol=0)
    assert nucleus[3:].sum() == 0


def test_logprobs_are_those_of_the_model_not_of_the_sampling_distribution():
    _, logprobs = sample(LOGITS.unsqueeze(0), [SamplingParams(temperature=0.3, top_k=1, logprobs=0)], [None])
    torch.testing.assert_close(logprobs[0], torch.log_softmax(LOGITS, dim=-1))


def test_no_logprobs_are_computed_when_no_request_asks_for_them():
    _, logprobs = sample(LOGITS.unsqueeze(0), [SamplingParams(temperature=0)], [None])
    assert logprobs is None


def test_tiny_top_p_and_temperature_fall_back_to_the_likeliest_token():
    # Found by fuzzing the server: top_p=5e-324 rounds to 0 in float32 and dropped every token;
    # temperature=5e-324 overflowed the logits; both made multinomial raise.
    for params in (SamplingParams(top_p=5e-324), SamplingParams(temperature=5e-324), SamplingParams(temperature=1e-40)):
        tokens, _ = sample(LOGITS.unsqueeze(0), [params], [torch.Generator().manual_seed(0)])
        assert tokens.tolist() == [0], params
