"""An OpenAI-compatible server as a backend: requests forwarded with httpx, streamed or not.

The client's JSON goes upstream as sent, with `model` rewritten to the upstream's name;
responses come back as the upstream wrote them, with `model` rewritten to the name the
client asked for (the composition). Usage, finish reasons and logprobs pass through.
Upstream errors keep their status and OpenAI envelope, its fields cut short; any other error
body is summed up, not echoed. Closing a stream (a client that leaves)
closes the upstream connection, which an OpenAI server takes as an abort.

Streams ask the upstream for a final usage chunk whatever the client asked, so the
per-composition token metrics are exact; the client sees that chunk only if it asked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import httpx
from fastapi.responses import JSONResponse

from mergeserve.server.backends.base import Call
from mergeserve.server.errors import APIError
from mergeserve.server.generation import until_disconnected
from mergeserve.server.registry import RETRY_AFTER_S

if TYPE_CHECKING:
    from mergeserve.server.backends.process import ManagedServer
    from mergeserve.server.protocol import ChatCompletionRequest, CompletionRequest
    from mergeserve.spec import CompositionSpec

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 5.0
MAX_MESSAGE_CHARS = 300
TOKEN = re.compile(r"[A-Za-z0-9_.:\[\]-]{1,64}")  # what an envelope's type, param and code may be


class UpstreamError(APIError):
    """An upstream's error response: its status and Retry-After, and of its body only an OpenAI
    envelope's four fields, the message short and printable, the others short identifiers.
    Any other body (an HTML page, a stack trace) is not this server's to show: a one-line summary."""

    def __init__(self, status: int, body: bytes, headers: httpx.Headers) -> None:
        error = _envelope(body) or {"message": f"the upstream answered {status} without an OpenAI error envelope",
                                    "type": "upstream_error", "param": None, "code": None}
        code = error["code"]
        super().__init__(status if 400 <= status <= 599 else 502, error["message"], type=error["type"],
                         param=error["param"], code=None if code is None else str(code))
        self.payload = {"error": error}
        if "retry-after" in headers:
            self.headers = {"Retry-After": headers["retry-after"][:16]}

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload, status_code=self.status, headers=self.headers)


def _envelope(body: bytes) -> dict[str, Any] | None:
    """{"error": {message, type, param, code}} of `body`, sanitised, if it is one."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError, RecursionError):
        return None
    if not (isinstance(error, dict) and isinstance(error.get("message"), str)):
        return None
    message = "".join(c for c in error["message"][:MAX_MESSAGE_CHARS] if c.isprintable() or c == "\n")
    kind, param, code = (_token(error.get(k)) for k in ("type", "param", "code"))
    return {"message": message, "type": kind or "upstream_error", "param": param, "code": code}


def _token(value: object) -> str | int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return value if isinstance(value, str) and TOKEN.fullmatch(value) else None


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="upstream_unavailable", headers={"Retry-After": RETRY_AFTER_S})


class ProxyBackend:
    kind = "openai"
    engine = None
    max_waiting = None  # the upstream queues and refuses (429) on its own
    num_waiting = 0

    def __init__(
        self, name: str, url: str, model: str, api_key: str | None = None, timeout_s: float = 600.0,
        process: ManagedServer | None = None, release: Callable[[bool], None] | None = None,
    ) -> None:
        """url: the upstream's base URL, ending in /v1; process: the child serving it, when we manage
        one; release: what close() does instead of stopping it (a child shared with other backends,
        e.g. unloading this one's adapter), called with close's `wait`."""
        self.name, self.url, self.model = name, url.rstrip("/"), model
        self.process, self._release = process, release
        self.kind = "vllm" if process is not None else "openai"
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S)
        self._http: httpx.AsyncClient | None = None  # made on the event loop, on first use
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = 0

    @classmethod
    def connect(cls, spec: CompositionSpec, key: str | None) -> ProxyBackend:
        """A backend for `backend: openai` (`key`: the upstream's, as BackendPolicy.upstream_key
        allows); learns the upstream's model name if the spec gives none."""
        upstream = spec.upstream
        model = upstream.model or first_model(upstream.url, key)
        return cls(spec.name, upstream.url, model, key, upstream.timeout_s)

    @property
    def num_running(self) -> int:
        return self._in_flight

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "url": self.url, "upstream_model": self.model}
        if self.process is not None:
            out["process"] = self.process.describe()
        return out

    def close(self, wait: bool = False) -> None:
        if self._release is not None:
            self._release(wait)
        elif self.process is not None:
            self.process.stop(wait)
        if self._http is not None and self._loop is not None and not self._loop.is_closed():
            http = self._http
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(http.aclose()))

    async def completions(self, body: CompletionRequest, call: Call) -> Any:
        return await self._forward("/completions", call)

    async def chat_completions(self, body: ChatCompletionRequest, call: Call) -> Any:
        return await self._forward("/chat/completions", call)

    async def _forward(self, path: str, call: Call) -> Any:
        if self.process is not None and not self.process.ready:
            raise unavailable(f"the server of {self.name!r} is not up ({self.process.state}); retry shortly")
        payload = await call.request.json()
        payload["model"] = self.model
        stream = bool(payload.get("stream"))
        wants_usage = False
        if stream:
            options = payload.get("stream_options") or {}
            wants_usage = bool(options.get("include_usage"))
            payload["stream_options"] = options | {"include_usage": True}
        usage = _Usage(call, time.perf_counter())
        self._in_flight += 1
        try:
            response = await self._send(path, payload)
            if stream:
                return call.stream(self._relay(response, call, wants_usage, usage))
            try:
                body = await until_disconnected(call.request, response.aread())
            finally:
                await response.aclose()
        finally:
            self._in_flight -= 1
        data = json.loads(body)
        usage.done(data.get("usage"), [c.get("finish_reason") for c in data.get("choices", [])])
        data["model"] = call.name
        if isinstance(data.get("id"), str):
            call.remember(data["id"])
        return JSONResponse(data, headers=call.lease.headers)

    async def _send(self, path: str, payload: dict) -> httpx.Response:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._timeout, headers=self._headers)
            self._loop = asyncio.get_running_loop()
        request = self._http.build_request("POST", self.url + path, json=payload)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as e:
            raise unavailable(f"the upstream of {self.name!r} cannot be reached ({type(e).__name__}); retry shortly") from e
        if response.status_code != 200:
            body = await response.aread()
            await response.aclose()
            raise UpstreamError(response.status_code, body, response.headers)
        return response

    async def _relay(
        self, response: httpx.Response, call: Call, wants_usage: bool, usage: _Usage,
    ) -> AsyncIterator[str]:
        """The upstream's SSE `data:` payloads, `model` rewritten; [DONE] is added by Call.stream."""
        reasons: list[str | None] = []
        remembered = False
        self._in_flight += 1  # while the stream runs (a stream that never starts never counts)
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if not remembered and isinstance(chunk.get("id"), str):
                    call.remember(chunk["id"])
                    remembered = True
                if "model" in chunk:
                    chunk["model"] = call.name
                choices = chunk.get("choices") or []
                usage.first_token(choices)
                reasons += [c["finish_reason"] for c in choices if c.get("finish_reason")]
                if chunk.get("usage") is not None:
                    usage.tokens = chunk["usage"]
                    if not wants_usage:
                        if not choices:
                            continue  # the usage chunk only the gateway asked for
                        chunk["usage"] = None
                yield json.dumps(chunk)
        except httpx.TransportError as e:
            raise RuntimeError(f"the upstream of {self.name!r} broke off the stream: {e}") from e
        finally:
            self._in_flight -= 1
            await response.aclose()
            usage.done(usage.tokens, reasons)


class _Usage:
    """One proxied request's share of the per-composition metrics."""

    def __init__(self, call: Call, start: float) -> None:
        self.call, self.start = call, start
        self.tokens: dict | None = None
        self._first = False

    def first_token(self, choices: list[dict]) -> None:
        if not self._first and any(_has_output(c) for c in choices):
            self._first = True
            self.call.metrics.ttft.labels(self.call.name).observe(time.perf_counter() - self.start)
            self.call.first_token()

    def done(self, tokens: dict | None, reasons: list[str | None]) -> None:
        m, name = self.call.metrics, self.call.name
        if tokens:
            m.prompt_tokens.labels(name).inc(tokens.get("prompt_tokens") or 0)
            m.generation_tokens.labels(name).inc(tokens.get("completion_tokens") or 0)
            self.call.output(tokens.get("completion_tokens") or 0)
        if reasons and all(reasons):
            m.e2e.labels(name).observe(time.perf_counter() - self.start)
            for reason in reasons:
                m.request_success.labels(name, reason).inc()


def _has_output(choice: dict) -> bool:
    delta = choice.get("delta") or {}
    return bool(choice.get("text") or delta.get("content") or delta.get("tool_calls"))


def first_model(url: str, api_key: str | None) -> str:
    """The first model an OpenAI-compatible server lists (GET {url}/models)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url.rstrip("/") + "/models", headers=headers, timeout=CONNECT_TIMEOUT_S * 2)
        response.raise_for_status()
        models = [m["id"] for m in response.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"url: cannot list the models of {url} ({e}); set upstream_model to skip this") from e
    if not models:
        raise ValueError(f"url: {url} serves no model")
    return models[0]
