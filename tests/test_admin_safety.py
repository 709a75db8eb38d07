"""The admin API chooses only what the serve config offers.

A vLLM child's interpreter, environment and arguments come from the config's profiles; an
upstream lies under its allowlist and gets only the key variables it lists; this server's own
keys reach neither; a managed child's port is trusted only once it proves to require the
child's key; GET /admin/pool answers while a build loads; a build ends, at build_timeout_s at
the latest, and a FIFO is never opened as weights.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from live import Gateway as LiveGateway
from live import live_gateway, live_server
from mergeserve.engine.executor import Executor
from mergeserve.experts import CheckpointError, ExpertPool
from mergeserve.server.app import create_app
from mergeserve.server.auth import Auth
from mergeserve.server.backends import vllm
from mergeserve.server.backends.policy import BackendPolicy
from mergeserve.server.backends.process import ManagedServer
from mergeserve.server.builder import Builder
from mergeserve.server.registry import Registry
from mergeserve.spec import ServeConfig, SpecError, VLLMProfile, parse_composition

ADMIN_KEY, API_KEY = "admin-key-of-this-server", "api-key-of-this-server"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CONFIG = """
admin_key: {admin}
api_keys: [{api}]
state_dir: state
vllm_profiles:
  default: {{args: ["--gpu-memory-utilization", "0.3"]}}
upstream_allowlist: ["{upstream}/v1", "{silent}/v1"]
upstream_key_env: [UPSTREAM_KEY]
build_timeout_s: 2
"""


# --- the peers: an OpenAI-compatible upstream, and one that never answers -------------------------


@dataclass
class Upstream:
    url: str
    seen: list[dict] = field(default_factory=list)  # every request: path and headers


def upstream_handler(upstream: Upstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            upstream.seen.append({"path": self.path, "headers": dict(self.headers)})
            self.send(200, {"object": "list", "data": [{"id": "up"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            upstream.seen.append({"path": self.path, "headers": dict(self.headers)})
            if body["prompt"] == "html":
                self.send(500, b"<html>Traceback: db password=hunter2</html>")
            elif body["prompt"] == "long":
                self.send(400, {"error": {"message": "x" * 5000, "type": "invalid_request_error", "code": "a code; with <b>"}})
            else:
                self.send(200, {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "up",
                                "choices": [{"index": 0, "text": " ok", "finish_reason": "length", "logprobs": None}]})

        def send(self, status: int, body: dict | bytes) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    return Handler


@contextmanager
def serving_upstream() -> Iterator[Upstream]:
    upstream = Upstream("")
    server = ThreadingHTTPServer(("127.0.0.1", 0), upstream_handler(upstream))
    upstream.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield upstream
    finally:
        server.shutdown()


@contextmanager
def silent_port() -> Iterator[str]:
    """A port that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


# --- the gateway, configured by a serve config ----------------------------------------------------


@dataclass(kw_only=True)
class Gateway(LiveGateway):
    upstream: Upstream
    silent: str

    def complete(self, model: str, prompt: str) -> httpx.Response:
        return self.http.post("/v1/completions", json={"model": model, "prompt": prompt}, headers={"Authorization": f"Bearer {API_KEY}"})


def policy_of(config_text: str) -> tuple[ServeConfig, Auth, BackendPolicy]:
    config = ServeConfig.model_validate(yaml.safe_load(config_text))
    auth = Auth.from_config(config, environ={})
    return config, auth, BackendPolicy.from_config(config, auth)


@contextmanager
def gateway_for(builder: Builder, auth: Auth, upstream: Upstream, silent: str) -> Iterator[Gateway]:
    with live_gateway(builder.registry, builder.executor, auth, builder, headers=ADMIN,
                      kind=Gateway, upstream=upstream, silent=silent) as gateway:
        yield gateway


@pytest.fixture()
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    monkeypatch.setenv("UPSTREAM_KEY", "the-upstream-key")
    with serving_upstream() as upstream, silent_port() as silent:
        config, auth, policy = policy_of(CONFIG.format(admin=ADMIN_KEY, api=API_KEY, upstream=upstream.url, silent=silent))
        builder = Builder(Registry(), ExpertPool(), Executor(threads=1), policy=policy, build_timeout_s=config.build_timeout_s)
        with gateway_for(builder, auth, upstream, silent) as gateway:
            yield gateway


def remote(url: str, **fields: object) -> dict:
    """A backend=openai spec; `fields` are the upstream section's (None: left out)."""
    upstream = {"url": url, "model": "up"} | fields
    return {"backend": "openai", "upstream": {k: v for k, v in upstream.items() if v is not None}}


# --- vLLM children: what runs is the serve config's --------------------------------------------


@pytest.mark.parametrize("chosen", [
    {"python": "/bin/bash", "env": {"BASH_ENV": "/tmp/payload.sh"}},
    {"extra_args": ["--chat-template", "/etc/shadow"]},
])
def test_a_spec_cannot_set_the_vllm_childs_python_env_or_args(gateway: Gateway, chosen: dict) -> None:
    spec = {"backend": "vllm", "base": "/x", "experts": [{"name": "e", "source": "/x"}], "vllm": chosen}
    response = gateway.put("hostile", spec)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert all(f"vllm.{name}" in message for name in chosen) and "vllm_profiles" in message


def test_a_spec_names_only_a_vllm_profile_the_serve_config_has(gateway: Gateway) -> None:
    spec = {"backend": "vllm", "base": "/x", "experts": [{"name": "e", "source": "/x"}], "vllm": {"profile": "root"}}
    response = gateway.put("hostile", spec)
    assert response.status_code == 403
    assert response.json()["error"]["param"] == "vllm.profile" and "['default']" in response.json()["error"]["message"]


# --- openai upstreams: where requests go, and with which key ---------------------------------------


@pytest.mark.parametrize("url, status", [
    ("{silent_host}:1/v1", 403),  # another port
    ("{upstream}/v2", 403),  # outside the path prefix
    ("{upstream}/v1x", 403),  # a prefix of a segment is not the segment
    ("{upstream}/v1?", 400),  # the path appended after `?` would be a query
    ("{upstream}/v1#", 400),
    ("{upstream}/v1/../admin", 400),
    ("http://user:pw@{upstream_host}/v1", 400),
])
def test_an_upstream_outside_the_allowlist_is_refused_and_never_contacted(gateway: Gateway, url: str, status: int) -> None:
    upstream = gateway.upstream.url
    url = url.format(upstream=upstream, upstream_host=upstream.removeprefix("http://"), silent_host="http://127.0.0.1")
    response = gateway.put("hostile", remote(url, model=None))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == "upstream.url" if status == 403 else "\n  upstream.url: " in error["message"]
    assert gateway.upstream.seen == []


def test_api_key_env_names_only_the_variables_the_serve_config_lists(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGESERVE_ADMIN_KEY", ADMIN_KEY)
    url = f"{gateway.upstream.url}/v1"
    refused = gateway.put("hostile", remote(url, api_key_env="MERGESERVE_ADMIN_KEY"))
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "upstream.api_key_env"
    assert gateway.upstream.seen == []

    assert gateway.put("remote", remote(url, api_key_env="UPSTREAM_KEY", model=None)).status_code == 202
    assert gateway.settled("remote")["state"] == "ready"
    assert gateway.complete("remote", "hi").status_code == 200
    sent = [r["headers"].get("Authorization") for r in gateway.upstream.seen]
    assert sent == ["Bearer the-upstream-key"] * 2  # GET /models, then the completion: never this server's keys


def test_a_listed_variable_that_holds_this_servers_key_is_not_sent(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", ADMIN_KEY)
    assert gateway.put("remote", remote(f"{gateway.upstream.url}/v1", api_key_env="UPSTREAM_KEY")).status_code == 202
    status = gateway.settled("remote")
    assert status["state"] == "failed" and "this server's own keys" in status["error"]
    assert gateway.upstream.seen == []


def test_the_serve_config_cannot_hand_this_servers_keys_to_an_upstream_or_a_child() -> None:
    with pytest.raises(SpecError, match="upstream_key_env: MERGESERVE_API_KEYS"):
        policy_of("state_dir: s\nupstream_key_env: [MERGESERVE_API_KEYS]")
    with pytest.raises(SpecError, match="vllm_profiles.gpu.env: MERGESERVE_ADMIN_KEY"):
        policy_of("state_dir: s\nvllm_profiles: {gpu: {env: {MERGESERVE_ADMIN_KEY: x}}}")


def test_upstream_error_bodies_are_summed_up_not_echoed(gateway: Gateway) -> None:
    assert gateway.put("remote", remote(f"{gateway.upstream.url}/v1")).status_code == 202
    assert gateway.settled("remote")["state"] == "ready"
    html = gateway.complete("remote", "html").json()["error"]
    assert "hunter2" not in json.dumps(html) and html["message"] == "the upstream answered 500 without an OpenAI error envelope"
    long = gateway.complete("remote", "long").json()["error"]
    assert long["message"] == "x" * 300 and long["type"] == "invalid_request_error" and long["code"] is None


# --- builds: they end, and the pool answers while they run ------------------------------------------


def test_a_build_past_build_timeout_s_fails_and_the_next_one_builds(gateway: Gateway) -> None:
    """The silent upstream never lists its models: the build waits on it past build_timeout_s (2 s)."""
    assert gateway.put("stuck", remote(f"{gateway.silent}/v1", model=None)).status_code == 202
    status = gateway.settled("stuck")
    assert status["state"] == "failed" and "build_timeout_s (2 s)" in status["error"]
    assert gateway.put("next", remote(f"{gateway.upstream.url}/v1")).status_code == 202
    assert gateway.settled("next")["state"] == "ready"


def test_get_admin_pool_answers_while_a_build_loads(zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from mergeserve.experts import pool as pool_module

    loading, finish = threading.Event(), threading.Event()
    load = pool_module.load_hf_folder

    def slow_load(folder: Path):  # a checkpoint that takes its time to read
        if folder.name == "code":
            loading.set()
            finish.wait(60)
        return load(folder)

    monkeypatch.setattr(pool_module, "load_hf_folder", slow_load)
    builder = Builder(Registry(), ExpertPool(), Executor(threads=1))
    with serving_upstream() as upstream, gateway_for(builder, Auth(admin_key=ADMIN_KEY), upstream, "") as gateway:
        spec = {"base": str(zoo["base"]), "router": {"kind": "random", "top_k": 1},
                "experts": [{"name": e, "source": str(zoo[e])} for e in ("code", "math")]}
        assert gateway.put("moe", spec).status_code == 202
        assert loading.wait(60)
        try:
            pool = gateway.http.get("/admin/pool", timeout=5)
            assert pool.status_code == 200 and "code" not in [Path(e["source"]).name for e in pool.json()["experts"]]
        finally:
            finish.set()
        assert gateway.settled("moe")["state"] == "ready"


def test_a_fifo_is_never_opened_as_weights(gateway: Gateway, zoo: dict[str, Path], tmp_path: Path) -> None:
    """Opening a FIFO to read blocks until a writer comes: it would hold a build forever."""
    expert = shutil.copytree(zoo["code"], tmp_path / "code")
    (expert / "model.safetensors").unlink()
    os.mkfifo(expert / "model.safetensors")
    os.mkfifo(tmp_path / "base.gguf")
    for base, source, bad in ((zoo["base"], expert, expert / "model.safetensors"), (tmp_path / "base.gguf", zoo["math"], tmp_path / "base.gguf")):
        spec = {"base": str(base), "router": {"kind": "random", "top_k": 1}, "experts": [{"name": "e", "source": str(source)}]}
        response = gateway.put("fifo", spec)
        assert response.status_code == 400 and f"{bad}: not a regular file" in response.json()["error"]["message"]
    with pytest.raises(CheckpointError, match="not a regular file"):
        ExpertPool().get(str(expert))


# --- a managed vLLM child: its own key, none of ours, and a port that proves to be its own ---------

FAKE_VLLM = textwrap.dedent('''
    """Stands in for vLLM's OpenAI server: /health open, /v1 only with the key in VLLM_API_KEY."""
    import http.server, json, os, sys
    args = sys.argv[1:]
    port, name, key = int(args[args.index("--port") + 1]), args[args.index("--served-model-name") + 1], os.environ["VLLM_API_KEY"]
    with open(os.environ["FAKE_VLLM_RECORD"], "w") as f:
        json.dump({"argv": sys.argv, "env": dict(os.environ)}, f)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health" or self.headers.get("Authorization") == f"Bearer {key}":
                self.send(200, {"object": "list", "data": [{"id": name}]})
            else:
                self.send(401, {"error": "Unauthorized"})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Authorization") != f"Bearer {key}":
                return self.send(401, {"error": "Unauthorized"})
            self.send(200, {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": name,
                            "choices": [{"index": 0, "text": " ok", "finish_reason": "length", "logprobs": None}]})

        def send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
''')


def fake_vllm(folder: Path) -> Path:
    """A package `vllm.entrypoints.openai.api_server` in `folder`, for a profile's PYTHONPATH."""
    package = folder / "vllm/entrypoints/openai"
    package.mkdir(parents=True)
    for init in (folder / "vllm", folder / "vllm/entrypoints", package):
        (init / "__init__.py").write_text("")
    (package / "api_server.py").write_text(FAKE_VLLM)
    return folder


def test_a_vllm_child_runs_its_profile_with_a_key_of_its_own_and_none_of_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {"MERGESERVE_ADMIN_KEY": ADMIN_KEY, "MERGESERVE_API_KEYS": API_KEY, "AWS_SECRET_ACCESS_KEY": "aws",
                        "VLLM_LEAKED": ADMIN_KEY}.items():
        monkeypatch.setenv(name, value)
    record = tmp_path / "child.json"
    profile = VLLMProfile(python=sys.executable, args=["--gpu-memory-utilization", "0.3"], env={
        "PYTHONPATH": str(fake_vllm(tmp_path / "fake")), "FAKE_VLLM_RECORD": str(record), "VLLM_CPU_OMP_THREADS_BIND": "0"})
    spec = parse_composition({"name": "child", "backend": "vllm", "base": "/x", "experts": [{"name": "e", "source": "/x"}],
                              "vllm": {"startup_timeout_s": 60, "stop_grace_s": 1}})
    backend = vllm.launch(spec, tmp_path, profile, withheld={ADMIN_KEY, API_KEY})
    try:
        child = json.loads(record.read_text())
        key = child["env"]["VLLM_API_KEY"]
        assert len(key) >= 32 and key not in json.dumps([child["argv"], backend.describe()])  # not in the process list
        assert ADMIN_KEY not in json.dumps(child) and API_KEY not in json.dumps(child) and "AWS_SECRET_ACCESS_KEY" not in child["env"]
        assert child["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "0" and child["argv"][-2:] == ["--gpu-memory-utilization", "0.3"]
        assert httpx.get(f"{backend.url}/models").status_code == 401

        registry = Registry([backend])
        with live_server(create_app(registry, Executor(threads=1))) as url:  # the gateway presents the child's key
            answer = httpx.post(f"{url}/v1/completions", json={"model": "child", "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == " ok"
    finally:
        backend.close(wait=True)


@contextmanager
def squatter(status: int) -> Iterator[int]:
    """Another process's server on the port the child was given: /health 200, everything else `status`."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


@pytest.mark.parametrize("status, why", [
    (200, "answers 200 to /v1/models without a key, not 401"),
    (401, "refuses the child's API key"),
])
def test_a_port_that_does_not_prove_to_be_the_childs_fails_the_start(status: int, why: str) -> None:
    with squatter(status) as port:
        child = [sys.executable, "-c", "import time; time.sleep(60)"]  # never binds: the squatter holds the port
        server = ManagedServer("child", child, port, api_key="k" * 43, startup_timeout_s=30, stop_grace_s=1)
        server.start()
        with pytest.raises(RuntimeError, match=f"was not trusted: port {port} {why}"):
            server.wait_ready()
        assert server.state == "stopped"
