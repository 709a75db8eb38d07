"""`mergeserve serve` as a cluster runs it: /health as soon as it listens, /ready once something
serves, SIGTERM drains, and `--watch` applies edits of the config file (a mounted ConfigMap)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import yaml

from live import free_port, server_process, wait_until

ADMIN = {"Authorization": "Bearer admin-key"}


def moe(zoo: dict[str, Path], name: str, *experts: str) -> dict:
    return {
        "name": name, "base": str(zoo["base"]), "router": {"kind": "random", "top_k": 1},
        "experts": [{"name": e, "source": str(zoo[e])} for e in experts],
    }


def write(config: Path, **fields: object) -> None:
    """Replace the file the way the kubelet updates a mounted ConfigMap: a new file renamed over it."""
    staged = config.with_suffix(".new")
    staged.write_text(yaml.safe_dump({"admin_key": "admin-key", "engine": {"max_model_len": 512}} | fields))
    staged.replace(config)


def served(http: httpx.Client) -> dict[str, int | None]:
    return {c["name"]: c["serving_revision"] for c in http.get("/admin/compositions").json()["data"]}


def test_health_answers_at_once_and_ready_waits_for_a_composition(zoo: dict[str, Path], tmp_path: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: the build fails, the server stays up
    config = tmp_path / "serve.yaml"
    write(config, compositions=[{"name": "remote", "backend": "openai", "upstream": {"url": nowhere}}], upstream_allowlist=[nowhere])
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mergeserve.cli", "serve", "--config", str(config), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=ADMIN, timeout=30) as http:
            wait_until(lambda: _status(http, "/health") == 200, timeout=60, what="the listener")
            wait_until(lambda: http.get("/admin/compositions/remote").json()["state"] == "failed", what="the build")
            assert http.get("/ready").status_code == 503 and http.get("/health").status_code == 200
            assert http.put("/admin/compositions/local", json=moe(zoo, "local", "code")).status_code == 202
            wait_until(lambda: http.get("/ready").status_code == 200, what="local to serve")
            assert http.get("/ready").json()["models"] == ["local"]
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_turns_ready_off_first_and_lets_streams_finish(zoo: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    write(config, compositions=[moe(zoo, "moe", "code", "math")], drain_delay_s=0.5, grace_period_s=60)
    with server_process(config, port := free_port(), tmp_path / "log") as (http, proc):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        streams: list[list[tuple[float, object]]] = [[] for _ in range(6)]  # (arrival, chunk) per stream

        def read(chunks: list) -> None:
            for chunk in client.completions.create(
                    model="moe", prompt="Once", max_tokens=480, stream=True, stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True}):
                chunks.append((time.monotonic(), chunk))

        readers = [threading.Thread(target=read, args=(chunks,)) for chunks in streams]
        for r in readers:
            r.start()
        wait_until(lambda: all(streams), what="the streams to start")
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_until(lambda: _status(http, "/ready") == 503, timeout=5, what="/ready to turn 503")
        assert http.get("/ready").json()["draining"] is True
        for r in readers:
            r.join(timeout=60)
        for chunks in streams:  # every stream finished, none was cut off
            assert chunks[-2][1].choices[0].finish_reason == "length"
            assert chunks[-1][1].usage.completion_tokens == 480
        assert max(chunks[-1][0] for chunks in streams) - signalled > 0.5  # they ran on after the listener closed
        assert proc.wait(timeout=30) == 0  # a drained SIGTERM is a clean exit
        assert _status(http, "/health") is None  # the listener is closed


def test_watch_applies_edits_of_the_config_file(zoo: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    write(config, compositions=[moe(zoo, "first", "code"), moe(zoo, "second", "math")])
    with server_process(config, free_port(), tmp_path / "log", "--watch", headers=ADMIN) as (http, _):
        wait_until(lambda: served(http) == {"first": 1, "second": 1}, what="both to serve")
        write(config, compositions=[moe(zoo, "first", "code", "math"), moe(zoo, "third", "german")],
              aliases={"ab": {"targets": {"first": 1.0, "third": 3.0}}})
        # first changed: hot-swapped to revision 2; second removed: drained; third and the alias added.
        wait_until(lambda: served(http) == {"first": 2, "third": 1}, timeout=60, what="the edit to apply")
        [alias] = http.get("/admin/aliases").json()["data"]
        assert alias["name"] == "ab" and alias["targets"] == alias["weights"] == {"first": 1.0, "third": 3.0}
        answer = http.post("/v1/completions", json={"model": "ab", "prompt": "hi", "max_tokens": 2})
        assert answer.status_code == 200 and answer.json()["model"] in ("first", "third")

        config.write_text("compositions: [unclosed")  # a broken edit is refused; everything keeps serving
        time.sleep(5)
        assert served(http) == {"first": 2, "third": 1}
        write(config, compositions=[moe(zoo, "first", "code", "math")])  # the alias and third go
        wait_until(lambda: served(http) == {"first": 2}, timeout=60, what="third to go")
        assert http.get("/admin/aliases").json()["data"] == []


def _status(http: httpx.Client, path: str) -> int | None:
    try:
        return http.get(path).status_code
    except httpx.TransportError:
        return None


def test_a_replica_restarted_with_watch_comes_back_to_what_the_file_says_now(zoo: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    write(config, compositions=[moe(zoo, "first", "code")], state_dir="state")
    port = free_port()
    with server_process(config, port, tmp_path / "log", "--watch", headers=ADMIN) as (http, _):
        assert served(http) == {"first": 1}
    # Edited while the replica was down: its saved state says otherwise.
    write(config, compositions=[moe(zoo, "first", "code", "math")], state_dir="state",
          aliases={"ab": {"targets": {"first": 1.0}}})
    with server_process(config, port, tmp_path / "log", "--watch", headers=ADMIN) as (http, _):
        wait_until(lambda: served(http) == {"first": 2}, timeout=60, what="the file's version")
        assert [e["name"] for e in http.get("/admin/compositions/first").json()["spec"]["experts"]] == ["code", "math"]
        assert [a["name"] for a in http.get("/admin/aliases").json()["data"]] == ["ab"]
