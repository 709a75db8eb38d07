"""The admin API's state survives the process: kill -9 mid-operation, restart, same compositions and aliases."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import httpx
import pytest
import yaml

from live import free_port, live_server, server_process, wait_until
from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve.server import Registry, create_app
from mergeserve.server.auth import Auth
from mergeserve.server.builder import Builder
from mergeserve.server.state import SavedComposition, SavedState, StateStore
from mergeserve.spec import AliasSpec, EngineConfig

ADMIN = {"Authorization": "Bearer admin-key"}


def moe(zoo: dict[str, Path], *experts: str) -> dict:
    return {
        "base": str(zoo["base"]), "router": {"kind": "random", "top_k": 1},
        "experts": [{"name": e, "source": str(zoo[e])} for e in experts],
    }


def served(http: httpx.Client) -> dict[str, int | None]:
    return {c["name"]: c["serving_revision"] for c in http.get("/admin/compositions").json()["data"]}


def test_compositions_and_aliases_come_back_after_a_kill(zoo: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "compositions": [{"name": "first"} | moe(zoo, "code", "math")],
        "state_dir": "state", "admin_key": "admin-key", "source_roots": [str(zoo["base"].parent)],
    }))
    port, log = free_port(), tmp_path / "server.log"
    with server_process(config, port, log, headers=ADMIN) as (http, _):
        assert http.put("/admin/compositions/second", json=moe(zoo, "german")).status_code == 202
        wait_until(lambda: served(http).get("second") == 1, what="second to build")
        assert http.put("/admin/compositions/first", json=moe(zoo, "math")).status_code == 202
        wait_until(lambda: served(http).get("first") == 2, what="first to be replaced")
        alias = {"targets": {"first": 1.0, "second": 3.0}, "sticky": "user"}
        assert http.put("/admin/aliases/ab", json=alias).status_code == 200
        # Killed while this replacement may still be building: it was accepted, so it comes back.
        assert http.put("/admin/compositions/second", json=moe(zoo, "code", "german")).status_code == 202

    with server_process(config, port, log, headers=ADMIN) as (http, _):
        wait_until(lambda: served(http) == {"first": 2, "second": 2}, what="the saved state to be rebuilt")
        [restored] = http.get("/admin/aliases").json()["data"]
        assert restored == {"name": "ab", **alias, "rollout": None, "weights": alias["targets"], "generation": 1,
                            "rollout_status": None}
        experts = http.get("/admin/compositions/second").json()["spec"]["experts"]
        assert [e["name"] for e in experts] == ["code", "german"]
        answer = http.post("/v1/completions", json={"model": "ab", "prompt": "hi", "max_tokens": 2})
        assert answer.status_code == 200 and answer.json()["model"] in ("first", "second")


def test_a_crash_while_writing_leaves_the_previous_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path)
    before = SavedState(aliases={"ab": AliasSpec(targets={"x": 1})})
    store.save(before)

    def crash(*_: object) -> None:
        raise OSError("disk pulled out")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.save(SavedState(compositions={"x": SavedComposition(revision=1, spec={})}))
    monkeypatch.undo()
    (tmp_path / ".state.json.half-written.tmp").write_text('{"compositions": {"x"')  # what a kill -9 can leave
    assert store.load() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == [".state.json.half-written.tmp"]


def test_a_state_write_that_fails_is_a_500_and_what_serves_keeps_serving(
    zoo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Disk full (injected into the state folder's writes): the admin call says why, the state file
    keeps the previous state, and the live composition goes on answering."""
    registry, executor = Registry(), Executor()
    builder = Builder(registry, ExpertPool(), executor, EngineConfig(max_num_seqs=2, max_model_len=128), StateStore(tmp_path))
    with live_server(create_app(registry, executor, Auth(admin_key="admin-key"), builder)) as url, \
            httpx.Client(base_url=url, timeout=30, headers=ADMIN) as http:
        assert http.put("/admin/compositions/first", json=moe(zoo, "code")).status_code == 202
        wait_until(lambda: served(http).get("first") == 1, what="first to build")
        saved = (tmp_path / "state.json").read_bytes()
        real_mkstemp = tempfile.mkstemp

        def disk_full(*args, **kwargs):
            if kwargs.get("dir") == tmp_path:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_mkstemp(*args, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", disk_full)
        for response in (http.put("/admin/compositions/first", json=moe(zoo, "math")),
                         http.put("/admin/aliases/ab", json={"targets": {"first": 1.0}})):
            assert response.status_code == 500
            assert response.json()["error"]["code"] == "state_not_saved" and "No space left on device" in response.json()["error"]["message"]
        monkeypatch.undo()
        assert (tmp_path / "state.json").read_bytes() == saved and StateStore(tmp_path).load() is not None
        assert served(http) == {"first": 1}
        answer = http.post("/v1/completions", json={"model": "first", "prompt": "hi", "max_tokens": 2})
        assert answer.status_code == 200
