"""Build every composition of a serve config into an engine and serve them with uvicorn."""

from __future__ import annotations

import logging
import time

import uvicorn

from mergeserve.engine.engine import Engine
from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve import merge
from mergeserve.server.app import create_app
from mergeserve.server.auth import Auth
from mergeserve.server.registry import Registry
from mergeserve.spec import ServeConfig

log = logging.getLogger(__name__)


def build_registry(config: ServeConfig, pool: ExpertPool | None = None) -> Registry:
    pool = pool or ExpertPool(config.source_roots or None)
    registry = Registry()
    for spec in config.compositions:
        start = time.perf_counter()
        composed = merge.build(spec, pool)
        registry.add(Engine(composed, config.engine))
        log.info(
            "built composition %r (%d experts, router %s top-%d) in %.2f s",
            spec.name, len(spec.experts), spec.router.kind, spec.router.top_k, time.perf_counter() - start,
        )
    return registry


def serve(config: ServeConfig) -> None:
    registry = build_registry(config)
    auth = Auth.from_config(config)
    app = create_app(registry, Executor(), auth)
    log.info("serving %s on http://%s:%d", ", ".join(registry.names()), config.host, config.port)
    log.info("API keys: %s", f"{len(auth.api_keys)} configured" if auth.api_keys else "none, /v1 is open")
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
