"""Build the compositions of a serve config (or restore the saved ones) and serve them with uvicorn."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
import uvicorn

from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve.kernels.capability import resolve_dtype
from mergeserve.server.app import create_app
from mergeserve.server.auth import Auth
from mergeserve.server.builder import Builder
from mergeserve.server.registry import Registry
from mergeserve.server.state import StateStore
from mergeserve.spec import ServeConfig

log = logging.getLogger(__name__)


def start(config: ServeConfig) -> tuple[Registry, Builder, Executor]:
    """Everything but HTTP: the registry, serving what the state dir saved (else the config's compositions)."""
    # The executor thread hands the GIL to the event loop at every op and needs it back at once.
    sys.setswitchinterval(0.0005)  # measured: 1 client 17.2 -> 18.2 tok/s, 16 clients 99 -> 118 (5 ms default)
    threads = config.engine.threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)  # this thread's (builds run on their own and set theirs)
    registry, executor = Registry(), Executor(threads)
    pool = ExpertPool(config.source_roots or None, config.max_source_file_bytes, config.lora, resolve_dtype(config.dtype))
    store = StateStore(config.state_dir) if config.state_dir else None
    builder = Builder(registry, pool, executor, config.engine, store)
    builder.restore(config.compositions)
    return registry, builder, executor


def serve(config: ServeConfig, relative_to: Path = Path(".")) -> None:
    """`relative_to`: where relative sources in admin specs point when no source roots are set."""
    registry, builder, executor = start(config)
    auth = Auth.from_config(config)
    roots = config.source_roots
    app = create_app(registry, executor, auth, builder, Path(roots[0]) if roots else relative_to, config.max_compositions)
    log.info("serving %s on http://%s:%d", ", ".join(registry.names()) or "nothing yet", config.host, config.port)
    log.info("API keys: %s", f"{len(auth.api_keys)} configured" if auth.api_keys else "none, /v1 is open")
    log.info("admin API: %s", "enabled" if auth.admin_key else "disabled (no admin key)")
    log.info("state: %s", config.state_dir or "not saved (no state_dir)")
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
