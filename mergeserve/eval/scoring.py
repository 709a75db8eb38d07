"""Scoring texts and math problems with one engine: the measurements every row is made of.

Every row scores the same tokens: each example is tokenized without special tokens and cut to
`max_tokens` tokens; its first N = `route_tokens` tokens are context only (a router, if the row
has one, chooses from them) and the tokens at positions >= N are scored, each conditioned on all
before it. An example of at most N tokens scores nothing (the results count these, `unscored`).

Math: greedy generation from `Question: <question>\\n` (one `Engine.generate` call for all
problems), cut after the first `Answer:` line, exact match of its number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from mergeserve.engine.engine import Engine
from mergeserve.engine.coordinator import Mixture, generate_mixed
from mergeserve.engine.sequence import SamplingParams
from mergeserve.eval.metrics import MATH_PROMPT, LossSum, cut_at_answer_line, extract_answer, loss_sum, matches, tokenize
from mergeserve.eval.results import MathSample, MathScore, MixedLoss
from mergeserve.spec import EngineConfig

# Generation stops early at a blank line or a new question; the answer line is cut afterwards.
MATH_STOP = ("\n\n", "\nQuestion:")


@dataclass(frozen=True)
class EvalSettings:
    # Counts sized so a table of ~10 models takes under 30 minutes on 2 cores (~2 min a model):
    # 48 loss examples per domain are also what the zoo's model cards report.
    max_tokens: int = 256  # tokens kept per example for the loss
    per_domain: int | None = 48  # loss examples per domain: the first N of each file (None: all)
    mixed_per_domain: int = 8
    math_examples: int = 50  # the first N held-out math problems
    max_new_tokens: int = 160
    seed: int = 0  # the mixed set's sample and order
    chunk: int = 32  # sequences per `Engine.score` call (the progress bar's step)
    max_num_seqs: int = 32  # concurrent generations
    max_batch_tokens: int = 4096  # padded tokens per scoring forward
    route_tokens: int = 32  # each text's first N tokens are context only (routers choose from them); the rest are scored

    def __post_init__(self) -> None:
        if self.route_tokens < 1:
            raise ValueError("route_tokens must be at least 1: the first token has nothing to be scored against")


def engine_config(settings: EvalSettings) -> EngineConfig:
    return EngineConfig(
        max_num_seqs=settings.max_num_seqs, max_model_len=max(512, settings.max_tokens),
        max_prefill_tokens=1024,
    )


def token_logprobs(
    engine: Engine, ids: list[list[int]], context: list[int], settings: EvalSettings, desc: str,
) -> list[torch.Tensor | None]:
    """Per token list, the log-probability of each token at a position >= its `context` (>= 1),
    given every token before it; None where no token is. A mixture router reads the first
    `route_tokens` tokens."""
    keep = [i for i, x in enumerate(ids) if len(x) > context[i]]
    out: list[torch.Tensor | None] = [None] * len(ids)
    for start in tqdm(range(0, len(keep), settings.chunk), desc=desc, unit="chunk", leave=False):
        batch = keep[start:start + settings.chunk]
        for i, lp in zip(batch, engine.score([ids[i] for i in batch], settings.max_batch_tokens, settings.route_tokens)):
            out[i] = lp[context[i] - 1:]  # lp[t - 1] scores token t
    return out


def score_examples(engine: Engine, texts: list[str], settings: EvalSettings, desc: str) -> list[LossSum]:
    """One LossSum per text: its tokens from position `route_tokens` on (a shorter text scores nothing)."""
    ids = tokenize(engine.tokenizer, texts, settings.max_tokens)
    lps = token_logprobs(engine, ids, [settings.route_tokens] * len(ids), settings, desc)
    return [LossSum() if lp is None else loss_sum([lp]) for lp in lps]


def math_accuracy(
    engine: Engine, problems: list[dict], settings: EvalSettings, mixes: list[Mixture | None] | None = None,
) -> MathScore:
    """`mixes`: per problem, the other engines (and weights) its tokens are drawn from with this one's."""
    if not problems:
        return MathScore(float("nan"), 0, 0, generated_tokens=0, samples=[])
    prompts = [engine.tokenizer(MATH_PROMPT.format(question=p["question"]), add_special_tokens=False).input_ids
               for p in problems]
    params = SamplingParams(max_tokens=settings.max_new_tokens, temperature=0, stop=MATH_STOP)
    outputs = generate_mixed(engine, prompts, params, mixes) if mixes else engine.generate(prompts, params)
    samples = []
    for problem, out in zip(problems, outputs):
        text = cut_at_answer_line(engine.tokenizer.decode(out, skip_special_tokens=True))
        got = extract_answer(text)
        samples.append(MathSample(problem["answer"], got, matches(got, problem["answer"]), text))
    return math_score(samples, sum(map(len, outputs)))


def math_score(samples: list[MathSample], generated_tokens: int) -> MathScore:
    """Accuracy and format share over `samples` (at least one)."""
    n = len(samples)
    correct = sum(s.correct for s in samples)
    # `formatted`: outputs that end in an `Answer: N` line at all, the math expert's format.
    formatted = sum(s.extracted is not None for s in samples)
    return MathScore(correct / n, correct, n, formatted / n, generated_tokens, samples)


def mixed_loss(mixed: list[tuple[str, dict]], sums: list[LossSum]) -> MixedLoss:
    """The mixed set's loss in total and per source domain, from each example's LossSum."""
    by_domain: dict[str, LossSum] = {}
    for (domain, _), s in zip(mixed, sums):
        by_domain[domain] = by_domain.get(domain, LossSum()) + s
    return MixedLoss(sum(sums, LossSum()), by_domain)
