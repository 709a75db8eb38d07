"""Admission limits: refuse a request up front (400, 429, 503) rather than queue it without bound."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergeserve.server.errors import APIError, bad_request
from mergeserve.server.registry import RETRY_AFTER_S, Lease, Registry

if TYPE_CHECKING:
    from mergeserve.engine.engine import Engine


def admit(
    registry: Registry, model: str, sticky_key: str | None = None, sequences: int = 1, param: str = "n",
) -> Lease:
    """A lease on the composition serving `model` (an alias picks one) for a request of `sequences`
    engine sequences (prompts x n), if its queue has room for all of them. Each sequence waits in
    the queue before it runs, so a request is admitted whole or not at all: one that no queue
    could hold is a 400 naming `param`, one that does not fit now a 429."""
    lease = registry.acquire(model, sticky_key, sequences)
    backend = lease.backend
    if backend.max_waiting is None:  # the upstream queues and refuses on its own
        return lease
    if sequences > backend.max_waiting:
        lease.release()
        raise bad_request(
            f"this request runs {sequences} sequences (prompts x n); the model {backend.name!r} queues at most "
            f"{backend.max_waiting}", param=param, code="too_many_sequences",
        )
    # Leases count sequences admitted but not yet in the engine's queue, so concurrent
    # admissions see each other (the engine only learns of a request a little later).
    others = lease.revision.in_flight_sequences - sequences
    waiting = max(backend.num_waiting, others - backend.num_running)
    if waiting + sequences > backend.max_waiting:
        lease.release()
        raise APIError(
            429, f"the model {backend.name!r} has {waiting} sequences waiting; this request's {sequences} would "
            f"pass the limit of {backend.max_waiting}; retry shortly",
            type="rate_limit_error", code="queue_full", headers={"Retry-After": RETRY_AFTER_S},
        )
    return lease


def check_max_tokens(engine: Engine, max_tokens: int | None, param: str) -> None:
    limit = engine.config.max_tokens_limit
    if max_tokens is not None and limit is not None and max_tokens > limit:
        raise bad_request(f"{param} is {max_tokens}; this server allows at most {limit}", param=param)


def check_prompt_tokens(engine: Engine, prompt_tokens: int, param: str) -> None:
    limit = engine.config.max_prompt_tokens
    if limit is not None and prompt_tokens > limit:
        raise bad_request(
            f"the {param} has {prompt_tokens} tokens; this server allows at most {limit}",
            param=param, code="context_length_exceeded",
        )


def default_max_tokens(engine: Engine, prompt_tokens: int) -> int:
    """Without max_tokens a chat fills the context, up to the server's cap."""
    room = engine.max_model_len - prompt_tokens
    limit = engine.config.max_tokens_limit
    return room if limit is None else min(room, limit)
