"""The state of one request decoded by several engines in lockstep (engine/coordinator.py makes it):
its sequences, one per engine, and the next-token distributions they have contributed.

The request's own engine (the lead) samples and emits its outputs; every other member runs a
follower sequence of the same request that only contributes its distribution at each position.
A member that has contributed waits (the scheduler skips it) until the lead has drawn the token.
Groups are touched only on the executor thread, which steps every engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

# This module sits below sequence.py and engine.py, which import it: it names the sequences
# it groups only by what it needs of them.


class Member(Protocol):
    """A sequence in a group (sequence.Sequence): the tokens it has decoded."""

    output_ids: list[int]


def mix_logprobs(log_weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """log sum_i w_i p_i(x) from log w [k] and member log-probabilities [k, N]: [N]."""
    return torch.logsumexp(log_weights.unsqueeze(1) + rows, dim=0)


@dataclass(eq=False)
class MixGroup:
    members: list[Member]  # the lead first, then one follower per other engine
    log_weights: torch.Tensor  # [k], normalised
    max_len: int  # the smallest member's max_model_len: every member must hold the sequence
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # member index -> next-token log-probs [V]
    ended: bool = False  # the lead finished (or a member failed): followers are dropped

    @property
    def lead(self) -> Member:
        return self.members[0]

    def deposit(self, seq: Member, logits: torch.Tensor) -> None:
        self.rows[self.members.index(seq)] = torch.log_softmax(logits.float(), dim=-1)

    def awaits(self, seq: Member) -> bool:
        """`seq` has contributed at its position; it decodes again once the token is drawn."""
        return self.members.index(seq) in self.rows

    def complete(self) -> bool:
        return len(self.rows) == len(self.members)

    def mixture(self) -> torch.Tensor:
        """log sum_i w_i p_i(token): the lead samples from these logits, [V] (the shortest
        member vocabulary: larger embeddings only pad the tokenizer's). Clears the rows."""
        v = min(r.shape[-1] for r in self.rows.values())
        rows = torch.stack([self.rows[i][:v] for i in range(len(self.members))])  # [k, V]
        self.rows.clear()
        return mix_logprobs(self.log_weights, rows)

    def advance(self, token: int) -> None:
        """The lead drew `token`: every follower continues with it."""
        for seq in self.members[1:]:
            seq.output_ids.append(token)
