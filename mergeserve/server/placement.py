"""Placement: which engine serves a composition. One engine per base serves every composition that
is low-rank over that base (engine/base_engine.py); any other composition gets an engine of its own.

The builder owns one `BaseEngines`; a base engine lives while a composition is placed on it.
"""

from __future__ import annotations

import logging
import threading

from mergeserve.composition import ComposedModel
from mergeserve.engine.base_engine import BaseEngine, Placed
from mergeserve.engine.executor import Executor
from mergeserve.engine.tables import NotLowRank, base_of
from mergeserve.kernels.packed import WeightPacker
from mergeserve.spec import EngineConfig

log = logging.getLogger(__name__)


class BaseEngines:
    def __init__(self, config: EngineConfig, packer: WeightPacker, executor: Executor) -> None:
        self.config, self.packer, self.executor = config, packer, executor
        self._engines: dict[tuple[int, ...], BaseEngine] = {}  # base key -> its engine
        self._lock = threading.Lock()

    def place(self, composed: ComposedModel) -> Placed | None:
        """`composed` on its base's engine (started when it is the first); None when it is not
        low-rank over its base (the reason is logged) and needs an engine of its own."""
        try:
            key = base_of(composed).key()
        except NotLowRank as e:
            log.info("composition %s runs in an engine of its own: %s", composed.name, e)
            return None
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = BaseEngine(composed, self.config, self.packer)
                self.executor.attach(engine)
        try:
            return engine.place(composed)
        except NotLowRank as e:
            log.info("composition %s runs in an engine of its own: %s", composed.name, e)
            self._drop_if_empty(engine)
            return None

    def release(self, placed: Placed) -> None:
        """A placed composition's revision is freed: its tables go, and its base engine once it is empty."""
        placed.close()
        self._drop_if_empty(placed.base_engine)

    def _drop_if_empty(self, engine: BaseEngine) -> None:
        with self._lock:
            if not engine.placed and self._engines.get(engine.base_key) is engine:
                del self._engines[engine.base_key]
                self.executor.detach(engine)
