"""The soak harness (benchmarks/soak.py) for 60 seconds against the tiny models: 32 clients,
hostile requests, hot swaps and a failing build, then SIGTERM."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import soak  # noqa: E402

DURATION = int(__import__('os').environ.get('SOAK_SECONDS', 60))


@pytest.mark.slow
def test_a_minute_of_soak_passes_every_check(zoo, adapters, tmp_path):
    experts = {n: str(adapters[n]) for n in ("math", "code", "german")}
    result = soak.run_soak(str(zoo["base"]), experts, duration=DURATION, clients=32, swap_every=10, deadline=60,
                           threads=1, log=tmp_path / "server.log")
    failed = [name for name, ok in result["checks"].items() if not ok]
    # a string, not a tuple: pytest prints a string message whole, where it clips a structure's repr
    assert not failed, "\n".join([f"failed checks: {failed}", f"outcomes: {result['by_outcome']}", f"rss: {result['rss_mb']}",
                                   *map(str, result["failures"]), "server log, tracebacks:", *tracebacks(tmp_path / "server.log")])
    ok = sum(kinds.get("ok", 0) for kind, kinds in result["by_outcome"].items() if kind in ("chat", "completion"))
    assert ok >= 100 and result["by_outcome"].get("admin:swap", {}).get("ok", 0) >= DURATION // 10 - 1


def tracebacks(log: Path) -> list[str]:
    """The server log's tracebacks other than the failing build's (expected), each up to the next
    log line, last 3000 characters of each."""
    blocks = [re.split(r"\n(?=INFO|\d{4}-\d\d-\d\d )", b)[0] for b in log.read_text().split("Traceback (most recent call last):")[1:]]
    return [b[-3000:] for b in blocks if "CheckpointError" not in b and "SafetensorError" not in b]
