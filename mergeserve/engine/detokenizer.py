"""Incremental detokenization: each new token's text, without decoding the whole output again.

Fast tokenizers use the tokenizers library's DecodeStream (it holds back a partial UTF-8
character until it is complete); others decode the output so far and diff it.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True) if self._backend is not None else None
        self._ids: list[int] = []
        self._text = ""

    def add(self, token_id: int) -> str:
        """The text `token_id` adds to the output ("" while a character is incomplete)."""
        if self._stream is not None:
            return self._stream.step(self._backend, token_id) or ""
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self._text = text[len(self._text):], text
        return new
