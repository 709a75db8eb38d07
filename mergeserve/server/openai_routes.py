"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Handlers validate, tokenize and submit; the engine never sees HTTP. Streams are sent
with sse-starlette, which cancels the stream (and so aborts the engine requests) when
the client disconnects.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from mergeserve import __version__
from mergeserve.engine.sequence import TokenLogprob
from mergeserve.server import generation, limits
from mergeserve.server import errors
from mergeserve.server.errors import APIError, bad_request
from mergeserve.server.generation import Job
from mergeserve.server.metrics import Metrics
from mergeserve.server.protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs,
    ChatResponseMessage, ChatTokenLogprob, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
    Delta, FeedbackRequest, FeedbackResponse, ModelCard, ModelList, TopLogprob, Usage, expert_names_of,
)
from mergeserve.server.registry import Lease, Registry

if TYPE_CHECKING:
    from mergeserve.engine.engine import Engine
    from mergeserve.engine.executor import Executor

log = logging.getLogger(__name__)

SYSTEM_FINGERPRINT = f"mergeserve-{__version__}"
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MIN_LOGPROB = -9999.0  # JSON has no -inf


class OpenAIRoutes:
    def __init__(self, registry: Registry, executor: Executor, metrics: Metrics) -> None:
        self.registry, self.executor, self.metrics = registry, executor, metrics
        self.created = int(time.time())
        # 401: only when API keys are configured.
        self.router = APIRouter(prefix="/v1", responses=errors.responses(401))
        self.router.add_api_route("/models", self.models, methods=["GET"])
        # response_model=None: these return either a model or a stream; `responses` documents both.
        self.router.add_api_route(
            "/completions", self.completions, methods=["POST"], response_model=None,
            responses={200: _json_or_stream(CompletionResponse), **errors.responses(404, 429, 503)},
        )
        self.router.add_api_route(
            "/chat/completions", self.chat_completions, methods=["POST"], response_model=None,
            responses={200: _json_or_stream(ChatCompletionResponse), **errors.responses(404, 422, 429, 503)},
        )
        self.router.add_api_route("/feedback", self.feedback, methods=["POST"], responses=errors.responses(404))

    async def models(self) -> ModelList:
        cards = [ModelCard(id=name, created=self.created) for name in self.registry.names()]
        cards += [ModelCard(id=n, created=self.created, targets=a.targets) for n, a in self.registry.aliases().items()]
        return ModelList(data=cards)

    async def feedback(self, body: FeedbackRequest, request: Request) -> FeedbackResponse:
        served = self.registry.served(body.id)
        if served is None:
            raise APIError(404, f"no recent response has the id {body.id!r}", param="id", code="response_not_found")
        name, revision, _ = served
        request.state.model = name
        self.metrics.feedback.labels(name).observe(body.score)
        return FeedbackResponse(id=body.id, model=name, revision=revision)

    async def completions(
        self, body: CompletionRequest, request: Request, response: Response,
    ) -> CompletionResponse | EventSourceResponse:
        body.check_supported()
        lease = self._admit(body, request)
        with _LeaseScope(lease, self.metrics) as scope:
            engine = lease.engine
            limits.check_max_tokens(engine, body.max_tokens, "max_tokens")
            prompts = _completion_prompts(engine, body.prompt)
            max_tokens = body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
            for prompt in prompts:
                _check_length(engine, len(prompt), max_tokens, "prompt")
            params = body.sampling_params(max_tokens, body.logprobs, expert_names_of(engine))
            job = Job(engine, f"cmpl-{uuid.uuid4().hex}", prompts, body.n or 1, params)
            if body.stream:
                return self._stream(job, scope, self._completion_chunks(job, body, lease))
            choices = await self._collect(job, lease, request, response)
            return self._completion_response(job, body, lease, choices)

    def _completion_response(
        self, job: Job, body: CompletionRequest, lease: Lease, choices: list[generation.Choice],
    ) -> CompletionResponse:
        return CompletionResponse(
            id=job.request_id, created=int(time.time()), model=lease.name, system_fingerprint=_fingerprint(lease),
            choices=[
                CompletionChoice(
                    index=c.index, text=c.text, finish_reason=c.finish_reason,
                    logprobs=None if body.logprobs is None else _completion_logprobs(c.logprobs, 0),
                )
                for c in choices
            ],
            usage=_usage(job, sum(len(c.token_ids) for c in choices)),
        )

    async def chat_completions(
        self, body: ChatCompletionRequest, request: Request, response: Response,
    ) -> ChatCompletionResponse | EventSourceResponse:
        body.check_supported()
        lease = self._admit(body, request)
        with _LeaseScope(lease, self.metrics) as scope:
            engine = lease.engine
            param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            requested = body.max_completion_tokens or body.max_tokens
            limits.check_max_tokens(engine, requested, param)
            prompt = _chat_prompt(engine, body)
            max_tokens = requested or limits.default_max_tokens(engine, len(prompt))
            _check_length(engine, len(prompt), max_tokens, "messages")
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            params = body.sampling_params(max_tokens, logprobs, expert_names_of(engine))
            job = Job(engine, f"chatcmpl-{uuid.uuid4().hex}", [prompt], body.n or 1, params)
            if body.stream:
                return self._stream(job, scope, self._chat_chunks(job, body, lease))
            choices = await self._collect(job, lease, request, response)
            return self._chat_response(job, body, lease, choices)

    def _stream(self, job: Job, scope: _LeaseScope, chunks: AsyncIterator[BaseModel]) -> EventSourceResponse:
        self.registry.remember(job.request_id, scope.lease)
        return scope.stream(chunks)

    async def _collect(self, job: Job, lease: Lease, request: Request, response: Response) -> list[generation.Choice]:
        """Run `job` to the end (cancelled if the client leaves); its response names the revision."""
        self.registry.remember(job.request_id, lease)
        choices = await generation.until_disconnected(request, generation.collect(self.executor, self.metrics, job))
        response.headers.update(lease.headers)
        return choices

    def _admit(self, body: CompletionRequest | ChatCompletionRequest, request: Request) -> Lease:
        # Sticky A/B assignment: a session header wins over the OpenAI `user` field.
        lease = limits.admit(self.registry, body.model, request.headers.get("x-session-id") or body.user)
        request.state.model = lease.name
        if lease.alias is not None:
            self.metrics.alias_requests.labels(lease.alias, lease.name).inc()
        return lease

    def _chat_response(
        self, job: Job, body: ChatCompletionRequest, lease: Lease, choices: list[generation.Choice],
    ) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=job.request_id, created=int(time.time()), model=lease.name, system_fingerprint=_fingerprint(lease),
            choices=[
                ChatChoice(
                    index=c.index, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
                    logprobs=_chat_logprobs(c.logprobs) if body.logprobs else None,
                )
                for c in choices
            ],
            usage=_usage(job, sum(len(c.token_ids) for c in choices)),
        )

    async def _completion_chunks(self, job: Job, body: CompletionRequest, lease: Lease) -> AsyncIterator[BaseModel]:
        created = int(time.time())
        offsets = [0] * job.num_choices  # text_offset runs over the whole choice, not the chunk
        num_tokens = 0
        async with aclosing(generation.run(self.executor, self.metrics, job)) as stream:
            async for index, out in stream:
                num_tokens += len(out.new_token_ids)
                if not (out.new_text or out.finished or out.logprobs):
                    continue
                logprobs = None
                if body.logprobs is not None:
                    logprobs = _completion_logprobs(out.logprobs, offsets[index])
                    offsets[index] += sum(len(t) for t in logprobs.tokens)
                yield CompletionResponse(
                    id=job.request_id, created=created, model=lease.name, system_fingerprint=_fingerprint(lease),
                    choices=[CompletionChoice(
                        index=index, text=out.new_text, logprobs=logprobs,
                        finish_reason=out.finish_reason if out.finished else None,
                    )],
                )
        if body.include_usage:
            yield CompletionResponse(
                id=job.request_id, created=created, model=lease.name, system_fingerprint=_fingerprint(lease),
                choices=[], usage=_usage(job, num_tokens),
            )

    async def _chat_chunks(self, job: Job, body: ChatCompletionRequest, lease: Lease) -> AsyncIterator[BaseModel]:
        created = int(time.time())

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=job.request_id, created=created, model=lease.name, system_fingerprint=_fingerprint(lease),
                choices=choices, usage=usage,
            )

        role = Delta(role="assistant", content="")
        yield chunk([ChatChunkChoice(index=i, delta=role) for i in range(job.num_choices)])
        num_tokens = 0
        async with aclosing(generation.run(self.executor, self.metrics, job)) as stream:
            async for index, out in stream:
                num_tokens += len(out.new_token_ids)
                if not (out.new_text or out.finished or out.logprobs):
                    continue
                yield chunk([ChatChunkChoice(
                    index=index, delta=Delta(content=out.new_text or None),
                    logprobs=_chat_logprobs(out.logprobs) if body.logprobs else None,
                    finish_reason=out.finish_reason if out.finished else None,
                )])
        if body.include_usage:
            yield chunk([], _usage(job, num_tokens))


def _json_or_stream(model: type[BaseModel]) -> dict:
    """OpenAPI for a 200 that is `model` as JSON, or with stream=true server-sent events of
    JSON chunks (or an in-band error) ending with `[DONE]`."""
    event = {"type": "string", "contentMediaType": "application/json"}
    return {"model": model, "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, event]}},
    }}}}


class _LeaseScope:
    """Holds a request's lease until its response is done: the handler's end, or the stream's."""

    def __init__(self, lease: Lease, metrics: Metrics) -> None:
        self.lease, self.metrics, self._handed_over = lease, metrics, False

    def __enter__(self) -> _LeaseScope:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, _) -> None:
        if isinstance(error, APIError):
            self.metrics.request_errors.labels(self.lease.name, error.code or str(error.status)).inc()
        if not self._handed_over or error is not None:
            self.lease.release()

    def stream(self, events: AsyncIterator[BaseModel]) -> EventSourceResponse:
        def failed() -> None:
            self.metrics.request_errors.labels(self.lease.name, "server_error").inc()

        body = _sse(events, self.lease.release, failed)
        weakref.finalize(body, self.lease.release)  # a stream that never starts releases when collected
        self._handed_over = True
        return EventSourceResponse(body, headers=self.lease.headers)


async def _sse(
    events: AsyncIterator[BaseModel], done: Callable[[], None], failed: Callable[[], None],
) -> AsyncIterator[str]:
    """Server-sent `data:` payloads in OpenAI's framing; a failure mid-stream becomes an error event."""
    try:
        async with aclosing(events):
            async for event in events:
                yield event.model_dump_json()
    except Exception:
        log.exception("stream failed")  # the 200 status is already sent; tell the client in-band
        failed()
        error = {"message": "internal server error", "type": "server_error", "param": None, "code": None}
        yield json.dumps({"error": error})
    finally:
        done()
    yield "[DONE]"


def _fingerprint(lease: Lease) -> str:
    """Which build of which composition answered: changes with every replacement."""
    return f"{SYSTEM_FINGERPRINT}:{lease.revision.id}"


def _completion_prompts(engine: Engine, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [engine.tokenizer.encode(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [engine.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    vocab = len(engine.tokenizer)
    if not prompts or not all(prompts):
        raise bad_request("prompt must not be empty", param="prompt")
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
    return prompts


def _chat_prompt(engine: Engine, body: ChatCompletionRequest) -> list[int]:
    messages = body.template_messages()
    try:
        text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # templates raise whatever they like (jinja errors, raise_exception, ...)
        raise APIError(
            422, f"the chat template of {engine.name!r} cannot render these messages: {e}",
            param="messages", code="chat_template_error",
        ) from e
    return engine.tokenizer.encode(text, add_special_tokens=False)


def _check_length(engine: Engine, prompt_tokens: int, max_tokens: int, param: str) -> None:
    limits.check_prompt_tokens(engine, prompt_tokens, param)
    if max_tokens < 1 or prompt_tokens + max_tokens > engine.max_model_len:
        raise bad_request(
            f"this model's maximum context length is {engine.max_model_len} tokens; the request needs "
            f"{prompt_tokens + max(max_tokens, 1)} ({prompt_tokens} in the {param}, {max(max_tokens, 1)} to generate)",
            param=param, code="context_length_exceeded",
        )


def _usage(job: Job, completion_tokens: int) -> Usage:
    prompt = job.num_prompt_tokens
    return Usage(prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens)


def _lp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def _completion_logprobs(logprobs: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for t in logprobs:
        out.tokens.append(t.token)
        out.token_logprobs.append(_lp(t.logprob))
        out.top_logprobs.append({token: _lp(lp) for _, token, lp in t.top})
        out.text_offset.append(offset)
        offset += len(t.token)
    return out


def _chat_logprobs(logprobs: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(
            token=t.token, logprob=_lp(t.logprob), bytes=list(t.token.encode()),
            top_logprobs=[TopLogprob(token=s, logprob=_lp(lp), bytes=list(s.encode())) for _, s, lp in t.top],
        )
        for t in logprobs
    ])
