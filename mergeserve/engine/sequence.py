"""One request's state, and what the engine hands back after each step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mergeserve.engine.mixing import MixGroup

if TYPE_CHECKING:
    import torch

    from mergeserve.engine.detokenizer import Detokenizer
    from mergeserve.engine.tables import CompositionTables


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # how many alternatives to return per token; None: no logprobs
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo); None: none
    # [E] added to the router's logits (a mixture router's scores); -inf excludes an expert. None: no bias.
    router_bias: tuple[float, ...] | None = None
    # The prompt tokens [start, end) a sequence router scores: a chat's last user message, not the
    # template around it (a short question is otherwise scored mostly on the template). None: all.
    route_span: tuple[int, int] | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token_id, token, logprob), best first


@dataclass
class RequestOutput:
    """What one step produced for one request (deltas, not totals)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_output_tokens: int
    # On a request's first output, when it asked for them: one per prompt token, None for the first.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # On its last output: each expert's share of the request's routing (Sequence.expert_shares).
    experts: tuple[float, ...] | None = None


@dataclass(eq=False)  # identity: two requests with equal fields are still two requests
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    slot: int | None = None  # KV cache slot while running
    num_cached: int = 0  # tokens whose keys/values are in the cache
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded output, stop strings cut off
    emitted: int = 0  # characters of `text` already handed out
    finish_reason: str | None = None
    alpha: torch.Tensor | None = None  # [E] expert weights of a mixture router, fixed at admission
    detokenizer: Detokenizer | None = None  # turns each new token into its text, set at admission
    prompt_logprobs: list[TokenLogprob | None] | None = None  # filled chunk by chunk during prefill
    group: MixGroup | None = None  # decoded together with other engines' sequences (engine/mixing.py)
    # On a base engine: the composition it runs (engine/tables.py); None on an engine of one composition.
    composition: CompositionTables | None = None
    # Token routing: the weight each expert got from the forwards that produced its response's
    # tokens (its last prompt token's, then each decode step's), summed over the MoE layers, [E].
    routed: torch.Tensor | None = None

    def expert_shares(self) -> tuple[float, ...] | None:
        """Each expert's share of this request, summing to 1: a mixture router's weights, or each
        expert's share of the routing weight of its response's tokens; None with one expert."""
        weights = self.alpha if self.alpha is not None else self.routed
        if weights is None or len(weights) < 2 or float(weights.sum()) <= 0:
            return None
        return tuple(float(w) for w in weights.double() / weights.double().sum())

    def add_routing(self, weights: torch.Tensor) -> None:
        """One forward's routing of the token that produced its next output token, [E] (or wider: zeros past E)."""
        self.routed = weights.clone() if self.routed is None else self.routed + weights

    @property
    def awaiting(self) -> bool:
        """Its next-token distribution waits in its mix group for the other members'."""
        return self.group is not None and self.group.awaits(self)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_cached < len(self.prompt_ids)
