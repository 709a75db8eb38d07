"""Admission limits: refuse a request up front (400, 429, 503) rather than queue it without bound."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergeserve.server.errors import APIError, bad_request
from mergeserve.server.registry import Registry

if TYPE_CHECKING:
    from mergeserve.engine.engine import Engine

RETRY_AFTER_S = "1"


def admit(registry: Registry, model: str) -> Engine:
    """The engine serving `model`, if it has room in its waiting queue."""
    if not len(registry):
        raise APIError(
            503, "no model is loaded yet; retry shortly", type="server_error", code="not_ready",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    engine = registry.get(model)
    if engine.num_waiting >= engine.config.max_waiting:
        raise APIError(
            429, f"the model {engine.name!r} has {engine.num_waiting} requests waiting (the limit); retry shortly",
            type="rate_limit_error", code="queue_full", headers={"Retry-After": RETRY_AFTER_S},
        )
    return engine


def check_max_tokens(engine: Engine, max_tokens: int | None, param: str) -> None:
    limit = engine.config.max_tokens_limit
    if max_tokens is not None and limit is not None and max_tokens > limit:
        raise bad_request(f"{param} is {max_tokens}; this server allows at most {limit}", param=param)


def default_max_tokens(engine: Engine, prompt_tokens: int) -> int:
    """Without max_tokens a chat fills the context, up to the server's cap."""
    room = engine.max_model_len - prompt_tokens
    limit = engine.config.max_tokens_limit
    return room if limit is None else min(room, limit)
