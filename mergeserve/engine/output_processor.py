"""OutputProcessor: from sampled tokens to what a client reads.

It detokenizes each request's tokens, finds its stop (EOS, stop tokens, stop strings,
length), holds back text that may still become a stop string or a whole UTF-8 character,
and builds the `RequestOutput`s and `TokenLogprob`s. It knows no tensors beyond one row of
logprobs, and frees nothing: ending a request is the engine's.
"""

from __future__ import annotations

import torch

from mergeserve.composition import ComposedModel
from mergeserve.engine.detokenizer import Detokenizer
from mergeserve.engine.sequence import RequestOutput, Sequence, TokenLogprob


class OutputProcessor:
    def __init__(self, composed: ComposedModel, max_model_len: int):
        self.tokenizer = composed.tokenizer
        self.eos_ids = _eos_ids(composed)
        self.max_model_len = max_model_len

    def track(self, seq: Sequence) -> None:
        """A request is admitted: its text starts here."""
        seq.detokenizer = Detokenizer(self.tokenizer)

    def add_token(self, seq: Sequence, token: int, logprobs: torch.Tensor | None) -> tuple[list[TokenLogprob], str | None]:
        """A sampled token joins the request (logprobs: its row, [V], when sampling computed them);
        returns the token's logprobs to report and why the request stops now (None: it goes on)."""
        seq.output_ids.append(token)
        top = seq.params.logprobs
        lp = [self.logprob(token, logprobs, top)] if logprobs is not None and top is not None else []
        return lp, self._check_stop(seq, token)

    def token_output(self, seq: Sequence, token: int, logprobs: list[TokenLogprob]) -> RequestOutput:
        """The output of one sampled token; the first carries the prompt's logprobs."""
        out = self.output(seq, [token], logprobs)
        if len(seq.output_ids) == 1:
            out.prompt_logprobs = seq.prompt_logprobs
        return out

    def add_prompt_logprobs(self, seq: Sequence, targets: list[int], logits: torch.Tensor | None) -> None:
        """Logprobs of the prompt tokens a prefill chunk predicts (logits [len(targets), V]; None when none)."""
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]  # nothing predicts the first token
        if targets:
            logprobs = torch.log_softmax(logits, dim=-1)  # [m, V]
            top = seq.params.prompt_logprobs
            seq.prompt_logprobs += [self.logprob(t, lp, top) for t, lp in zip(targets, logprobs)]

    def _check_stop(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        stopped_by_token = (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids
        if not stopped_by_token:
            seq.text += seq.detokenizer.add(token)
        if p.stop:
            hits = [i for s in p.stop if (i := seq.text.find(s, max(0, seq.emitted - len(s)))) >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                return "stop"
        if stopped_by_token:
            return "stop"
        max_len = seq.group.max_len if seq.group is not None else self.max_model_len
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= max_len:
            return "length"
        return None

    def output(self, seq: Sequence, new_ids: list[int], logprobs: list[TokenLogprob]) -> RequestOutput:
        end = len(seq.text)
        if seq.finish_reason is None:
            # Hold back text that may still turn out to be the start of a stop string,
            # and a trailing partial UTF-8 character.
            end -= max((len(s) - 1 for s in seq.params.stop), default=0)
            while end > seq.emitted and seq.text[end - 1] == "\ufffd":
                end -= 1
        new_text = seq.text[seq.emitted:max(end, seq.emitted)]
        seq.emitted += len(new_text)
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=new_ids, new_text=new_text, logprobs=logprobs,
            finished=seq.finish_reason is not None, finish_reason=seq.finish_reason,
            num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=len(seq.output_ids),
            experts=seq.expert_shares() if seq.finish_reason is not None else None,
        )

    def logprob(self, token: int, logprobs: torch.Tensor, top: int) -> TokenLogprob:
        alts = torch.topk(logprobs, top) if top > 0 else None
        return TokenLogprob(
            token_id=token, token=self.tokenizer.decode([token]), logprob=float(logprobs[token]),
            top=tuple(
                (int(i), self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(alts.values, alts.indices)
            ) if alts is not None else (),
        )


def _eos_ids(composed: ComposedModel) -> set[int]:
    ids = composed.config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if composed.tokenizer.eos_token_id is not None:
        ids.add(composed.tokenizer.eos_token_id)
    return ids
