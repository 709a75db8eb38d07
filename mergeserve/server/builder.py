"""Builder: turns composition specs into engines off the request path, one build at a time.

A build claims its checkpoints in the pool under the revision's name, so the pool unloads
an expert once no live or draining revision uses it. Every change of what is served is
written to the state store (when there is one) so a restart serves the same set.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from mergeserve import merge
from mergeserve.engine.engine import Engine
from mergeserve.engine.executor import Executor
from mergeserve.experts import CheckpointError, ExpertPool
from mergeserve.server.registry import Registry, Revision
from mergeserve.server.state import SavedComposition, SavedState, StateStore, dump_spec
from mergeserve.spec import CompositionSpec, EngineConfig, parse_composition

log = logging.getLogger(__name__)


class Builder:
    def __init__(
        self, registry: Registry, pool: ExpertPool, executor: Executor,
        engine_config: EngineConfig = EngineConfig(), store: StateStore | None = None,
    ) -> None:
        self.registry, self.pool, self.executor = registry, pool, executor
        self.engine_config, self.store = engine_config, store
        registry.on_free = self.free
        # Two cores: builds queue behind each other rather than compete with serving and each other.
        # A build thread computes with the executor's thread count (OpenMP's count is per thread).
        threads = () if executor.threads is None else (executor.threads,)
        self._queue = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="mergeserve-build",
            initializer=torch.set_num_threads if threads else None, initargs=threads,
        )
        self._save_lock = threading.Lock()

    def check(self, spec: CompositionSpec) -> None:
        """Refuse, before building, sources outside the pool's roots or over its size limit."""
        for source in dict.fromkeys(spec.source_paths):
            self.pool.check_allowed(Path(source))

    def submit(self, spec: CompositionSpec, number: int | None = None) -> tuple[Revision, Future]:
        """Start building `spec` in the background; it replaces the live revision once ready."""
        self.check(spec)
        revision = self.registry.begin(spec.name, spec, number)
        self.save()  # a crash before the build ends rebuilds it on restart
        return revision, self._queue.submit(self._build, revision)

    def build_now(self, spec: CompositionSpec, number: int | None = None) -> Revision:
        revision, future = self.submit(spec, number)
        future.result()
        return revision

    def restore(self, initial: list[CompositionSpec]) -> None:
        """Serve the saved state if there is one, else `initial` (the config's compositions).

        Saved compositions that no longer build (a source was deleted) are reported as failed;
        the server still starts with the rest.
        """
        saved = self.store.load() if self.store else None
        if saved is None:
            for spec in initial:
                if (revision := self.build_now(spec)).state == "failed":
                    raise CheckpointError(f"composition {spec.name!r}: {revision.error}")
            return
        for name, entry in saved.compositions.items():
            self._restore_one(name, entry)
        for name, entry in saved.pending.items():
            self._restore_one(name, entry)
        known = set(self.registry.all_names())
        for name, alias in saved.aliases.items():
            alias = alias.model_copy(update={"targets": {t: w for t, w in alias.targets.items() if t in known}})
            if alias.targets:
                self.registry.set_alias(name, alias)
            else:
                log.error("alias %r not restored: none of its targets could be built", name)
        self.save()

    def _restore_one(self, name: str, entry: SavedComposition) -> None:
        try:
            spec = parse_composition(entry.spec, origin=f"saved composition {name!r}")
            revision = self.build_now(spec, entry.revision)
        except Exception as e:  # noqa: BLE001 - a stale entry must not stop the others from serving
            log.error("saved composition %r not restored: %s", name, e)
            return
        if revision.state == "failed":
            log.error("saved composition %r revision %d failed to build: %s", name, revision.number, revision.error)

    def _build(self, revision: Revision) -> None:
        start = time.perf_counter()
        try:
            with self.pool.claim(revision.id):
                engine = Engine(merge.build(revision.spec, self.pool), self.engine_config, self.pool.packer)
        except Exception as e:  # noqa: BLE001 - any failure is the build's result, reported to the admin
            log.exception("building %s failed", revision.id)
            self.registry.fail(revision, f"{type(e).__name__}: {e}")
            self.save()
            return
        seconds = time.perf_counter() - start
        release_free_heap()
        self.registry.install(revision, engine, seconds, own_bytes(engine, self.pool))
        log.info("composition %s ready in %.2f s", revision.id, seconds)
        self.save()

    def free(self, revision: Revision, engine: Engine | None) -> None:
        """Registry callback: `revision` is retired and drained (or failed); drop what it held."""
        if engine is not None:
            self.executor.detach(engine)
        unloaded = self.pool.release(revision.id)
        log.info("freed %s%s", revision.id, f"; unloaded {unloaded}" if unloaded else "")

    def snapshot(self) -> SavedState:
        state = SavedState(aliases=self.registry.aliases())
        for name, live, latest in self.registry.entries():
            if live is not None and live.spec is not None:
                state.compositions[name] = SavedComposition(revision=live.number, spec=dump_spec(live.spec))
            if latest is not None and latest.state == "building" and latest.spec is not None:
                state.pending[name] = SavedComposition(revision=latest.number, spec=dump_spec(latest.spec))
        return state

    def save(self) -> None:
        if self.store is None:
            return
        with self._save_lock:  # snapshot and write together, so an older snapshot never lands last
            self.store.save(self.snapshot())

    def shutdown(self) -> None:
        self._queue.shutdown(wait=False, cancel_futures=True)


def own_bytes(engine: Engine, pool: ExpertPool) -> int:
    """Bytes this engine holds beyond the pool's checkpoints: merged shared layers, routers, the
    LoRA kernel's stacked factors, packed weights. The KV cache is reserved address space, backed only where
    written, so it is not counted here."""
    shared = pool.storage_ptrs()
    storages = {}
    for t in [*engine.composed.tensors(), *engine.model.held()]:
        storage = t.untyped_storage()
        if storage.data_ptr() not in shared:
            storages[storage.data_ptr()] = storage.nbytes()
    # Packed copies (oneDNN layout) of the weights it runs; shared with engines over the same tensors.
    return sum(storages.values()) + sum(p.shape.numel() * p.source.element_size() for p in engine.model.packed())


def release_free_heap() -> None:
    """Hand the heap a build freed back to the OS (glibc keeps it otherwise): loading dequantises
    GGUF to fp32 and casts, merges make transient dense copies. Measured on the demo server (bf16)
    after its first request: 1256 MB resident without this, 1161 MB with it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
