"""Runs a server command and takes its whole process group down with it: the guard between a
managed child and its parent.

    python .../reaper.py PARENT_PID GRACE_S -- COMMAND...

Run as a file, not a module of the package, so it starts in milliseconds (importing
mergeserve would import torch) and its death signal is armed before a parent can die unseen.

The command runs in a process group of its own. When it exits, whatever it left in that
group (vLLM leaves a multiprocessing resource tracker) is killed, and the reaper exits
with its code. On SIGTERM, sent by ManagedServer.stop or by the kernel when the parent
dies (PR_SET_PDEATHSIG, so a `mergeserve serve` killed with SIGKILL leaves nothing behind),
the group gets SIGTERM, then SIGKILL after GRACE_S.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
POLL_S = 0.2


def main(argv: list[str]) -> int:
    parent, grace, command = int(argv[0]), float(argv[1]), argv[argv.index("--") + 1:]
    die_with_parent(signal.SIGTERM)
    # The command dies with the reaper too, should the reaper itself be killed with SIGKILL.
    child = subprocess.Popen(command, start_new_session=True, preexec_fn=lambda: die_with_parent(signal.SIGKILL))

    stopping: list[float] = []  # when the stop signal came

    def stop(_signum: int, _frame: object) -> None:  # only signals: waiting happens below, not in a handler
        if not stopping:
            stopping.append(time.monotonic())
            _kill_group(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        stop(signal.SIGTERM, None)
    while True:
        try:
            code = child.wait(POLL_S)
            break
        except subprocess.TimeoutExpired:
            if stopping and time.monotonic() - stopping[0] > grace:
                _kill_group(child.pid, signal.SIGKILL)
    _kill_group(child.pid, signal.SIGKILL)  # what it left behind
    if stopping:
        return 128 + signal.SIGTERM
    return code if code >= 0 else 128 - code


def die_with_parent(sig: signal.Signals) -> None:
    try:
        ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, sig)
    except OSError:  # not Linux/glibc: ManagedServer.stop still reaches the reaper
        pass


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
