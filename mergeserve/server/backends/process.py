"""A child HTTP server kept alive: started, health-checked, restarted with backoff, stopped.

One monitor thread per child spawns it, waits for its /health, then waits on it. A child
that exits unexpectedly is `failed` until a restart (after 1, 2, 4 ... up to 30 s) is
healthy again. Stopping sends SIGTERM to the child's process group, then SIGKILL after a
grace period.

No orphans: the command runs under a reaper (backends/reaper.py) that takes the command's
whole process group down when the command exits, when it is told to stop, or when its
parent dies (PR_SET_PDEATHSIG), which covers a `mergeserve serve` killed with SIGKILL. The
monitor thread that spawned the reaper lives exactly as long as the child is managed, as
PR_SET_PDEATHSIG requires (it fires when the spawning thread exits).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

import httpx

log = logging.getLogger(__name__)

State = Literal["starting", "ready", "failed", "stopped"]
HEALTH_POLL_S = 0.5
MAX_BACKOFF_S = 30.0
STABLE_S = 60.0  # up this long: the next failure starts the backoff again from 1 s
REAPER_SLACK_S = 5.0
REAPER = Path(__file__).with_name("reaper.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManagedServer:
    def __init__(
        self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None,
        startup_timeout_s: float = 900.0, stop_grace_s: float = 30.0, log_lines: int = 200,
    ) -> None:
        self.name, self.argv, self.port = name, argv, port
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout_s, self.stop_grace_s = startup_timeout_s, stop_grace_s
        self.state: State = "starting"
        self.restarts = 0
        self.exit_code: int | None = None
        self.log_tail: deque[str] = deque(maxlen=log_lines)
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._monitor, name=f"mergeserve-child-{name}", daemon=True)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the first start is healthy; raise RuntimeError, with the log tail, if it
        exits or takes longer than the startup timeout."""
        deadline = time.monotonic() + (timeout or self.startup_timeout_s)
        with self._changed:
            while self.state == "starting" and time.monotonic() < deadline:
                self._changed.wait(HEALTH_POLL_S)
        if self.state != "ready":
            why = f"exited with code {self.exit_code}" if self.exit_code is not None else "did not become healthy in time"
            self.stop(wait=True)
            tail = "\n".join(list(self.log_tail)[-40:])
            raise RuntimeError(f"the server of {self.name!r} {why}; its log ends:\n{tail}")

    def stop(self, wait: bool = False) -> None:
        """SIGTERM to the child's group, SIGKILL after the grace period; returns at once unless `wait`."""
        self._stopping.set()
        stopper = threading.Thread(target=self._terminate, name=f"mergeserve-stop-{self.name}", daemon=True)
        stopper.start()
        if wait:
            stopper.join()

    def describe(self) -> dict[str, Any]:
        return {
            "state": self.state, "pid": self.pid, "port": self.port, "restarts": self.restarts,
            "exit_code": self.exit_code, "argv": self.argv, "log_tail": list(self.log_tail)[-50:],
        }

    # --- the monitor thread --------------------------------------------------------------
    def _monitor(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            started = time.monotonic()
            proc = self._spawn()
            healthy = self._await_health(proc)
            if healthy:
                self._set("ready")
                log.info("%s: server ready on port %d (pid %d)", self.name, self.port, proc.pid)
            code = proc.wait()
            if self._stopping.is_set():
                break
            self.exit_code = code
            self._set("failed")
            if not healthy and self.restarts == 0:
                return  # never came up: wait_ready reports it, and a build that fails does not retry
            log.error("%s: server exited with code %s; restarting in %.0f s", self.name, code, backoff)
            if time.monotonic() - started > STABLE_S:
                backoff = 1.0
            if self._stopping.wait(backoff):
                break
            backoff = min(2 * backoff, MAX_BACKOFF_S)
            self.restarts += 1
        self._set("stopped")

    def _spawn(self) -> subprocess.Popen:
        reaper = [sys.executable, str(REAPER), str(os.getpid()), str(self.stop_grace_s), "--"]
        proc = subprocess.Popen(
            [*reaper, *self.argv], env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace",
        )
        self._proc = proc
        threading.Thread(target=self._read_log, args=(proc,), name=f"mergeserve-log-{self.name}", daemon=True).start()
        return proc

    def _read_log(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.log_tail.append(line.rstrip("\n"))

    def _await_health(self, proc: subprocess.Popen) -> bool:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() < deadline and proc.poll() is None and not self._stopping.is_set():
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(HEALTH_POLL_S)
        if proc.poll() is None and not self._stopping.is_set():  # hung: treat as exited
            proc.terminate()
        return False

    def _terminate(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()  # the reaper: SIGTERM to the server's group, SIGKILL after the grace period
            try:
                proc.wait(self.stop_grace_s + REAPER_SLACK_S)
            except subprocess.TimeoutExpired:
                log.error("%s: the reaper did not exit; SIGKILL", self.name)
                proc.kill()
                proc.wait()
        self._set("stopped")

    def _set(self, state: State) -> None:
        with self._changed:
            if self.state != "stopped":
                self.state = state
            self._changed.notify_all()
