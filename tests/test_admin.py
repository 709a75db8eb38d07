"""The admin API: compositions built off the request path and swapped in, A/B aliases, the pool."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from live import Gateway, built, live_gateway, wait_until
from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve.server import Registry
from mergeserve.server.auth import Auth
from mergeserve.server.builder import Builder
from mergeserve.spec import EngineConfig, parse_composition

ADMIN = {"Authorization": "Bearer admin-key"}
HELLO = [{"role": "user", "content": "hello"}]


@dataclass(kw_only=True)
class Server(Gateway):
    zoo: dict[str, Path]

    def moe(self, experts: tuple[str, ...] = ("code", "german", "math"), top_k: int = 2) -> dict:
        return {
            "base": str(self.zoo["base"]), "router": {"kind": "random", "top_k": top_k},
            "experts": [{"name": e, "source": str(self.zoo[e])} for e in experts],
        }


@pytest.fixture()
def server(zoo: dict[str, Path]) -> Iterator[Server]:
    registry, executor = Registry(), Executor()
    pool = ExpertPool(roots=[zoo["base"].parent])
    builder = Builder(registry, pool, executor, EngineConfig(max_num_seqs=4, max_model_len=256))
    with live_gateway(registry, executor, Auth(admin_key="admin-key"), builder, kind=Server, zoo=zoo) as server:
        yield server


def test_a_build_runs_on_a_thread_that_ends_with_it(zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A live thread keeps its OpenMP team, and two live teams on 2 cores made libgomp sleep
    between parallel regions: the executor's decode ran at half speed beside an idle build thread."""
    builder = Builder(Registry(), ExpertPool(), Executor(threads=2), EngineConfig(max_num_seqs=2, max_model_len=64))
    ran_on = []
    build = builder._build
    monkeypatch.setattr(builder, "_build", lambda revision: (ran_on.append(threading.current_thread()), build(revision)))
    spec = parse_composition({"name": "base", "base": str(zoo["base"]), "experts": [{"name": "base", "source": str(zoo["base"])}]})
    assert built(builder, spec).state == "ready"
    assert len(ran_on) == 1 and not ran_on[0].is_alive()
    builder.shutdown()


def test_put_builds_in_the_background_and_then_serves(server: Server) -> None:
    response = server.put("moe", server.moe())
    assert response.status_code == 202
    assert response.json()["status_url"] == "/admin/compositions/moe" == response.headers["location"]
    wait_until(lambda: server.status("moe")["state"] == "ready", what="moe to build")
    status = server.status("moe")
    assert status["revision"] == status["serving_revision"] == 1 and status["error"] is None
    assert status["build_seconds"] > 0 and status["memory_bytes"] > 0
    assert [e["name"] for e in status["spec"]["experts"]] == ["code", "german", "math"]

    chat = server.client.chat.completions.create(model="moe", messages=HELLO, max_tokens=3)
    assert chat.model == "moe" and chat.system_fingerprint.endswith(":moe@1")
    assert [m.id for m in server.client.models.list()] == ["moe"]
    assert server.http.get("/ready").status_code == 200


def test_replacing_a_composition_swaps_to_the_new_revision(server: Server) -> None:
    server.put_and_wait("moe", server.moe(top_k=2))
    assert server.put_and_wait("moe", server.moe(("code", "math"), top_k=1))["serving_revision"] == 2
    raw = server.client.chat.completions.with_raw_response.create(model="moe", messages=HELLO, max_tokens=2)
    assert raw.headers["x-mergeserve-composition"] == "moe" and raw.headers["x-mergeserve-revision"] == "2"
    assert raw.parse().system_fingerprint.endswith(":moe@2")
    assert server.registry.revision("moe")[0].backend.engine.expert_names == ["code", "math"]


def test_a_failed_build_keeps_the_old_revision_serving_and_says_why(server: Server, tmp_path: Path) -> None:
    server.put_and_wait("moe", server.moe())
    broken = server.zoo["base"].parent / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text("{not json")
    spec = server.moe() | {"experts": [{"name": "bad", "source": str(broken)}, {"name": "math", "source": str(server.zoo["math"])}]}
    status = server.put_and_wait("moe", spec)
    assert status["state"] == "failed" and status["revision"] == 2 and status["serving_revision"] == 1
    assert "broken" in status["error"]
    assert server.client.chat.completions.create(model="moe", messages=HELLO, max_tokens=2).system_fingerprint.endswith(":moe@1")

    status = server.put_and_wait("new", spec)  # a new name whose first build fails: listed, not served
    assert status["state"] == "failed" and status["serving_revision"] is None
    listed = {c["name"]: c["state"] for c in server.http.get("/admin/compositions", headers=ADMIN).json()["data"]}
    assert listed == {"moe": "failed", "new": "failed"}
    assert [m.id for m in server.client.models.list()] == ["moe"]


@pytest.mark.parametrize("spec, message", [
    ({"base": "/x", "experts": []}, "experts"),
    ({"base": "/etc", "router": {"kind": "random"}, "experts": [{"name": "a", "source": "/etc"}]}, "outside the allowed source roots"),
    ({"name": "other", "base": "/x", "experts": [{"name": "a", "source": "/x"}]}, "differs from the URL"),
])
def test_a_bad_spec_is_400_before_anything_is_built(server: Server, spec: dict, message: str) -> None:
    response = server.put("moe", spec)
    assert response.status_code == 400 and message in response.json()["error"]["message"]
    assert server.http.get("/admin/compositions", headers=ADMIN).json()["data"] == []


def test_router_weights_outside_the_roots_are_refused(server: Server) -> None:
    spec = server.moe() | {"router": {"kind": "learned", "weights": "/etc/hostname"}}
    response = server.put("moe", spec)
    assert response.status_code == 400 and "/etc/hostname" in response.json()["error"]["message"]


def test_the_admin_api_wants_the_admin_key(server: Server) -> None:
    assert server.http.get("/admin/compositions").status_code == 401
    assert server.http.put("/admin/compositions/x", json={}, headers={"Authorization": "Bearer nope"}).status_code == 401


def test_delete_stops_serving_and_unloads_experts_nobody_uses(server: Server) -> None:
    server.put_and_wait("a", server.moe(("code", "german")))
    server.put_and_wait("b", server.moe(("german", "math")))
    used_by = {Path(e["source"]).name: e["used_by"] for e in server.http.get("/admin/pool", headers=ADMIN).json()["experts"]}
    assert used_by == {"base": ["a@1", "b@1"], "code": ["a@1"], "german": ["a@1", "b@1"], "math": ["b@1"]}

    assert server.http.delete("/admin/compositions/a", headers=ADMIN).status_code == 200
    loaded = sorted(Path(e["source"]).name for e in server.http.get("/admin/pool", headers=ADMIN).json()["experts"])
    assert loaded == ["base", "german", "math"]  # code was only a's
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="a", messages=HELLO, max_tokens=2)


def test_an_alias_splits_traffic_by_weight_and_sticks_to_a_user(server: Server) -> None:
    server.put_and_wait("v1", server.moe())
    server.put_and_wait("v2", server.moe(("code", "math")))
    response = server.http.put("/admin/aliases/ab", json={"targets": {"v1": 3, "v2": 1}}, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert {m.id: getattr(m, "targets", None) for m in server.client.models.list()} == {
        "v1": None, "v2": None, "ab": {"v1": 3.0, "v2": 1.0},
    }

    served = [server.client.completions.create(model="ab", prompt="hi", max_tokens=1, user=f"u{i}").model for i in range(40)]
    assert set(served) == {"v1", "v2"} and 20 <= served.count("v1") <= 38  # 3:1, loosely
    sticky = {server.client.completions.create(model="ab", prompt="hi", max_tokens=1, user="alice").model for _ in range(5)}
    by_header = {
        server.client.completions.with_raw_response.create(
            model="ab", prompt="hi", max_tokens=1, extra_headers={"X-Session-Id": "s-1"},
        ).headers["x-mergeserve-composition"]
        for _ in range(5)
    }
    assert len(sticky) == 1 and len(by_header) == 1

    metrics = _samples(server.http.get("/metrics").text)
    counts = {s.labels["model"]: s.value for s in metrics["mergeserve:alias_requests"] if s.name.endswith("_total")}
    assert counts["v1"] + counts["v2"] == 50


def test_alias_mistakes_are_refused(server: Server) -> None:
    server.put_and_wait("v1", server.moe())
    put = lambda name, body: server.http.put(f"/admin/aliases/{name}", json=body, headers=ADMIN)  # noqa: E731
    assert put("ab", {"targets": {"nope": 1}}).status_code == 400
    assert put("ab", {"targets": {"v1": 0}}).status_code == 400
    assert put("v1", {"targets": {"v1": 1}}).status_code == 409  # a composition's name
    assert put("ab", {"targets": {"v1": 1}}).status_code == 200
    assert server.put("ab", server.moe()).status_code == 409  # now an alias's name
    assert server.http.delete("/admin/compositions/v1", headers=ADMIN).status_code == 409  # ab still sends to it


def test_feedback_is_counted_for_the_composition_that_answered(server: Server) -> None:
    server.put_and_wait("v1", server.moe())
    answer = server.client.chat.completions.create(model="v1", messages=HELLO, max_tokens=2)
    assert server.http.post("/v1/feedback", json={"id": answer.id, "score": 2}).status_code == 400
    response = server.http.post("/v1/feedback", json={"id": answer.id, "score": -0.5})
    assert response.status_code == 200 and response.json()["model"] == "v1"
    assert server.http.post("/v1/feedback", json={"id": answer.id, "score": 1}).status_code == 409  # one per response
    assert server.http.post("/v1/feedback", json={"id": "chatcmpl-unknown", "score": 1}).status_code == 404

    metrics = _samples(server.http.get("/metrics").text)
    feedback = {s.name: s.value for s in metrics["mergeserve:feedback_score"] if s.labels["model"] == "v1"}
    assert feedback == {"mergeserve:feedback_score_count": 1, "mergeserve:feedback_score_sum": -0.5}
    latency = [s for s in metrics["mergeserve:e2e_request_latency_seconds"] if s.name.endswith("_count")]
    assert [(s.labels["model"], s.value) for s in latency] == [("v1", 1)]
    http = [s for s in metrics["mergeserve:http_requests"] if s.labels["route"] == "/v1/chat/completions"]
    assert [(s.labels["model"], s.labels["status"]) for s in http] == [("v1", "200")]


def _samples(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_the_registry_frees_a_replaced_revision_only_when_its_last_request_ends(server: Server) -> None:
    server.put_and_wait("moe", server.moe())
    lease = server.registry.acquire("moe")  # a request in flight on revision 1
    server.put_and_wait("moe", server.moe(("code", "math")))
    assert server.status("moe")["draining_revisions"] == [1]
    assert lease.backend.name == "moe" and server.registry.acquire("moe").revision.number == 2
    lease.release()
    assert server.status("moe")["draining_revisions"] == []
    loaded = sorted(Path(e["source"]).name for e in server.http.get("/admin/pool", headers=ADMIN).json()["experts"])
    assert loaded == ["base", "code", "math"]  # german was only revision 1's


def test_ready_only_while_a_composition_serves(server: Server) -> None:
    assert server.http.get("/ready").status_code == 503
    server.put("moe", server.moe())
    wait_until(lambda: server.http.get("/ready").status_code == 200, what="ready")
    server.http.delete("/admin/compositions/moe", headers=ADMIN)
    assert server.http.get("/ready").status_code == 503


def test_the_admin_key_is_checked_before_the_body_is_read(server: Server) -> None:
    """Without the key, a malformed or huge body is still 401 (not 422 or 413)."""
    response = server.http.put("/admin/compositions/x", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_a_body_over_the_limit_is_413_even_when_streamed_without_a_length(server: Server) -> None:
    """A chunked body declares no Content-Length: the bytes are counted as they arrive."""
    def chunks():
        yield b'{"base": "'
        for _ in range(40):
            yield b"x" * 32768  # 1.25 MiB in all, past the 1 MiB limit
        yield b'"}'

    response = server.http.put("/admin/compositions/x", content=chunks(), headers={**ADMIN, "Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"
    declared = server.http.put("/admin/compositions/x", content=b"x" * (2 << 20), headers={**ADMIN, "Content-Type": "application/json"})
    assert declared.status_code == 413
    assert server.put_and_wait("small", server.moe())["state"] == "ready"  # the server goes on serving


def test_memory_bytes_is_measured_now_with_the_kv_cache(server: Server) -> None:
    """The KV cache is backed by the OS only where written: a long request makes it grow, and the
    admin API reports the figure of the moment, not the one from the build."""
    server.put_and_wait("moe", server.moe())
    before = server.status("moe")
    server.client.completions.create(model="moe", prompt=[5] * 180, max_tokens=40, extra_body={"ignore_eos": True})
    after = server.status("moe")
    engine = server.registry.revision("moe")[0].backend.engine.host  # the engine that runs it (its base engine, when placed on one)
    per_position = 2 * engine.model.args.n_layers * engine.model.args.n_kv_heads * engine.model.args.head_dim * 4  # K and V, fp32
    assert after["kv_cache_bytes"] >= before["kv_cache_bytes"] + 200 * per_position
    assert after["memory_bytes"] - before["memory_bytes"] == after["kv_cache_bytes"] - before["kv_cache_bytes"]


def test_replacements_stop_at_max_draining_and_builds_at_the_memory_budget(zoo: dict[str, Path]) -> None:
    """A revision with a request in flight stays draining after its replacement: past
    max_draining the next PUT is 409 with Retry-After; past the memory budget (the process's
    resident size, measured at the PUT) a PUT is 507. What serves keeps serving either way."""
    from mergeserve.server.admin_routes import AdminLimits, resident_bytes

    registry, executor = Registry(), Executor()
    builder = Builder(registry, ExpertPool(), executor, EngineConfig(max_num_seqs=4, max_model_len=256))
    auth, draining = Auth(admin_key="admin-key"), AdminLimits(max_draining=1)
    with live_gateway(registry, executor, auth, builder, limits=draining, kind=Server, zoo=zoo) as server:
        server.put_and_wait("moe", server.moe())
        held = registry.acquire("moe")  # a request in flight on revision 1
        server.put_and_wait("moe", server.moe(("code", "math")))  # revision 1 drains
        refused = server.put("moe", server.moe(("german", "math")))
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "too_many_draining"
        assert "Retry-After" in refused.headers
        held.release()  # drained: the next replacement is accepted
        wait_until(lambda: not [r for r in registry.revisions() if r.retired], what="revision 1 to be freed")
        assert server.put_and_wait("moe", server.moe(("german", "math")))["serving_revision"] == 3

        assert server.client.completions.create(model="moe", prompt="hi", max_tokens=2).choices[0].finish_reason

    budget = AdminLimits(memory_budget_bytes=resident_bytes() // 2)  # this process is past it already
    with live_gateway(registry, executor, auth, builder, limits=budget) as over_budget:
        over = over_budget.http.put("/admin/compositions/other", json=server.moe(), headers=ADMIN)
        assert over.status_code == 507 and over.json()["error"]["code"] == "memory_budget"
        assert "memory budget" in over.json()["error"]["message"]
