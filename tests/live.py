"""A real uvicorn server on a free loopback port, for tests that talk HTTP to the app: any FastAPI
app (live_server), mergeserve's gateway with clients of it (live_gateway), or `mergeserve serve`
in a process of its own (server_process)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import httpx
import openai
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from tiny import engine_for

from mergeserve.server import Registry, create_app
from mergeserve.server.auth import Auth
from mergeserve.server.backends.local import LocalBackend

if TYPE_CHECKING:
    from mergeserve.engine.engine import Engine
    from mergeserve.engine.executor import Executor
    from mergeserve.experts import ExpertPool
    from mergeserve.server.admin_routes import AdminLimits
    from mergeserve.server.builder import Builder
    from mergeserve.server.registry import Revision
    from mergeserve.spec import CompositionSpec, EngineConfig


def wait_until(condition: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def is_up(http: httpx.Client) -> bool:
    try:
        return http.get("/health").status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def live_server(app: FastAPI, **options: object) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL. `options` go to uvicorn.Config."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held until uvicorn takes the socket over
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, **({"log_level": "warning"} | options)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    with httpx.Client(base_url=url, timeout=30) as http:
        wait_until(lambda: is_up(http), what="the server to come up")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_ready(http: httpx.Client) -> bool:
    try:
        return http.get("/ready").status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def server_process(
    config: Path, port: int, log: Path, *args: str, headers: dict[str, str] | None = None,
) -> Iterator[tuple[httpx.Client, subprocess.Popen]]:
    """`mergeserve serve --config CONFIG --port PORT [ARGS]` in its own process, ready (a composition
    serves) when the block starts; killed with SIGKILL (no clean shutdown) at the end, if still running."""
    with log.open("a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mergeserve.cli", "serve", "--config", str(config), "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"},
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as http:
            wait_until(lambda: is_ready(http) or proc.poll() is not None, timeout=120, what="the server")
            assert proc.poll() is None, log.read_text()
            yield http, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def built(builder: Builder, spec: CompositionSpec) -> Revision:
    """`spec` built the way PUT /admin/compositions builds it (Builder.submit), once the build has ended."""
    revision, build = builder.submit(spec)
    build.result()
    return revision


def local_registry(
    executor: Executor, config: EngineConfig, *specs: CompositionSpec, pool: ExpertPool | None = None,
) -> Registry:
    """A registry serving each of `specs` in this process, built from `pool` (a fresh pool for each where None)."""
    return Registry([LocalBackend(engine_for(spec, config, pool), executor) for spec in specs])


@dataclass
class Gateway:
    """mergeserve's app served by live_gateway, and clients of it."""

    url: str
    http: httpx.Client  # sends live_gateway's `headers` with every request
    client: openai.OpenAI  # on /v1 with key "x": client_with_key where the server checks keys
    registry: Registry
    executor: Executor
    builder: Builder | None
    admin: dict[str, str]  # the admin key's Authorization header that put and status send (empty: none)

    @property
    def engine(self) -> Engine:
        """The engine of the first composition served in this process, in the order the registry got them."""
        return next(b.engine for b in self.registry.backends() if isinstance(b, LocalBackend))

    def client_with_key(self, api_key: str) -> openai.OpenAI:
        return self.client.with_options(api_key=api_key)

    def put(self, name: str, spec: dict) -> httpx.Response:
        return self.http.put(f"/admin/compositions/{name}", json=spec, headers=self.admin)

    def status(self, name: str) -> dict:
        return self.http.get(f"/admin/compositions/{name}", headers=self.admin).json()

    def settled(self, name: str) -> dict:
        """`name`'s status once no build of it is under way."""
        wait_until(lambda: self.status(name)["state"] != "building", what=f"{name} to build")
        return self.status(name)

    def put_and_wait(self, name: str, spec: dict) -> dict:
        """PUT `spec` (accepted: 202), then its status once that revision has built, failed or been replaced."""
        response = self.put(name, spec)
        assert response.status_code == 202, response.text
        revision = response.json()["revision"]
        wait_until(lambda: self.status(name)["state"] != "building" or self.status(name)["revision"] != revision,
                   what=f"{name} revision {revision} to build")
        return self.status(name)

    def scrape(self) -> list:
        """Every sample /metrics serves."""
        return [s for family in text_string_to_metric_families(self.http.get("/metrics").text) for s in family.samples]


G = TypeVar("G", bound=Gateway)


@contextmanager
def live_gateway(
    registry: Registry, executor: Executor, auth: Auth = Auth(), builder: Builder | None = None, *,
    limits: AdminLimits | None = None, headers: dict[str, str] | None = None, timeout: float = 30,
    client_timeout: float | httpx.Timeout = openai.DEFAULT_TIMEOUT, uvicorn_options: dict[str, object] | None = None,
    kind: type[G] = Gateway, **fields: object,
) -> Iterator[G]:
    """`create_app(registry, executor, auth, builder, limits)` served until the block ends, as a `kind`:
    a Gateway, or a test's own subclass of it with more `fields`. `http` sends `headers` with every
    request and waits `timeout` seconds for an answer, `client` waits `client_timeout`;
    `uvicorn_options` go to live_server."""
    app = create_app(registry, executor, auth, builder, **({} if limits is None else {"limits": limits}))
    admin = {"Authorization": f"Bearer {auth.admin_key}"} if auth.admin_key else {}
    with live_server(app, **(uvicorn_options or {})) as url, \
            httpx.Client(base_url=url, headers=headers, timeout=timeout) as http:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=client_timeout)
        yield kind(url, http, client, registry, executor, builder, admin, **fields)
