"""A real uvicorn server on a free loopback port, for tests that talk HTTP to the app."""

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
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI


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
