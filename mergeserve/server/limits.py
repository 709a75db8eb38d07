"""Admission limits: refuse a request up front (400, 429, 503) rather than queue it without bound."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergeserve.server.errors import APIError, bad_request
from mergeserve.server.registry import RETRY_AFTER_S, Lease, Registry

if TYPE_CHECKING:
    from mergeserve.engine.engine import Engine


def admit(registry: Registry, model: str, sticky_key: str | None = None) -> Lease:
    """A lease on the composition serving `model` (an alias picks one), if it has room in its queue."""
    lease = registry.acquire(model, sticky_key)
    backend = lease.backend
    if backend.max_waiting is None:  # the upstream queues and refuses on its own
        return lease
    # Leases count requests admitted but not yet in the engine's queue, so concurrent
    # admissions see each other (the engine only learns of a request a little later).
    waiting = max(backend.num_waiting, lease.revision.in_flight - 1 - backend.num_running)
    if waiting >= backend.max_waiting:
        lease.release()
        raise APIError(
            429, f"the model {backend.name!r} has {waiting} requests waiting (the limit); retry shortly",
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
