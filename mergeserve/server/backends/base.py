"""The interface every backend implements, and the one request it is handed.

What the registry and the metrics read of a backend (its name, queues and engine) is
registry.Served, below this module; a Backend adds the requests it answers.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import Request, Response
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from mergeserve.server.errors import APIError
from mergeserve.server.registry import Served

if TYPE_CHECKING:
    from mergeserve.server.metrics import Metrics
    from mergeserve.server.protocol import ChatCompletionRequest, CompletionRequest
    from mergeserve.server.registry import Lease, Registry

log = logging.getLogger(__name__)


class Backend(Served, Protocol):
    """What serves a composition: local, openai or vllm (backends/local.py, proxy.py, vllm.py)."""

    kind: str  # "local" | "openai" | "vllm"

    @property
    def max_waiting(self) -> int | None:
        """Admission limit on waiting requests; None: the upstream queues (and refuses) itself."""

    async def completions(self, body: CompletionRequest, call: Call) -> BaseModel | Response: ...

    async def chat_completions(self, body: ChatCompletionRequest, call: Call) -> BaseModel | Response: ...

    def describe(self) -> dict[str, Any]:
        """What GET /admin/compositions/{name} shows of it (upstream, child process, log tail)."""

    def close(self, wait: bool = False) -> None:
        """Free what it holds; called once its revision is retired and drained, or at shutdown.
        Returns at once (it runs on the event loop) unless `wait`."""


@dataclass(eq=False)
class Call:
    """One admitted OpenAI request: the HTTP request and response, and the lease it holds.

    The lease is released when the handler returns, or, once `stream` hands it over, when
    the stream ends. A request that an A/B alias sent is then counted in the alias's tally.
    """

    request: Request
    response: Response
    lease: Lease[Backend]
    metrics: Metrics
    registry: Registry[Backend]
    _handed_over: bool = False
    started: float = field(default_factory=time.perf_counter)
    _first_token_s: float | None = None
    _output_tokens: int = 0
    _failed: bool = False
    _ended: bool = False

    @property
    def name(self) -> str:
        return self.lease.name

    def remember(self, response_id: str) -> None:
        """Let POST /v1/feedback find which composition answered `response_id`."""
        self.registry.remember(response_id, self.lease)

    def note_experts(self, response_id: str, experts: dict[str, float]) -> None:
        """The response finished, routed to `experts`: its feedback is split by them."""
        self.registry.note_experts(response_id, experts)
        if (lease := self.lease).alias is not None:
            self.metrics.tallies.routing(lease.alias, lease.generation, lease.name, experts)

    def first_token(self) -> None:
        if self._first_token_s is None:
            self._first_token_s = time.perf_counter() - self.started

    def output(self, tokens: int) -> None:
        """The response has `tokens` more output tokens."""
        if tokens:
            self.first_token()
        self._output_tokens += tokens

    def stream(self, events: AsyncIterator[BaseModel | str]) -> EventSourceResponse:
        """Server-sent events of `events` (models, or JSON text passed through), ending with [DONE]."""
        def failed() -> None:
            self._failed = True
            self.metrics.request_errors.labels(self.name, "server_error").inc()

        body = _sse(events, self._end, failed)
        weakref.finalize(body, self._end)  # a stream that never starts releases when collected
        self._handed_over = True
        return EventSourceResponse(body, headers=self.lease.headers)

    def __enter__(self) -> Call:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, _) -> None:
        if isinstance(error, APIError):
            self.metrics.request_errors.labels(self.name, error.code or str(error.status)).inc()
        # The server's failures (5xx, a bug) count against the composition; a client's own (4xx) do not.
        self._failed |= error is not None and (not isinstance(error, APIError) or error.status >= 500)
        if not self._handed_over or error is not None:
            self._end()

    def _end(self) -> None:
        """Release the lease, once; an alias's request is counted in its tally."""
        if self._ended:
            return
        self._ended = True
        if (lease := self.lease).alias is not None:
            self.metrics.tallies.record(
                lease.alias, lease.generation, lease.name, error=self._failed, ttft_s=self._first_token_s,
                latency_s=time.perf_counter() - self.started, output_tokens=self._output_tokens,
            )
        lease.release()


async def _sse(
    events: AsyncIterator[BaseModel | str], done: Callable[[], None], failed: Callable[[], None],
) -> AsyncIterator[str]:
    """`data:` payloads in OpenAI's framing; a failure mid-stream becomes an error event."""
    try:
        async with aclosing(events):
            async for event in events:
                yield event if isinstance(event, str) else event.model_dump_json()
    except Exception as e:
        log.exception("stream failed")  # the 200 status is already sent; tell the client in-band
        failed()
        error = {"message": "internal server error", "type": "server_error", "param": None, "code": None}
        if isinstance(e, APIError):
            error = {"message": e.message, "type": e.type, "param": e.param, "code": e.code}
        yield json.dumps({"error": error})
    finally:
        done()
    yield "[DONE]"
