"""What cluster routers (the Gateway API Inference Extension, vLLM production-stack) expect of a
vLLM server, spoken by the gateway: vLLM's adapter routes with its bodies, model cards with
`root` and `parent`, and vLLM's metric names beside ours."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from live import Gateway, built, live_gateway, wait_until
from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve.server import Registry
from mergeserve.server.auth import Auth
from mergeserve.server.builder import Builder
from mergeserve.spec import EngineConfig, parse_composition

ADMIN = {"Authorization": "Bearer admin-key"}
USER = {"Authorization": "Bearer user-key"}


@pytest.fixture()
def gateway(zoo: dict[str, Path], adapters: dict[str, Path]) -> Iterator[Gateway]:
    """A BTX MoE of the math and code adapters over the tiny base; API key `user-key`, admin key `admin-key`."""
    registry, executor = Registry(), Executor()
    builder = Builder(registry, ExpertPool(), executor, EngineConfig(max_num_seqs=4, max_model_len=256))
    moe = {"name": "moe", "base": str(zoo["base"]), "router": {"kind": "random", "top_k": 2},
           "experts": [{"name": n, "source": str(adapters[n])} for n in ("math", "code")]}
    assert built(builder, parse_composition(moe)).state == "ready"
    with live_gateway(registry, executor, Auth(api_keys=("user-key",), admin_key="admin-key"), builder) as gateway:
        gateway.client = gateway.client_with_key("user-key")
        yield gateway


def load(gateway: Gateway, body: dict, headers: dict = ADMIN) -> httpx.Response:
    return gateway.http.post("/v1/load_lora_adapter", json=body, headers=headers)


def test_an_adapter_loaded_with_vllms_route_serves_under_its_name(gateway: Gateway, zoo, adapters) -> None:
    german = {"lora_name": "german", "lora_path": str(adapters["german"])}
    assert load(gateway, german, USER).status_code == 401  # the admin key's, not an API key's
    response = load(gateway, german)
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'german' added successfully."
    # ignore_eos: a tiny random model may sample its end-of-sequence token at once.
    done = gateway.client.completions.create(model="german", prompt="Die Katze", max_tokens=4, extra_body={"ignore_eos": True})
    assert done.model == "german" and done.usage.completion_tokens == 4
    cards = {c["id"]: c for c in gateway.http.get("/v1/models", headers=USER).json()["data"]}
    assert cards["german"]["root"] == str(adapters["german"]) and cards["german"]["parent"] == str(zoo["base"])
    assert cards["moe"]["root"] == str(zoo["base"]) and cards["moe"]["parent"] is None
    status = gateway.http.get("/admin/compositions/german", headers=ADMIN).json()
    assert status["spec"]["experts"] == [{"name": "german", "source": str(adapters["german"])}]

    again = load(gateway, german)
    assert again.status_code == 400 and again.json()["error"]["code"] == "already_loaded"
    replaced = load(gateway, {**german, "lora_path": str(adapters["math"]), "load_inplace": True})
    assert replaced.status_code == 200
    assert gateway.http.get("/admin/compositions/german", headers=ADMIN).json()["serving_revision"] == 2

    bad = load(gateway, {"lora_name": "broken", "lora_path": str(zoo["base"] / "nowhere")})
    assert bad.status_code == 400 and bad.json()["error"]["message"]
    assert gateway.client.models.list().data  # whatever was serving still serves

    gone = gateway.http.post("/v1/unload_lora_adapter", json={"lora_name": "german"}, headers=ADMIN)
    assert gone.status_code == 200 and "removed" in gone.text
    assert "german" not in [m.id for m in gateway.client.models.list().data]
    unknown = gateway.http.post("/v1/unload_lora_adapter", json={"lora_name": "german"}, headers=ADMIN)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_vllms_metric_names_show_each_models_queue_and_the_models_with_requests(gateway: Gateway) -> None:
    def sample(name: str, **labels: str):
        return next((s for s in gateway.scrape() if s.name == name and labels.items() <= s.labels.items()), None)

    assert sample("vllm:num_requests_running", model_name="moe").value == 0
    assert sample("vllm:num_requests_waiting", model_name="moe").value == 0
    assert sample("vllm:kv_cache_usage_perc", model_name="moe").value == 0
    idle = sample("vllm:lora_requests_info")
    assert idle.labels == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "16"}

    streaming, release = threading.Event(), threading.Event()

    def client() -> None:
        stream = gateway.client.completions.create(model="moe", prompt="Hello", max_tokens=200, stream=True,
                                                   extra_body={"ignore_eos": True})
        for _ in stream:
            streaming.set()
            if release.is_set():
                break
        stream.close()

    thread = threading.Thread(target=client)
    thread.start()
    try:
        assert streaming.wait(30)
        wait_until(lambda: sample("vllm:lora_requests_info").labels["running_lora_adapters"] == "moe", what="moe running")
        assert sample("vllm:num_requests_running", model_name="moe").value == 1
        assert 0 < sample("vllm:kv_cache_usage_perc", model_name="moe").value <= 1  # 1 of the engine's 4 sequences
    finally:
        release.set()
        thread.join(30)
