"""What a sequence router reads of a chat request: the user's message, not the template around it.

A short question templated for SmolLM2 is mostly template (a system prompt, role markers), and a
router that scores every prompt token chooses on the template: the same experts for every short
chat (measured: benchmarks/short_prompt_routing.py). The server hands the engine the span of the
last user message's tokens (SamplingParams.route_span), found by the fast tokenizer's offsets.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def content_tokens(tokenizer: PreTrainedTokenizerBase, text: str, content: str) -> tuple[list[int], tuple[int, int] | None]:
    """text's tokens, and the span of those that cover the last occurrence of `content` in it
    (by the fast tokenizer's character offsets; None without them, or where content is not in text)."""
    needle = content.strip()
    at = text.rfind(needle) if needle else -1
    if at < 0 or not getattr(tokenizer, "is_fast", False):
        return tokenizer.encode(text, add_special_tokens=False), None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    end_char = at + len(needle)
    covering = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end_char and b > at]
    span = (covering[0], covering[-1] + 1) if covering else None
    return encoded["input_ids"], span
