"""API keys and admission limits, exercised over real HTTP with the official `openai` client."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from fastapi import Depends
from fastapi.testclient import TestClient

from live import Gateway, live_gateway, local_registry, wait_until
from mergeserve.engine.engine import Engine
from mergeserve.engine.executor import Executor
from mergeserve.server import Registry, create_app
from mergeserve.server.auth import ADMIN_KEY_ENV, API_KEYS_ENV, Auth, require_admin
from mergeserve.spec import EngineConfig, ServeConfig, parse_composition
from tiny import dense_spec

MODEL = "tiny"
CONFIG_KEY = "sk-config-0123456789"
ENV_KEY = "sk-env-9876543210"
MAX_TOKENS_LIMIT = 12
MAX_WAITING = 1
HELLO = [{"role": "user", "content": "Hello"}]


class PausableExecutor(Executor):
    """Steps engines only while `running` is set: paused, new requests stay waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.running = threading.Event()
        self.running.set()

    def _step(self, engine: Engine) -> None:
        self.running.wait()
        super()._step(engine)


@pytest.fixture(scope="module")
def server(zoo: dict[str, Path]) -> Iterator[Gateway]:
    spec = parse_composition({
        "name": MODEL, "base": str(zoo["base"]), "router": {"kind": "random", "top_k": 1},
        "experts": [{"name": "only", "source": str(zoo["base"])}],
    })
    engine_config = EngineConfig(max_model_len=256, max_tokens_limit=MAX_TOKENS_LIMIT, max_waiting=MAX_WAITING)
    config = ServeConfig(compositions=[spec], engine=engine_config, api_keys=[CONFIG_KEY])
    with pytest.MonkeyPatch.context() as env:
        env.setenv(API_KEYS_ENV, f" {ENV_KEY} ,")
        auth = Auth.from_config(config)
    executor = PausableExecutor()
    registry = local_registry(executor, engine_config, spec)
    # log_config=None: uvicorn's loggers, access log included, propagate to caplog.
    logs = {"log_config": None, "log_level": "debug"}
    with live_gateway(registry, executor, auth, client_timeout=30, uvicorn_options=logs) as gateway:
        yield gateway
        executor.running.set()


# --- API keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [CONFIG_KEY, ENV_KEY])
def test_a_configured_key_chats_and_streams(server: Gateway, key: str) -> None:
    client = server.client_with_key(key)
    response = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    assert response.choices[0].message.content is not None
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, stream=True))
    assert chunks[-1].choices[0].finish_reason in {"length", "stop"}
    assert [m.id for m in client.models.list()] == [MODEL]


@pytest.mark.parametrize("key", ["sk-wrong", CONFIG_KEY + "x", CONFIG_KEY[:-1]])
def test_a_wrong_key_is_401(server: Gateway, key: str) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        server.client_with_key(key).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    error = caught.value
    assert error.status_code == 401 and error.code == "invalid_api_key"
    assert error.response.headers["www-authenticate"] == "Bearer"
    assert set(error.body) == {"message", "type", "param", "code"} and error.body["param"] is None
    assert key not in error.response.text


@pytest.mark.parametrize("headers", [{}, {"Authorization": f"Basic {CONFIG_KEY}"}, {"Authorization": "Bearer"}])
def test_a_missing_key_is_401_on_every_v1_route(server: Gateway, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]:
        response = server.http.request(method, path, headers=headers, json={"model": MODEL, "prompt": "hi"})
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"


def test_the_key_is_checked_before_the_body_is_read(server: Gateway) -> None:
    response = server.http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_health_ready_and_metrics_stay_open(server: Gateway) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert server.http.get(path).status_code == 200, path


def test_keys_never_reach_the_logs(server: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server.client_with_key(CONFIG_KEY).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        server.client_with_key("sk-a-guess").models.list()
    wait_until(lambda: "/v1/models" in caplog.text)  # the access log is on and captured
    assert "POST /v1/chat/completions" in caplog.text
    assert CONFIG_KEY not in caplog.text and "sk-a-guess" not in caplog.text


def test_keys_come_from_the_config_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config = ServeConfig(compositions=[dense_spec("/nowhere")], api_keys=["from-config"], admin_key="admin-config")
    monkeypatch.setenv(API_KEYS_ENV, "one, two,,one")
    monkeypatch.setenv(ADMIN_KEY_ENV, "admin-env")
    auth = Auth.from_config(config)
    assert auth.api_keys == ("from-config", "one", "two")
    assert auth.admin_key == "admin-env"
    assert "from-config" not in repr(config)


def test_no_keys_leaves_v1_open() -> None:
    assert Auth.from_config(ServeConfig(compositions=[dense_spec("/nowhere")]), environ={}) == Auth()
    with TestClient(create_app(Registry(), Executor())) as client:
        assert client.get("/v1/models").status_code == 200


def test_require_admin_wants_the_admin_key() -> None:
    app = create_app(Registry(), Executor(), Auth(api_keys=("user",), admin_key="admin"))

    @app.get("/admin/ping", dependencies=[Depends(require_admin)])
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    with TestClient(app) as client:
        assert client.get("/admin/ping").status_code == 401
        assert client.get("/admin/ping", headers={"Authorization": "Bearer user"}).status_code == 401
        assert client.get("/admin/ping", headers={"Authorization": "Bearer admin"}).json() == {"pong": "yes"}
        assert client.get("/v1/models", headers={"Authorization": "Bearer admin"}).status_code == 401


def test_admin_routes_are_closed_without_an_admin_key() -> None:
    app = create_app(Registry(), Executor())
    app.get("/admin/ping", dependencies=[Depends(require_admin)])(lambda: {})
    with TestClient(app) as client:
        response = client.get("/admin/ping", headers={"Authorization": "Bearer anything"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "admin_disabled"


# --- limits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_over_the_cap_is_400(server: Gateway, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server.client_with_key(CONFIG_KEY).chat.completions.create(
            model=MODEL, messages=HELLO, **{param: MAX_TOKENS_LIMIT + 1},
        )
    assert caught.value.param == param and str(MAX_TOKENS_LIMIT) in caught.value.message


def test_completion_max_tokens_over_the_cap_is_400(server: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        server.client_with_key(CONFIG_KEY).completions.create(model=MODEL, prompt="hi", max_tokens=MAX_TOKENS_LIMIT + 1)
    assert caught.value.param == "max_tokens"


def test_without_max_tokens_a_chat_stops_at_the_cap(server: Gateway) -> None:
    response = server.client_with_key(CONFIG_KEY).chat.completions.create(
        model=MODEL, messages=HELLO, extra_body={"ignore_eos": True},
    )
    assert response.usage.completion_tokens == MAX_TOKENS_LIMIT
    assert response.choices[0].finish_reason == "length"


def test_a_full_queue_is_429_with_retry_after(server: Gateway) -> None:
    client = server.client_with_key(CONFIG_KEY)
    server.executor.running.clear()
    try:
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(client.chat.completions.create, model=MODEL, messages=HELLO, max_tokens=2)
            wait_until(lambda: server.engine.num_waiting == MAX_WAITING)
            with pytest.raises(openai.RateLimitError) as caught:
                client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, stream=True)
            server.executor.running.set()
            assert queued.result(timeout=30).choices  # the queued request still completes
    finally:
        server.executor.running.set()
    assert caught.value.status_code == 429 and caught.value.code == "queue_full"
    assert caught.value.response.headers["retry-after"] == "1"


def test_a_server_with_no_model_loaded_is_503_with_retry_after() -> None:
    with TestClient(create_app(Registry(), Executor())) as client:
        response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "not_ready"
