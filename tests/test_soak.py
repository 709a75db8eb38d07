"""The soak harness (benchmarks/soak.py) for 60 seconds against the tiny models: 32 clients,
hostile requests, hot swaps and a failing build, then SIGTERM."""

from __future__ import annotations

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
    assert not failed, (failed, result["by_outcome"], result["failures"], result["rss_mb"], (tmp_path / "server.log").read_text()[-3000:])
    ok = sum(kinds.get("ok", 0) for kind, kinds in result["by_outcome"].items() if kind in ("chat", "completion"))
    assert ok >= 100 and result["by_outcome"].get("admin:swap", {}).get("ok", 0) >= DURATION // 10 - 1
