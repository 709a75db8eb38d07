"""Compositions replaced and an alias re-weighted while streaming clients keep asking: nothing fails,
and every request that starts after a swap is served by the new revision."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

from live import live_server
from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve.server import Registry, create_app
from mergeserve.server.auth import Auth
from mergeserve.server.builder import Builder
from mergeserve.spec import EngineConfig

ADMIN = {"Authorization": "Bearer admin-key"}
CLIENTS = 6
DEADLINE_S = 120  # the whole scenario; it takes a few seconds


@dataclass
class Record:
    model: str
    started: float
    served_by: str = ""  # composition@revision, from system_fingerprint
    finish_reason: str | None = None
    error: str | None = None


def spec(zoo: dict[str, Path], experts: tuple[str, ...], top_k: int) -> dict:
    return {
        "base": str(zoo["base"]), "router": {"kind": "random", "top_k": top_k},
        "experts": [{"name": e, "source": str(zoo[e])} for e in experts],
    }


async def stream_one(client: openai.AsyncOpenAI, model: str, user: str) -> Record:
    record = Record(model, time.monotonic())
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "count"}], max_tokens=8, stream=True, user=user,
        )
        async for chunk in stream:
            record.served_by = record.served_by or chunk.system_fingerprint.rpartition(":")[2]
            for choice in chunk.choices:
                record.finish_reason = choice.finish_reason or record.finish_reason
    except Exception as e:  # noqa: BLE001 - the test counts them
        record.error = repr(e)
    return record


async def put_and_wait(admin: httpx.AsyncClient, path: str, body: dict) -> float:
    """PUT a composition or alias; returns when it serves (the moment later requests must see it)."""
    response = await admin.put(path, json=body)
    assert response.status_code in (200, 202), response.text
    if response.status_code == 202:
        revision = response.json()["revision"]
        while (status := (await admin.get(path)).json())["serving_revision"] != revision:
            assert status["state"] != "failed", status["error"]
            await asyncio.sleep(0.05)
    return time.monotonic()


async def scenario(url: str, zoo: dict[str, Path]) -> tuple[list[Record], dict[str, float]]:
    records: list[Record] = []
    stop = asyncio.Event()
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    async def user_loop(i: int) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not stop.is_set() and time.monotonic() < deadline:
            records.append(await stream_one(client, "moe" if i % 2 else "ab", f"user-{i}-{len(records)}"))

    async with httpx.AsyncClient(base_url=url, headers=ADMIN, timeout=60) as admin:
        await put_and_wait(admin, "/admin/compositions/moe", spec(zoo, ("code", "german", "math"), 2))
        await put_and_wait(admin, "/admin/compositions/alt", spec(zoo, ("german",), 1))
        await put_and_wait(admin, "/admin/aliases/ab", {"targets": {"moe": 1, "alt": 1}, "sticky": "none"})
        users = [asyncio.create_task(user_loop(i)) for i in range(CLIENTS)]
        await asyncio.sleep(0.5)
        swaps = {"moe@2": await put_and_wait(admin, "/admin/compositions/moe", spec(zoo, ("code", "math"), 1))}
        await asyncio.sleep(0.5)
        swaps["moe@3"] = await put_and_wait(admin, "/admin/compositions/moe", spec(zoo, ("math", "german"), 2))
        await asyncio.sleep(0.5)
        swaps["ab->alt"] = await put_and_wait(admin, "/admin/aliases/ab", {"targets": {"alt": 1}})
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*users)
    return records, swaps


def test_streams_survive_two_replacements_and_an_alias_reweight(zoo: dict[str, Path]) -> None:
    registry, executor = Registry(), Executor()
    builder = Builder(registry, ExpertPool(), executor, EngineConfig(max_num_seqs=4, max_model_len=256))
    with live_server(create_app(registry, executor, Auth(admin_key="admin-key"), builder)) as url:
        records, swaps = asyncio.run(scenario(url, zoo))

    assert [r.error for r in records if r.error] == []
    assert {r.finish_reason for r in records} <= {"length", "stop"} and all(r.finish_reason for r in records)
    direct = [r for r in records if r.model == "moe"]
    for revision, at in (("moe@2", swaps["moe@2"]), ("moe@3", swaps["moe@3"])):
        after = [r.served_by for r in direct if r.started > at]
        assert after and all(revision_number(s) >= revision_number(revision) for s in after), (revision, after)
    assert "moe@1" in {r.served_by for r in direct}  # the first swap really happened under traffic
    via_alias = [r.served_by for r in records if r.model == "ab" and r.started > swaps["ab->alt"]]
    assert via_alias and set(via_alias) == {"alt@1"}
    assert {r.served_by for r in records if r.model == "ab"} >= {"alt@1", "moe@1"}
    assert registry.revisions() and all(not r.retired for r in registry.revisions())  # old revisions drained and freed


def revision_number(served_by: str) -> int:
    """`moe@12` -> 12 (compared as a number: as strings, "moe@10" < "moe@2")."""
    return int(served_by.rsplit("@", 1)[1])
