"""Executor: one thread steps every engine in turn and hands outputs to asyncio consumers.

The machine has two cores; engines of several compositions taking turns on one thread
beat competing threads, and each engine's state has exactly one thread touching it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from mergeserve.engine.coordinator import Mixture, add_mixed
from mergeserve.engine.engine import Engine, StepFailed
from mergeserve.engine.sequence import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while running a request."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class Executor:
    def __init__(self, threads: int | None = None) -> None:
        """`threads`: compute threads of the steps (None: torch's default). Set on the executor's
        own thread: OpenMP's thread count is per calling thread, so the main thread's does not carry."""
        self.threads = threads
        self._engines: list[Engine] = []
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="mergeserve-executor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def attach(self, engine: Engine) -> None:
        with self._lock:
            if engine not in self._engines:
                self._engines.append(engine)

    def detach(self, engine: Engine) -> None:
        with self._lock:
            if engine in self._engines:
                self._engines.remove(engine)

    async def generate(
        self, engine: Engine, request_id: str, prompt_ids: list[int], params: SamplingParams, mix: Mixture | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output deltas; closing the iterator early aborts the request.
        mix: decode it as a mixture of `engine`'s and other engines' distributions (coordinator.py)."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = stream
        for stepped in (engine, *(mix.engines if mix else ())):  # a mixed request's followers step too
            self.attach(stepped.host)
        finished = False
        try:
            if mix is None:
                engine.add_request(request_id, prompt_ids, params)
            else:
                add_mixed(engine, request_id, prompt_ids, params, mix)
            self._wake.set()
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise EngineError(str(item)) from item
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                engine.abort(request_id)
                self._wake.set()

    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        while not self._stop.is_set():
            with self._lock:
                busy = [e for e in self._engines if e.has_work()]
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            for engine in busy:
                self._step(engine)

    def _step(self, engine: Engine) -> None:
        try:
            outputs = engine.step()
        except StepFailed as failure:  # only the step's own requests fail; the engine goes on
            log.error("engine %s failed a step; ended %s", engine.name, failure.request_ids, exc_info=failure.__cause__)
            for request_id in failure.request_ids:
                self._deliver(request_id, failure.__cause__)
            outputs = failure.outputs
        except Exception as e:  # outside a step's requests (the scheduler): every request fails
            log.exception("engine %s failed", engine.name)
            for request_id in engine.abort_all():
                self._deliver(request_id, e)
            outputs = []
        for request_id, error in engine.take_refused():  # its admission raised: it fails alone
            self._deliver(request_id, error)
        for out in outputs:
            self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
