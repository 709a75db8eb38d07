"""Placement: which engine serves a composition. One engine per base serves every composition that
is low-rank over that base (engine/base_engine.py); any other composition gets an engine of its own.

The builder owns one `BaseEngines`; a base engine lives while a composition is placed on it.
"""

from __future__ import annotations

import logging
import threading

from mergeserve.composition import ComposedModel
from mergeserve.engine.base_engine import BaseEngine, Placed, engine_key
from mergeserve.engine.executor import Executor
from mergeserve.engine.tables import NotLowRank, base_of
from mergeserve.kernels.packed import WeightPacker
from mergeserve.spec import EngineConfig

log = logging.getLogger(__name__)


class BaseEngines:
    """Placement by policy (EngineConfig.placement): `base` places every low-rank composition on its
    base's engine; `own` none; `auto` keeps a low-rank composition alone on its base in an engine of
    its own (measured faster: it runs its merges materialised) and, when a second one over that base
    arrives, starts the base engine for it and names the first to move there (`place`'s movers)."""

    def __init__(self, config: EngineConfig, packer: WeightPacker, executor: Executor) -> None:
        self.config, self.packer, self.executor = config, packer, executor
        self._engines: dict[tuple[int, ...], BaseEngine] = {}  # base key -> its engine
        self._alone: dict[tuple[int, ...], dict[str, str]] = {}  # auto: base key -> {name: revision id} in engines of their own
        self._lock = threading.Lock()

    def place(self, composed: ComposedModel, owner: str) -> tuple[Placed | None, list[str]]:
        """`composed` (built for revision `owner`) on its base's engine, and the names of compositions
        that should move there now (rebuilt: auto's first one on the base); (None, []) where it runs in
        an engine of its own: not low-rank (the reason is logged), or alone on its base under auto."""
        if self.config.placement == "own":
            return None, []
        try:
            key = engine_key(base_of(composed), composed.int8)
        except NotLowRank as e:
            log.info("composition %s runs in an engine of its own: %s", composed.name, e)
            return None, []
        with self._lock:
            engine = self._engines.get(key)
            alone = {n: r for n, r in self._alone.get(key, {}).items() if n != composed.name}
            if engine is None and self.config.placement == "auto" and not alone:
                self._alone.setdefault(key, {})[composed.name] = owner
                return None, []
            for name in alone:  # named once: they move now
                del self._alone[key][name]
            if engine is None:
                engine = self._engines[key] = BaseEngine(composed, self.config, self.packer)
                self.executor.attach(engine)
        try:
            placed = engine.place(composed)
        except NotLowRank as e:
            log.info("composition %s runs in an engine of its own: %s", composed.name, e)
            self._drop_if_empty(engine)
            return None, []
        return placed, sorted(alone)

    def forget(self, owner: str) -> None:
        """Revision `owner` is freed: it no longer counts as a composition alone on its base."""
        with self._lock:
            for names in self._alone.values():
                for name in [n for n, r in names.items() if r == owner]:
                    del names[name]

    def release(self, placed: Placed) -> None:
        """A placed composition's revision is freed: its tables go, and its base engine once it is empty."""
        placed.close()
        self._drop_if_empty(placed.base_engine)

    def _drop_if_empty(self, engine: BaseEngine) -> None:
        with self._lock:
            if not engine.placed and self._engines.get(engine.base_key) is engine:
                del self._engines[engine.base_key]
                self.executor.detach(engine)
