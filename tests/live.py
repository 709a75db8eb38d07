"""A real uvicorn server on a free loopback port, for tests that talk HTTP to the app."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
