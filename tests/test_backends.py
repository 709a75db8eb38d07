"""Compositions served elsewhere, behind the same gateway: `backend: openai` proxies any
OpenAI-compatible server (here a second `mergeserve serve` process over real HTTP), and a
managed child server is restarted when it dies. Aliases, metrics and hot swap work across them."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from live import Gateway as LiveGateway
from live import built, free_port, live_gateway, server_process, wait_until
from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve.server.auth import Auth
from mergeserve.server.backends.policy import BackendPolicy
from mergeserve.server.backends.process import ManagedServer, child_env
from mergeserve.server.backends.proxy import ProxyBackend
from mergeserve.server.builder import Builder
from mergeserve.server.registry import Registry
from mergeserve.spec import parse_composition

ADMIN = {"Authorization": "Bearer admin-key"}
HELLO = [{"role": "user", "content": "Hello there"}]


def moe(zoo: dict[str, Path], *experts: str) -> dict:
    return {
        "base": str(zoo["base"]), "router": {"kind": "random", "top_k": 1},
        "experts": [{"name": e, "source": str(zoo[e])} for e in experts],
    }


def upstream_config(zoo: dict[str, Path], folder: Path) -> Path:
    config = folder / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "compositions": [{"name": "up"} | moe(zoo, "code", "math")], "engine": {"max_model_len": 512},
    }))
    return config


@dataclass
class Upstream:
    url: str
    http: httpx.Client
    client: openai.OpenAI


@dataclass(kw_only=True)
class Gateway(LiveGateway):
    flaky_port: int  # where an upstream the serve config allows comes and goes


@pytest.fixture(scope="module")
def upstream(zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    folder = tmp_path_factory.mktemp("upstream")
    port = free_port()
    with server_process(upstream_config(zoo, folder), port, folder / "log") as (http, _):
        url = f"http://127.0.0.1:{port}"
        yield Upstream(url, http, openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0))


@pytest.fixture(scope="module")
def gateway(zoo: dict[str, Path], upstream: Upstream) -> Iterator[Gateway]:
    registry, executor, flaky_port = Registry(), Executor(), free_port()
    allowed = BackendPolicy(upstream_allowlist=(f"{upstream.url}/v1", f"http://127.0.0.1:{flaky_port}/v1"))
    builder = Builder(registry, ExpertPool(), executor, policy=allowed)
    built(builder, parse_composition({"name": "local"} | moe(zoo, "german")))
    built(builder, parse_composition({"name": "remote", "backend": "openai", "upstream": {"url": f"{upstream.url}/v1"}}))
    with live_gateway(registry, executor, Auth(admin_key="admin-key"), builder, headers=ADMIN, timeout=60,
                      kind=Gateway, flaky_port=flaky_port) as gateway:
        yield gateway


def samples(http: httpx.Client, name: str) -> list:
    text = http.get("/metrics").text
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def value(http: httpx.Client, name: str, **labels: str) -> float:
    return sum(s.value for s in samples(http, name) if labels.items() <= s.labels.items())


# --- proxying --------------------------------------------------------------------------------------


def test_a_remote_composition_answers_as_its_upstream_does(gateway: Gateway, upstream: Upstream) -> None:
    asked = {"messages": HELLO, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    via = gateway.client.chat.completions.create(model="remote", **asked)
    direct = upstream.client.chat.completions.create(model="up", **asked)
    assert via.model == "remote" and direct.model == "up"  # the upstream's name never reaches the client
    assert via.choices == direct.choices  # text, finish reason and logprobs as the upstream gave them
    assert via.usage == direct.usage

    prompts = {"prompt": ["The cat", "One two three"], "max_tokens": 5, "temperature": 0, "logprobs": 1}
    via, direct = gateway.client.completions.create(model="remote", **prompts), upstream.client.completions.create(model="up", **prompts)
    assert [c.text for c in via.choices] == [c.text for c in direct.choices]
    assert [c.logprobs for c in via.choices] == [c.logprobs for c in direct.choices] and via.usage == direct.usage


@pytest.mark.parametrize("include_usage", [False, True])
def test_streams_pass_through_with_usage_only_when_asked(gateway: Gateway, upstream: Upstream, include_usage: bool) -> None:
    asked = {"messages": HELLO, "max_tokens": 8, "temperature": 0, "stream": True,
             "stream_options": {"include_usage": include_usage}}
    via = list(gateway.client.chat.completions.create(model="remote", **asked))
    direct = list(upstream.client.chat.completions.create(model="up", **asked))
    text = lambda chunks: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # noqa: E731
    assert text(via) == text(direct) and len(text(via)) > 0
    assert {c.model for c in via} == {"remote"}
    assert [c.choices[0].finish_reason for c in via if c.choices][-1] == "length"
    assert (via[-1].usage is not None) == include_usage
    if include_usage:
        assert via[-1].usage == direct[-1].usage


def test_upstream_errors_keep_their_status_and_envelope(gateway: Gateway, upstream: Upstream) -> None:
    too_long = {"messages": HELLO, "max_tokens": 100_000}
    with pytest.raises(openai.BadRequestError) as via:
        gateway.client.chat.completions.create(model="remote", **too_long)
    with pytest.raises(openai.BadRequestError) as direct:
        upstream.client.chat.completions.create(model="up", **too_long)
    assert via.value.status_code == direct.value.status_code == 400
    assert via.value.response.json() == direct.value.response.json()
    assert via.value.code == "context_length_exceeded"


def test_a_client_that_disconnects_cancels_the_upstream_request(gateway: Gateway, upstream: Upstream) -> None:
    before = value(upstream.http, "mergeserve:generation_tokens_total", model="up")
    body = {"model": "remote", "prompt": "Once upon a time", "max_tokens": 480, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=30) as response:
        next(response.iter_lines())  # the first event, then hang up
    wait_until(lambda: value(upstream.http, "mergeserve:num_requests_running", model="up") == 0, what="the abort")
    time.sleep(1.0)
    assert value(upstream.http, "mergeserve:generation_tokens_total", model="up") - before < 480


def test_upstream_tokens_latency_and_errors_land_in_the_gateways_metrics(gateway: Gateway) -> None:
    tokens = value(gateway.http, "mergeserve:generation_tokens_total", model="remote")
    ttft = value(gateway.http, "mergeserve:time_to_first_token_seconds_count", model="remote")
    list(gateway.client.completions.create(model="remote", prompt="Hi", max_tokens=4, stream=True))
    gateway.client.completions.create(model="remote", prompt="Hi", max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        gateway.client.completions.create(model="remote", prompt="Hi", max_tokens=100_000)
    assert value(gateway.http, "mergeserve:generation_tokens_total", model="remote") == tokens + 7
    assert value(gateway.http, "mergeserve:time_to_first_token_seconds_count", model="remote") == ttft + 1
    assert value(gateway.http, "mergeserve:request_success_total", model="remote", finished_reason="length") >= 2
    assert value(gateway.http, "mergeserve:request_errors_total", model="remote", code="context_length_exceeded") >= 1
    assert gateway.http.get("/admin/compositions/remote").json()["backend"]["kind"] == "openai"


def test_an_alias_across_local_and_remote_loses_nothing_while_the_remote_side_is_swapped(
    gateway: Gateway, upstream: Upstream,
) -> None:
    alias = {"targets": {"local": 1.0, "remote": 1.0}, "sticky": "none"}
    assert gateway.http.put("/admin/aliases/ab", json=alias).status_code == 200
    served, failures = [], []

    def client() -> None:
        for _ in range(4):
            try:
                chunks = list(gateway.client.completions.create(model="ab", prompt="Hello", max_tokens=12, stream=True))
                assert chunks[-1].choices[0].finish_reason is not None
                served.append(chunks[0].model)
            except Exception as e:  # noqa: BLE001 - counted, not raised, so every client runs to the end
                failures.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for number in (2, 3):  # two replacements of the remote side while the clients stream
        spec = {"backend": "openai", "upstream": {"url": f"{upstream.url}/v1", "model": "up", "timeout_s": 100 + number}}
        assert gateway.http.put("/admin/compositions/remote", json=spec).status_code == 202
        wait_until(lambda n=number: gateway.http.get("/admin/compositions/remote").json()["serving_revision"] == n,
                   what=f"revision {number}")
    for t in threads:
        t.join(timeout=120)
    assert failures == [] and len(served) == 24
    assert set(served) == {"local", "remote"}
    gateway.http.delete("/admin/aliases/ab")


# --- an upstream that goes away -------------------------------------------------------------------


def test_an_unreachable_upstream_is_503_with_retry_after_until_it_is_back(
    gateway: Gateway, zoo: dict[str, Path], tmp_path: Path,
) -> None:
    port, config = gateway.flaky_port, upstream_config(zoo, tmp_path)
    spec = {"name": "flaky", "backend": "openai", "upstream": {"url": f"http://127.0.0.1:{port}/v1", "model": "up"}}
    built(gateway.builder, parse_composition(spec))
    ask = {"model": "flaky", "prompt": "Hi", "max_tokens": 2}
    with server_process(config, port, tmp_path / "log"):
        assert gateway.http.post("/v1/completions", json=ask).status_code == 200
    down = gateway.http.post("/v1/completions", json=ask)  # killed with SIGKILL
    assert down.status_code == 503 and down.headers["retry-after"] == "1"
    assert down.json()["error"]["code"] == "upstream_unavailable"
    with server_process(config, port, tmp_path / "log"):
        assert gateway.http.post("/v1/completions", json=ask).status_code == 200
    gateway.registry.remove("flaky")


def test_a_managed_server_that_dies_is_503_then_restarted_and_stopped_when_removed(
    gateway: Gateway, zoo: dict[str, Path], tmp_path: Path,
) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "mergeserve.cli", "serve", "--config", str(upstream_config(zoo, tmp_path)), "--port", str(port)]
    server = ManagedServer("child", argv, port, env=child_env({"OMP_NUM_THREADS": "1"}), stop_grace_s=10)
    server.start()
    server.wait_ready(120)
    gateway.registry.add(ProxyBackend("child", f"http://127.0.0.1:{port}/v1", "up", process=server))
    ask = {"model": "child", "prompt": "Hi", "max_tokens": 2}
    assert gateway.http.post("/v1/completions", json=ask).status_code == 200

    first = server.pid
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not server.ready, what="the death to be noticed")
    down = gateway.http.post("/v1/completions", json=ask)
    assert down.status_code == 503 and "retry-after" in down.headers
    shown = gateway.http.get("/admin/compositions/child").json()["backend"]["process"]
    assert shown["state"] in ("failed", "starting") and shown["exit_code"] == -signal.SIGKILL
    assert any("Uvicorn running" in line or "serving on" in line for line in shown["log_tail"])

    wait_until(lambda: server.ready, timeout=120, what="the restart")
    assert server.pid != first and server.restarts == 1
    assert gateway.http.post("/v1/completions", json=ask).status_code == 200

    child = server.pid
    gateway.registry.remove("child")  # drained at once: SIGTERM to the child
    wait_until(lambda: server.state == "stopped", what="the child to stop")
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
