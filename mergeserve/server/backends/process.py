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

No borrowed secrets, no borrowed port: the child's environment holds only what child_env
passes on of this one (never this server's keys), and a child given an API key is trusted
only once its port refuses a request without that key and serves one with it; whatever else
answers there (the port is chosen before the child binds it) fails the start.
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
from collections.abc import Callable, Collection, Mapping
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
# What a child inherits of this process's environment; the rest (this server's API and admin
# keys, an upstream's key, cloud credentials) stays here.
INHERITED = {
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "PYTHONUNBUFFERED",
    "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
}
INHERITED_PREFIXES = ("LC_", "OMP_", "KMP_", "MKL_", "VLLM_", "CUDA_", "NVIDIA_", "NCCL_")


class Untrusted(RuntimeError):
    """The child's port answers without its API key: another process holds the port."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: Mapping[str, str] | None = None, withheld: Collection[str] = ()) -> dict[str, str]:
    """INHERITED (and INHERITED_PREFIXES) of this process's environment, less any variable whose
    value is one of `withheld`, plus `extra`."""
    inherited = {k: v for k, v in os.environ.items() if k in INHERITED or k.startswith(INHERITED_PREFIXES)}
    return {k: v for k, v in (inherited | dict(extra or {})).items() if v not in withheld}


class ManagedServer:
    def __init__(
        self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None, api_key: str | None = None,
        startup_timeout_s: float = 900.0, stop_grace_s: float = 30.0, log_lines: int = 200,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        """env: the child's whole environment (default: child_env()); api_key: the key the child
        requires on /v1 (it is told it in `env` or `argv`); None: /health alone says it is up.
        on_start: run once each start is healthy, before the child counts as ready (a restarted
        vLLM gets its runtime-loaded adapters back)."""
        self.name, self.argv, self.port, self.api_key = name, argv, port, api_key
        self.on_start = on_start
        self.env = child_env() if env is None else env
        self.untrusted: str | None = None  # why the port was not trusted, once it was not
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
            why = f"was not trusted: {self.untrusted}" if self.untrusted else why
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
            if healthy and self.on_start is not None:
                try:
                    self.on_start()
                except Exception:  # noqa: BLE001 - it serves what it has; the log says what is missing
                    log.exception("%s: restoring its state after the start failed", self.name)
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
        while time.monotonic() < deadline and proc.poll() is None and not self._stopping.is_set():
            try:
                if self._healthy():
                    return True
            except httpx.HTTPError:
                pass
            except Untrusted as e:
                self.untrusted = str(e)
                log.error("%s: %s", self.name, e)
                break
            time.sleep(HEALTH_POLL_S)
        if proc.poll() is None and not self._stopping.is_set():  # hung or untrusted: treat as exited
            proc.terminate()
        return False

    def _healthy(self) -> bool:
        """/health answers 200 and, for a child with an API key, its port proves to be the child's."""
        base = f"http://127.0.0.1:{self.port}"
        if httpx.get(f"{base}/health", timeout=2.0).status_code != 200:
            return False
        return self.api_key is None or self._owns_port(base)

    def _owns_port(self, base: str) -> bool:
        """/v1/models refuses no key and a wrong one (401) and serves the child's key; raises
        Untrusted when the port answers otherwise: a process that took the port first, or a child
        that ignores its key, would serve whoever asks."""
        for key, asked in ((None, "without a key"), ("not-" + str(self.api_key), "with a wrong key")):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            if (status := httpx.get(f"{base}/v1/models", headers=headers, timeout=2.0).status_code) != 401:
                raise Untrusted(f"port {self.port} answers {status} to /v1/models {asked}, not 401: another process "
                                "holds the port, or the child ignores its API key")
        status = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {self.api_key}"}, timeout=2.0).status_code
        if status in (401, 403):
            raise Untrusted(f"port {self.port} refuses the child's API key ({status}): another process holds the port")
        return status == 200

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
