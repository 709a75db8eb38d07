"""The admin API's state survives the process: kill -9 mid-operation, restart, same compositions and aliases."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import yaml

from live import free_port, server_process, wait_until
from mergeserve.server.aliases import Alias
from mergeserve.server.state import SavedComposition, SavedState, StateStore

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
        assert http.get("/admin/aliases").json()["data"] == [{"name": "ab"} | alias]
        experts = http.get("/admin/compositions/second").json()["spec"]["experts"]
        assert [e["name"] for e in experts] == ["code", "german"]
        answer = http.post("/v1/completions", json={"model": "ab", "prompt": "hi", "max_tokens": 2})
        assert answer.status_code == 200 and answer.json()["model"] in ("first", "second")


def test_a_crash_while_writing_leaves_the_previous_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path)
    before = SavedState(aliases={"ab": Alias(targets={"x": 1})})
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
