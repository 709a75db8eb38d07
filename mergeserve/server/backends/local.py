"""The in-process engine as a backend: tokenize, submit to the executor, detokenized deltas back.

Handlers validate and tokenize: templates and tokenizers run on a worker thread, never on the
event loop, and only over text short enough to fit the context. The engine never sees HTTP.
Streams are sent with sse-starlette, which cancels the stream (and so aborts the engine
requests) when the client disconnects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel

from mergeserve import __version__
from mergeserve.engine.sequence import TokenLogprob
from mergeserve.router.content import content_tokens
from mergeserve.server import generation, limits
from mergeserve.server.backends.base import Call
from mergeserve.server.errors import APIError, bad_request
from mergeserve.server.generation import GeneratedChoice, Job
from mergeserve.server.protocol import (
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs,
    ChatResponseMessage, ChatTokenLogprob, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
    Delta, TopLogprob, Usage, expert_names_of,
)

if TYPE_CHECKING:
    from mergeserve.engine.base_engine import Placed
    from mergeserve.engine.engine import Engine
    from mergeserve.engine.executor import Executor
    from mergeserve.engine.coordinator import Mixture
    from mergeserve.server.registry import Lease

SYSTEM_FINGERPRINT = f"mergeserve-{__version__}"
EXPERTS_HEADER = "X-Mergeserve-Experts"  # a whole response's routing: math=0.93,german=0.07
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MIN_LOGPROB = -9999.0  # JSON has no -inf
# Text longer than this many characters per token of the context is refused before it is templated
# or tokenized: real text averages a few characters a token, and 32 leaves room for runs of whitespace.
MAX_CHARS_PER_TOKEN = 32


class LocalBackend:
    kind = "local"

    def __init__(
        self, engine: Engine | Placed, executor: Executor, mix: Mixture | None = None,
        release: Callable[[Placed], None] | None = None,
    ) -> None:
        """`engine`: the composition's own, or its place on a base engine (then `release` frees
        that place when the backend closes). `mix`: decode every request as a mixture of this
        engine's and other engines' distributions."""
        self.engine, self.executor, self.mix, self._release = engine, executor, mix, release
        self.name = engine.name

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    @property
    def max_waiting(self) -> int:
        return self.engine.config.max_waiting

    @property
    def kv_cache_bytes(self) -> int | None:
        return self.engine.cache.resident_bytes()

    def describe(self) -> dict[str, Any]:
        """What serves it, with its placement: an engine of its own, or its base's engine and the
        compositions it shares that engine with."""
        host = self.engine.host
        if host is self.engine:
            return {"kind": self.kind, "placement": {"engine": "own"}}
        return {"kind": self.kind, "placement": {"engine": "base", "base_engine": host.name,
                                                 "compositions": [t.name for t in host.placed]}}

    def close(self, wait: bool = False) -> None:
        if self._release is not None:
            self._release(self.engine)
        else:
            self.executor.detach(self.engine)

    async def completions(self, body: CompletionRequest, call: Call) -> BaseModel:
        body.check_supported()
        engine, lease = self.engine, call.lease
        limits.check_max_tokens(engine, body.max_tokens, "max_tokens")
        _check_prompt_sizes(engine, body.prompt)
        prompts = await asyncio.to_thread(_completion_prompts, engine, body.prompt)
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
        for prompt in prompts:
            _check_length(engine, len(prompt), max_tokens, "prompt")
        params = body.sampling_params(max_tokens, body.logprobs, expert_names_of(engine))
        if body.echo and body.logprobs is not None:
            if self.mix is not None:
                raise bad_request("echo with logprobs scores the prompt under one model; this request is mixed over "
                                  "several (router.top_k > 1)", param="echo")
            params = dataclasses.replace(params, prompt_logprobs=body.logprobs)
        job = Job(engine, f"cmpl-{uuid.uuid4().hex}", prompts, body.n or 1, params, self.mix)
        echo = await asyncio.to_thread(_echo_texts, engine, body.prompt, prompts) if body.echo else None
        if body.stream:
            call.remember(job.request_id)
            return call.stream(self._completion_chunks(job, body, call, echo))
        choices, experts = await self._collect(job, call)
        return self._completion_response(job, body, lease, choices, echo, experts)

    def _completion_response(
        self, job: Job, body: CompletionRequest, lease: Lease, choices: list[GeneratedChoice], echo: list[str] | None,
        experts: dict[str, float] | None,
    ) -> CompletionResponse:
        return CompletionResponse(
            id=job.request_id, created=int(time.time()), model=lease.name, system_fingerprint=_fingerprint(lease),
            choices=[
                CompletionChoice(
                    index=c.index, text=(echo[c.index // job.n] if echo else "") + c.text, finish_reason=c.finish_reason,
                    logprobs=None if body.logprobs is None else _completion_logprobs(c.logprobs, 0, self._echoed(job, c.index, c.prompt_logprobs)),
                )
                for c in choices
            ],
            usage=_usage(job, sum(len(c.token_ids) for c in choices)), experts=experts,
        )

    def _echoed(self, job: Job, index: int, prompt_logprobs: list[TokenLogprob | None] | None) -> Echoed | None:
        """The echoed prompt's first token (which has no logprob) and the rest's logprobs."""
        if prompt_logprobs is None:
            return None
        return self.engine.tokenizer.decode(job.prompts[index // job.n][:1]), prompt_logprobs[1:]

    async def chat_completions(self, body: ChatCompletionRequest, call: Call) -> BaseModel:
        body.check_supported()
        engine, lease = self.engine, call.lease
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        requested = body.max_completion_tokens or body.max_tokens
        limits.check_max_tokens(engine, requested, param)
        messages = body.template_messages()
        _check_chars(engine, sum(len(m["content"]) + len(m.get("name", "")) for m in messages), "messages")
        prompt, content = await asyncio.to_thread(_chat_prompt, engine, messages)
        max_tokens = requested or limits.default_max_tokens(engine, len(prompt))
        _check_length(engine, len(prompt), max_tokens, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = dataclasses.replace(body.sampling_params(max_tokens, logprobs, expert_names_of(engine)), route_span=content)
        job = Job(engine, f"chatcmpl-{uuid.uuid4().hex}", [prompt], body.n or 1, params, self.mix)
        if body.stream:
            call.remember(job.request_id)
            return call.stream(self._chat_chunks(job, body, call))
        choices, experts = await self._collect(job, call)
        return self._chat_response(job, body, lease, choices, experts)

    async def _collect(self, job: Job, call: Call) -> tuple[list[GeneratedChoice], dict[str, float] | None]:
        """Run `job` to the end (cancelled if the client leaves): its choices, and the experts they
        were routed to (the response's `experts`); its response names the revision and the experts."""
        call.remember(job.request_id)
        work = generation.collect(self.executor, call.metrics, job, call.output)
        choices = await generation.until_disconnected(call.request, work)
        call.response.headers.update(call.lease.headers)
        if (experts := self._experts([c.experts for c in choices])) is not None:
            call.response.headers[EXPERTS_HEADER] = ",".join(f"{name}={share:.2f}" for name, share in experts.items())
            call.note_experts(job.request_id, experts)
        return choices, experts

    def _experts(self, shares: list[tuple[float, ...] | None]) -> dict[str, float] | None:
        """What a response's choices were routed to (its `experts` field and header), largest share
        first: the mean of the choices' shares over the composition's experts, or, for a request
        mixed over several engines (router.top_k > 1 of method: route), the mixture's weights."""
        if self.mix is not None:
            names = [self.engine.name, *(e.name for e in self.mix.engines)]
            weights = torch.softmax(torch.tensor(self.mix.log_weights), 0).tolist()
        else:
            known = [s for s in shares if s is not None]
            if not known:
                return None
            names, weights = list(self.engine.expert_names), [sum(col) / len(known) for col in zip(*known)]
        return {n: round(w, 4) for n, w in sorted(zip(names, weights), key=lambda nw: -nw[1])}

    def _chat_response(
        self, job: Job, body: ChatCompletionRequest, lease: Lease, choices: list[GeneratedChoice],
        experts: dict[str, float] | None,
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
            usage=_usage(job, sum(len(c.token_ids) for c in choices)), experts=experts,
        )

    async def _completion_chunks(
        self, job: Job, body: CompletionRequest, call: Call, echo: list[str] | None,
    ) -> AsyncIterator[BaseModel]:
        lease, created = call.lease, int(time.time())
        offsets = [0] * job.num_choices  # text_offset runs over the whole choice, not the chunk
        echoed = [echo is None] * job.num_choices  # whether the choice's first chunk (the echo) went out
        num_tokens, shares = 0, []
        async with aclosing(generation.run(self.executor, call.metrics, job, call.output)) as stream:
            async for index, out in stream:
                num_tokens += len(out.new_token_ids)
                if out.finished:
                    shares.append(out.experts)
                if not (out.new_text or out.finished or out.logprobs or not echoed[index]):
                    continue
                text = out.new_text if echoed[index] else echo[index // job.n] + out.new_text
                echoed[index] = True
                logprobs = None
                if body.logprobs is not None:
                    logprobs = _completion_logprobs(out.logprobs, offsets[index], self._echoed(job, index, out.prompt_logprobs))
                    offsets[index] += sum(len(t) for t in logprobs.tokens)
                yield CompletionResponse(
                    id=job.request_id, created=created, model=lease.name, system_fingerprint=_fingerprint(lease),
                    choices=[CompletionChoice(
                        index=index, text=text, logprobs=logprobs,
                        finish_reason=out.finish_reason if out.finished else None,
                    )],
                    experts=self._experts([out.experts]) if out.finished else None,
                )
        experts = self._stream_ended(call, job, shares)
        if body.include_usage:
            yield CompletionResponse(
                id=job.request_id, created=created, model=lease.name, system_fingerprint=_fingerprint(lease),
                choices=[], usage=_usage(job, num_tokens), experts=experts,
            )

    async def _chat_chunks(self, job: Job, body: ChatCompletionRequest, call: Call) -> AsyncIterator[BaseModel]:
        lease, created = call.lease, int(time.time())

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None,
                  experts: dict[str, float] | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=job.request_id, created=created, model=lease.name, system_fingerprint=_fingerprint(lease),
                choices=choices, usage=usage, experts=experts,
            )

        role = Delta(role="assistant", content="")
        yield chunk([ChatChunkChoice(index=i, delta=role) for i in range(job.num_choices)])
        num_tokens, shares = 0, []
        async with aclosing(generation.run(self.executor, call.metrics, job, call.output)) as stream:
            async for index, out in stream:
                num_tokens += len(out.new_token_ids)
                if out.finished:
                    shares.append(out.experts)
                if not (out.new_text or out.finished or out.logprobs):
                    continue
                yield chunk([ChatChunkChoice(
                    index=index, delta=Delta(content=out.new_text or None),
                    logprobs=_chat_logprobs(out.logprobs) if body.logprobs else None,
                    finish_reason=out.finish_reason if out.finished else None,
                )], experts=self._experts([out.experts]) if out.finished else None)
        experts = self._stream_ended(call, job, shares)
        if body.include_usage:
            yield chunk([], _usage(job, num_tokens), experts)

    def _stream_ended(self, call: Call, job: Job, shares: list[tuple[float, ...] | None]) -> dict[str, float] | None:
        """A stream's choices all finished: what they were routed to, noted for its feedback."""
        experts = self._experts(shares)
        if experts is not None:
            call.note_experts(job.request_id, experts)
        return experts



def _fingerprint(lease: Lease) -> str:
    """Which build of which composition (and, routed, which member model) answered: changes with every replacement."""
    return f"{SYSTEM_FINGERPRINT}:{lease.revision.id}" + (f":{lease.member}" if lease.member else "")


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


def _check_prompt_sizes(engine: Engine, prompt: str | list[str] | list[int] | list[list[int]]) -> None:
    """Bound the work of tokenizing before it starts: text by its characters, token ids by their count."""
    single = isinstance(prompt, str) or not prompt or isinstance(prompt[0], int)
    for p in [prompt] if single else prompt:
        if isinstance(p, str):
            _check_chars(engine, len(p), "prompt")
        else:
            _check_length(engine, len(p), 1, "prompt")


def _check_chars(engine: Engine, chars: int, param: str) -> None:
    limit = MAX_CHARS_PER_TOKEN * engine.max_model_len
    if chars > limit:
        raise bad_request(
            f"the {param} has {chars} characters; this model's context of {engine.max_model_len} tokens "
            f"takes at most {limit}", param=param, code="context_length_exceeded",
        )


def _chat_prompt(engine: Engine, messages: list[dict[str, str]]) -> tuple[list[int], tuple[int, int] | None]:
    """The templated prompt's tokens, and those [start, end) of the last user message's content
    (what a sequence router scores: SamplingParams.route_span); None where it cannot be found."""
    try:
        text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # templates raise whatever they like (jinja errors, raise_exception, ...)
        raise APIError(
            422, f"the chat template of {engine.name!r} cannot render these messages: {e}",
            param="messages", code="chat_template_error",
        ) from e
    return content_tokens(engine.tokenizer, text, next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""))


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


Echoed = tuple[str, list[TokenLogprob]]  # an echoed prompt's first token, then its other tokens' logprobs


def _echo_texts(engine: Engine, prompt: str | list, prompts: list[list[int]]) -> list[str]:
    """What echo puts before each prompt's completions: the prompt as the request gave it, text
    as text and token ids decoded."""
    given = [prompt] if isinstance(prompt, str) else [None] if all(isinstance(t, int) for t in prompt) else prompt
    return [p if isinstance(p, str) else engine.tokenizer.decode(ids) for p, ids in zip(given, prompts)]


def _completion_logprobs(logprobs: list[TokenLogprob], offset: int, echoed: Echoed | None = None) -> CompletionLogprobs:
    out = CompletionLogprobs()
    if echoed is not None:
        first, prompt = echoed
        out.tokens.append(first)
        out.token_logprobs.append(None)
        out.top_logprobs.append(None)
        out.text_offset.append(offset)
        offset += len(first)
        logprobs = prompt + logprobs
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
