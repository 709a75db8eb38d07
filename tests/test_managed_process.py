"""A managed child server (what runs vLLM): healthy before it serves, SIGTERM then SIGKILL when
stopped, and never left behind by a parent that is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from live import free_port, wait_until
from mergeserve.server.backends.process import ManagedServer

# A stand-in server: answers 200 on every GET; with --ignore-term it shrugs off SIGTERM.
CHILD = textwrap.dedent('''
    import http.server, signal, sys
    if "--ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
        def log_message(self, *args):
            pass
    print("listening", flush=True)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
''')


def child_argv(tmp_path: Path, port: int, *args: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return [sys.executable, str(script), str(port), *args]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    port = free_port()
    server = ManagedServer("stubborn", child_argv(tmp_path, port, "--ignore-term"), port, stop_grace_s=1.0)
    server.start()
    server.wait_ready(30)
    assert server.log_tail[-1] == "listening"
    reaper, start = server.pid, time.monotonic()
    child = int(Path(f"/proc/{reaper}/task/{reaper}/children").read_text().split()[0])
    server.stop(wait=True)
    assert time.monotonic() - start >= 1.0 and server.state == "stopped"
    assert not alive(reaper) and not alive(child)


def test_a_child_that_never_becomes_healthy_fails_its_start_with_its_log(tmp_path: Path) -> None:
    port = free_port()
    server = ManagedServer("broken", [sys.executable, "-c", "print('no model here'); raise SystemExit(3)"], port)
    server.start()
    with pytest.raises(RuntimeError, match="(?s)exited with code 3.*no model here"):
        server.wait_ready(30)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_no_child_outlives_a_parent_killed_with_sigkill(tmp_path: Path) -> None:
    port = free_port()
    parent = textwrap.dedent(f'''
        import sys, time
        from mergeserve.server.backends.process import ManagedServer
        server = ManagedServer("child", {child_argv(tmp_path, port)!r}, {port})
        server.start()
        server.wait_ready(30)
        print(server.pid, flush=True)
        time.sleep(600)
    ''')
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    reaper = int(proc.stdout.readline())
    server = int(Path(f"/proc/{reaper}/task/{reaper}/children").read_text().split()[0])
    assert alive(reaper) and alive(server)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    wait_until(lambda: not alive(reaper) and not alive(server), timeout=10, what="the orphans to die")
