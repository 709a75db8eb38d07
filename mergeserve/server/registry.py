"""Registry: the one owner of the served engines, by composition name."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from mergeserve.server.errors import APIError

if TYPE_CHECKING:
    from mergeserve.engine.engine import Engine


class ModelNotFound(APIError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            404, f"the model {name!r} does not exist; served models: {', '.join(known) or 'none'}",
            param="model", code="model_not_found",
        )
        self.name = name


class Registry:
    def __init__(self, engines: Iterable[Engine] = ()) -> None:
        self._engines: dict[str, Engine] = {}
        # Request handlers read while admin routes (later) swap entries.
        self._lock = threading.Lock()
        for engine in engines:
            self.add(engine)

    def add(self, engine: Engine) -> None:
        with self._lock:
            if engine.name in self._engines:
                raise ValueError(f"a composition named {engine.name!r} is already registered")
            self._engines[engine.name] = engine

    def get(self, name: str) -> Engine:
        with self._lock:
            engine = self._engines.get(name)
            if engine is None:
                raise ModelNotFound(name, sorted(self._engines))
            return engine

    def names(self) -> list[str]:
        with self._lock:
            return list(self._engines)

    def engines(self) -> list[Engine]:
        with self._lock:
            return list(self._engines.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._engines)
