"""Loss and exact-match metrics, free of models: token log-probs in, numbers out."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

# How a math problem is put to the model: the training data's layout up to the worked steps,
# `Question: <question>\n<steps>\nAnswer: <n>`, so the model continues with the steps.
MATH_PROMPT = "Question: {question}\n"
ANSWER = "Answer:"
_NUMBER = re.compile(r"^\s*\$?\s*(-?(?:\d[\d,]*)?(?:\.\d+)?)")


@dataclass
class LossSum:
    """Summed negative log-likelihood over a count of scored tokens (token-weighted averages add up)."""

    nll: float = 0.0
    tokens: int = 0
    examples: int = 0

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    def __add__(self, other: LossSum) -> LossSum:
        return LossSum(self.nll + other.nll, self.tokens + other.tokens, self.examples + other.examples)

    def as_dict(self) -> dict[str, float | int]:
        return {"loss": self.loss, "nll": self.nll, "tokens": self.tokens, "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict) -> LossSum:
        return cls(d["nll"], d["tokens"], d["examples"])


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Each text without special tokens, cut to its first `max_tokens` tokens."""
    return [tokenizer(t, add_special_tokens=False).input_ids[:max_tokens] for t in texts]


def loss_sum(logprobs: list[torch.Tensor]) -> LossSum:
    """Sum of -log p over every scored token (a sequence's tokens after its context)."""
    nll = sum(-float(lp.double().sum()) for lp in logprobs)
    return LossSum(nll, sum(lp.numel() for lp in logprobs), len(logprobs))


def cut_at_answer_line(text: str) -> str:
    """The text up to the end of the first line holding `Answer:` (all of it when there is none)."""
    at = text.find(ANSWER)
    if at < 0:
        return text
    end = text.find("\n", at)
    return text if end < 0 else text[:end]


def normalise_number(text: str) -> str | None:
    """`1,234` -> `1234`, `12.0` -> `12`, `-0` -> `0`; None when `text` is no number."""
    text = text.replace(",", "").strip()
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", text):
        return None
    if "." in text:
        whole, frac = text.split(".")
        frac = frac.rstrip("0")
        text = f"{whole or '0'}.{frac}" if frac else (whole or "0")
    if text.lstrip("-").lstrip("0") == "":
        return "0"
    negative, digits = text.startswith("-"), text.lstrip("-")
    digits = digits.lstrip("0") or "0"
    if digits.startswith("."):
        digits = "0" + digits
    return ("-" if negative else "") + digits


def extract_answer(text: str) -> str | None:
    """The number after the last `Answer:` in `text`, normalised; None when there is none."""
    at = text.rfind(ANSWER)
    if at < 0:
        return None
    m = _NUMBER.match(text[at + len(ANSWER):])
    if not m or not any(c.isdigit() for c in m.group(1)):
        return None
    return normalise_number(m.group(1).rstrip(".,"))


def matches(extracted: str | None, answer: str) -> bool:
    return extracted is not None and extracted == normalise_number(answer)
