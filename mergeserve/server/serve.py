"""Serve a config with uvicorn: listen at once, build (or restore) the compositions behind it.

/health answers as soon as the process listens; /ready once a composition serves. SIGTERM
drains: /ready turns 503, the listener closes `drain_delay_s` later, and requests in
flight (streams included) get `grace_period_s` to finish. `--watch` applies edits of the
config file (a mounted ConfigMap) to the running server (server/watch.py).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from sse_starlette.sse import AppStatus

from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve.kernels.capability import resolve_dtype, resolve_format, usable_cpus
from mergeserve.server.admin_routes import AdminLimits
from mergeserve.server.app import create_app
from mergeserve.server.auth import Auth
from mergeserve.server.backends.policy import BackendPolicy
from mergeserve.server.builder import Builder
from mergeserve.server.registry import Registry
from mergeserve.server.state import StateStore
from mergeserve.spec import ServeConfig

log = logging.getLogger(__name__)


def start(config: ServeConfig) -> tuple[Registry, Builder, Executor]:
    """Everything but HTTP: the registry, and a builder that has checked every source and begun
    building what the state dir saved (else the config's compositions and aliases)."""
    # The executor thread hands the GIL to the event loop at every op and needs it back at once:
    # at the default 5 ms interval each op could wait that long for the event loop to let it go.
    sys.setswitchinterval(0.0005)
    threads = config.engine.threads or usable_cpus()  # the container's limit, not the node's cores
    # This thread only serves HTTP: one OpenMP thread, so it never holds a team of its own (a
    # second live team slows the executor down; see Builder._build_on_own_thread).
    torch.set_num_threads(1)
    registry, executor = Registry(), Executor(threads)
    weights = resolve_format(config.dtype)  # int8: held in bfloat16, run as int8
    pool = ExpertPool(config.source_roots or None, config.max_source_file_bytes, config.lora, resolve_dtype(weights),
                      int8=weights == "int8")
    store = StateStore(config.state_dir) if config.state_dir else None
    exports = config.export_dir or (str(Path(config.state_dir) / "exports") if config.state_dir else None)
    policy = BackendPolicy.from_config(config, Auth.from_config(config))
    builder = Builder(registry, pool, executor, config.engine, store, Path(exports) if exports else None,
                      policy, config.build_timeout_s)
    for spec in config.compositions:
        builder.check(spec)  # a missing or disallowed source, upstream or profile stops the start, before anything listens
    builder.restore(config.compositions, config.aliases)
    return registry, builder, executor


def serve(config: ServeConfig, relative_to: Path = Path("."), watch: Path | None = None) -> None:
    """`relative_to`: where relative sources in admin specs point when no source roots are set;
    `watch`: the config file to follow."""
    registry, builder, executor = start(config)
    auth = Auth.from_config(config)
    roots = config.source_roots
    app = create_app(registry, executor, auth, builder, Path(roots[0]) if roots else relative_to,
                     AdminLimits.from_config(config))
    log.info("serving on http://%s:%d; building %s", config.host, config.port, ", ".join(registry.all_names()) or "nothing")
    log.info("API keys: %s", f"{len(auth.api_keys)} configured" if auth.api_keys else "none, /v1 is open")
    log.info("admin API: %s", "enabled" if auth.admin_key else "disabled (no admin key)")
    log.info("state: %s", config.state_dir or "not saved (no state_dir)")
    if watch is not None:
        from mergeserve.server.watch import ConfigWatcher

        ConfigWatcher(watch, builder).start()
    # Streams finish on their own during the grace period instead of being cut at the signal.
    AppStatus.disable_automatic_graceful_drain()
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                        timeout_graceful_shutdown=config.grace_period_s)
    # uvicorn re-raises the signal it handled once it has shut down; a drained SIGTERM is a
    # clean exit (status 0), which is what an orchestrator expects of a graceful stop.
    signal.signal(signal.SIGTERM, lambda *_: log.info("drained; exiting"))
    DrainingServer(uv, app, config.drain_delay_s).run()


class DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT marks the app draining (/ready 503) and stops uvicorn
    `delay_s` later; a second one is uvicorn's own (force exit)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, delay_s: float) -> None:
        super().__init__(config)
        self.app, self.delay_s = app, delay_s

    def handle_exit(self, sig: int, frame) -> None:
        if self.app.state.draining:
            super().handle_exit(sig, frame)
            return
        self.app.state.draining = True
        log.info("shutting down: /ready is 503; closing the listener in %.0f s", self.delay_s)
        stop = threading.Timer(self.delay_s, super().handle_exit, (sig, frame))
        stop.daemon = True
        stop.start()
