"""One API request fanned out to engine requests (n choices per prompt), merged back into one stream.

Closing or cancelling the merged stream closes every engine request's stream, and the
executor aborts what is still running: a client that goes away frees its slots.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from starlette.requests import Request

from mergeserve.engine.executor import EngineError
from mergeserve.engine.sequence import RequestOutput, SamplingParams, TokenLogprob
from mergeserve.server.errors import APIError, clip
from mergeserve.server.metrics import Metrics

if TYPE_CHECKING:
    from mergeserve.engine.coordinator import Mixture
    from mergeserve.engine.engine import Engine
    from mergeserve.engine.executor import Executor

T = TypeVar("T")
DISCONNECT_POLL_S = 0.2


@dataclass
class GeneratedChoice:
    """What one engine request has produced so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # echo: one per prompt token
    experts: tuple[float, ...] | None = None  # once finished: each expert's share of its routing

    def add(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        self.logprobs += out.logprobs
        if out.finished:
            self.finish_reason, self.experts = out.finish_reason, out.experts


@dataclass
class Job:
    engine: Engine
    request_id: str
    prompts: list[list[int]]
    n: int
    params: SamplingParams
    mix: Mixture | None = None  # decoded as a mixture of engine's and other engines' distributions (top-k request routing)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)  # once per prompt, however many choices it has

    def choice_params(self, j: int) -> SamplingParams:
        # Seeded choices of one prompt would otherwise all sample the same text.
        if self.params.seed is None or j == 0:
            return self.params
        return dataclasses.replace(self.params, seed=self.params.seed + j)


def run(
    executor: Executor, metrics: Metrics, job: Job, on_tokens: Callable[[int], None] | None = None,
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Submit every choice of `job`; yields (choice index, delta) as the engine produces them.
    `on_tokens`: told the count of every delta's new tokens."""
    followers = tuple(e.name for e in job.mix.engines) if job.mix else ()
    streams = [
        metrics.observe(job.engine.name, _engine_errors(executor.generate(
            job.engine, f"{job.request_id}-{i * job.n + j}", prompt, job.choice_params(j), job.mix,
        )), followers, on_tokens)
        for i, prompt in enumerate(job.prompts)
        for j in range(job.n)
    ]
    return _single(streams[0]) if len(streams) == 1 else _merge(streams)


async def collect(
    executor: Executor, metrics: Metrics, job: Job, on_tokens: Callable[[int], None] | None = None,
) -> list[GeneratedChoice]:
    choices = [GeneratedChoice(i) for i in range(job.num_choices)]
    async with aclosing(run(executor, metrics, job, on_tokens)) as stream:
        async for index, out in stream:
            choices[index].add(out)
    return choices


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client hangs up first (uvicorn does not cancel handlers)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "the client closed the request", code="client_closed_request")
    finally:
        task.cancel()


async def _engine_errors(stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """A failed engine step as a 500 in the OpenAI envelope (the engine itself goes on serving)."""
    async with aclosing(stream):
        try:
            async for out in stream:
                yield out
        except EngineError as e:
            # clip: a stream sends this in-band, past error_response's bound
            raise APIError(500, f"the engine failed while running this request: {clip(str(e))}", type="server_error",
                           code="engine_error") from e


async def _single(stream: AsyncIterator[RequestOutput]) -> AsyncIterator[tuple[int, RequestOutput]]:
    async with aclosing(stream):
        async for out in stream:
            yield 0, out


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with aclosing(stream):
                async for out in stream:
                    queue.put_nowait((index, out))
        except Exception as e:
            queue.put_nowait((index, e))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        # Not awaited: this frame may itself be under cancellation; each task aborts its
        # engine request as it unwinds.
        for task in tasks:
            task.cancel()
