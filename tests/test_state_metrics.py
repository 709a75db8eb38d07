"""State loses nothing, metrics and feedback stay cheap and honest: a composition that cannot be
restored yet is kept and retried, revision numbers never repeat, `--watch` applies only whole
files and outlives any error, a scrape never walks the KV cache, upstreams cannot mint label
values, deleted names leave /metrics, and a response takes one feedback score."""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from live import Gateway, built, live_gateway, live_server, wait_until
from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve.server import Registry
from mergeserve.server.auth import Auth
from mergeserve.server.backends.policy import BackendPolicy
from mergeserve.server.backends.proxy import ProxyBackend
from mergeserve.server.builder import Backoff, Builder
from mergeserve.server.metrics import Metrics
from mergeserve.server.registry import Revision
from mergeserve.server.state import SavedComposition, SavedState, StateStore, dump_spec
from mergeserve.server.watch import ConfigWatcher
from mergeserve.spec import EngineConfig, parse_composition
from tiny import dense_spec

ADMIN = {"Authorization": "Bearer admin-key"}
HELLO = [{"role": "user", "content": "hello"}]
ENGINE = EngineConfig(max_num_seqs=2, max_model_len=64)
NOWHERE = "http://127.0.0.1:9/v1"  # never contacted: the specs name their upstream model


def remote(name: str) -> dict:
    return {"name": name, "backend": "openai", "upstream": {"url": NOWHERE, "model": "up"}}


def samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


# --- restore --------------------------------------------------------------------------------------


def test_a_composition_missing_its_source_at_restore_stays_saved_and_serves_once_it_appears(
    zoo: dict[str, Path], tmp_path: Path,
) -> None:
    late = tmp_path / "late"  # a volume not mounted yet when the server starts
    store = StateStore(tmp_path / "state")
    store.save(SavedState(compositions={"late": SavedComposition(revision=3, spec=dump_spec(dense_spec(late, "late", expert="base")))}))
    registry, executor = Registry(), Executor()
    builder = Builder(registry, ExpertPool(), executor, ENGINE, store, retry=Backoff(first_s=0.2, max_s=0.5))
    builder.restore([])
    with live_gateway(registry, executor, Auth(admin_key="admin-key"), builder, headers=ADMIN) as gateway:
        listed = {c["name"]: c for c in gateway.http.get("/admin/compositions").json()["data"]}
        assert listed["late"]["state"] == "failed" and "no such file or folder" in listed["late"]["error"]

        built(builder, dense_spec(zoo["base"], "other", expert="base"))  # saves the state file
        saved = store.load().compositions
        assert set(saved) == {"late", "other"} and "no such file or folder" in saved["late"].error

        shutil.copytree(zoo["base"], tmp_path / "copying")
        (tmp_path / "copying").rename(late)  # appears whole
        wait_until(lambda: "late" in registry.names(), what="a retry to build it")
        answer = gateway.http.post("/v1/completions", json={"model": "late", "prompt": "hi", "max_tokens": 2})
        assert answer.status_code == 200
        assert store.load().compositions["late"].error is None
    builder.shutdown()


def test_revision_numbers_never_repeat_across_delete_and_restart(tmp_path: Path) -> None:
    store = StateStore(tmp_path)

    def start() -> Builder:
        builder = Builder(Registry(), ExpertPool(), Executor(), store=store, policy=BackendPolicy(upstream_allowlist=(NOWHERE,)))
        builder.restore([])
        return builder

    builder = start()
    assert built(builder, parse_composition(remote("c"))).number == 1
    builder.registry.remove("c")
    builder.save()
    assert built(builder, parse_composition(remote("c"))).number == 2  # not a second c@1

    builder = start()  # restores c@2
    wait_until(lambda: builder.registry.names() == ["c"], what="c to be restored")
    builder.registry.remove("c")
    builder.save()
    builder = start()  # nothing to restore but the numbers given out
    assert built(builder, parse_composition(remote("c"))).number == 3


# --- --watch --------------------------------------------------------------------------------------


@pytest.fixture()
def watched(tmp_path: Path) -> Iterator[tuple[Path, Builder]]:
    """A config file (aliases only) and a builder serving `x`, which the aliases may name."""
    registry = Registry([ProxyBackend("x", NOWHERE, "up")])
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"state_dir": "state"}))
    builder = Builder(registry, ExpertPool(), Executor())
    yield config, builder
    builder.shutdown()


def aliases(**names: float) -> str:
    return yaml.safe_dump({"state_dir": "state", "aliases": {n: {"targets": {"x": w}} for n, w in names.items()}})


def test_watch_applies_a_file_only_once_it_has_stopped_changing(watched: tuple[Path, Builder]) -> None:
    config, builder = watched
    watcher = ConfigWatcher(config, builder)
    whole = aliases(ab=1.0, cd=1.0)
    config.write_text(whole[: whole.index("  cd:")])  # caught half-written: it parses, and names only ab
    watcher.poll()
    assert builder.registry.aliases() == {}
    config.write_text(whole)
    watcher.poll()
    assert builder.registry.aliases() == {}  # changed since the last poll: not yet
    watcher.poll()
    assert set(builder.registry.aliases()) == {"ab", "cd"}


def test_the_watcher_logs_any_error_keeps_the_last_good_config_and_goes_on(
    watched: tuple[Path, Builder], caplog: pytest.LogCaptureFixture,
) -> None:
    config, builder = watched
    watcher = ConfigWatcher(config, builder, poll_s=0.02)
    watcher.start()
    config.write_text(aliases(ab=1.0))
    wait_until(lambda: "ab" in builder.registry.aliases(), what="the first edit")

    with caplog.at_level(logging.ERROR, logger="mergeserve.server.watch"):
        config.write_bytes(b"aliases: {ab: \xff\xfe}\n")  # not UTF-8: not a SpecError
        wait_until(lambda: any(r.exc_info for r in caplog.records), what="the error to be logged")
        config.unlink()
        config.mkdir()  # a directory in its place
        time.sleep(0.2)
    assert watcher.thread.is_alive()
    assert set(builder.registry.aliases()) == {"ab"}  # the last good config stays in force

    config.rmdir()
    config.write_text(aliases(cd=1.0))
    wait_until(lambda: set(builder.registry.aliases()) == {"cd"}, what="the good edit after the errors")
    watcher.stop()


# --- metrics --------------------------------------------------------------------------------------


class SlowCache:
    """A backend whose KV-cache measure is slow (a big cache), and counts where it runs."""

    engine = None

    def __init__(self) -> None:
        self.walked_on: list[threading.Thread] = []

    @property
    def kv_cache_bytes(self) -> int:
        self.walked_on.append(threading.current_thread())
        time.sleep(0.3)
        return 4096


def test_a_scrape_reads_the_kv_cache_figure_and_never_walks_the_cache() -> None:
    backend = SlowCache()
    revision = Revision("c", 1, None, state="ready", backend=backend, memory_bytes=1000)
    metrics = Metrics(lambda: [], lambda: [revision], residency_period_s=60)

    start = time.perf_counter()
    for _ in range(20):
        generate_latest(metrics.registry)
    assert time.perf_counter() - start < 1.0  # walking on each scrape would take 6 s
    assert threading.current_thread() not in backend.walked_on

    def memory() -> float | None:
        found = [s.value for s in samples(generate_latest(metrics.registry).decode())
                 if s.name == "mergeserve:composition_memory_bytes"]
        return found[0] if found else None

    wait_until(lambda: memory() == 1000 + 4096, what="the measure to land")
    assert len(backend.walked_on) == 1  # at most once per residency_period_s


# --- an upstream that answers with values of its own ----------------------------------------------


def odd_upstream() -> FastAPI:
    """An OpenAI-compatible server with a finish reason and an error code of its own invention."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(body: dict = Body(...)) -> dict:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "eos_of_the_moon"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }

    @app.post("/v1/completions")
    async def completions() -> JSONResponse:
        error = {"message": "no", "type": "invalid_request_error", "param": None, "code": f"quota_{uuid.uuid4().hex}"}
        return JSONResponse({"error": error}, status_code=400)

    return app


@pytest.fixture()
def gateway() -> Iterator[Gateway]:
    """A server proxying `remote` to the odd upstream."""
    with live_server(odd_upstream()) as upstream:
        registry, executor = Registry(), Executor()
        registry.add(ProxyBackend("remote", f"{upstream}/v1", "up"))
        builder = Builder(registry, ExpertPool(), executor)
        with live_gateway(registry, executor, Auth(admin_key="admin-key"), builder, headers=ADMIN) as gateway:
            yield gateway


def test_an_upstreams_finish_reasons_and_error_codes_fall_into_closed_sets(gateway: Gateway) -> None:
    for _ in range(2):
        answer = gateway.http.post("/v1/chat/completions", json={"model": "remote", "messages": HELLO})
        assert answer.json()["choices"][0]["finish_reason"] == "eos_of_the_moon"  # the client sees it as sent
        refused = gateway.http.post("/v1/completions", json={"model": "remote", "prompt": "hi"})
        assert refused.status_code == 400 and refused.json()["error"]["code"].startswith("quota_")
    scraped = gateway.scrape()
    reasons = {s.labels["finished_reason"]: s.value for s in scraped if s.name == "mergeserve:request_success_total"}
    codes = {s.labels["code"]: s.value for s in scraped if s.name == "mergeserve:request_errors_total"}
    assert reasons == {"other": 2} and codes == {"other": 2}


def test_a_deleted_composition_and_alias_leave_metrics(gateway: Gateway) -> None:
    assert gateway.http.put("/admin/aliases/ab", json={"targets": {"remote": 1.0}}).status_code == 200
    answer = gateway.client.chat.completions.create(model="ab", messages=HELLO)
    gateway.http.post("/v1/feedback", json={"id": answer.id, "score": 1})

    def named() -> list:
        return [s for s in gateway.scrape() if {"remote", "ab"} & set(s.labels.values())]

    assert {s.name for s in named()} >= {"mergeserve:alias_requests_total", "mergeserve:feedback_score_count",
                                         "mergeserve:request_success_total", "mergeserve:composition_info"}

    assert gateway.http.delete("/admin/aliases/ab").status_code == 200
    assert gateway.http.delete("/admin/compositions/remote").status_code == 200
    assert named() == []


def test_a_response_takes_one_feedback_score(gateway: Gateway) -> None:
    answer = gateway.client.chat.completions.create(model="remote", messages=HELLO)
    scored = gateway.client.post("/feedback", body={"id": answer.id, "score": 1}, cast_to=httpx.Response)
    assert scored.json() == {"id": answer.id, "object": "feedback", "model": "remote", "revision": 1,
                             "experts": None}  # a remote model reports no routing
    with pytest.raises(openai.ConflictError) as again:
        gateway.client.post("/feedback", body={"id": answer.id, "score": -1}, cast_to=httpx.Response)
    assert again.value.code == "already_scored" and again.value.body["type"] == "invalid_request_error"
    counted = [s.value for s in gateway.scrape() if s.name == "mergeserve:feedback_score_count"]
    assert counted == [1]
