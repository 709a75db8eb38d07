"""One engine per base: compositions that are low-rank over one base share its engine, one
forward per step. Each request must come out as it does in an engine of its own composition."""

from __future__ import annotations

import threading

import pytest
import torch

from mergeserve.engine.base_engine import BaseEngine
from mergeserve.engine.base_model import Row, StepRouting
from mergeserve.engine.engine import Engine
from mergeserve.engine.sequence import SamplingParams
from mergeserve.engine.tables import NotLowRank
from mergeserve.experts import ExpertPool
from mergeserve.learn.compose import build
from mergeserve.spec import EngineConfig, parse_composition

PROMPTS = {
    "code": "def add(a, b):\n    return a + b\n",
    "german": "Die Katze schläft im Haus.",
    "math": "What is 12 + 7?",
}
CONFIG = EngineConfig(max_num_seqs=8, max_prefill_tokens=24, max_model_len=128)
GREEDY = dict(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)


def spec(name: str, base, adapters: dict, **fields):
    experts = [{"name": n, "source": str(p), "prompts": [PROMPTS[n]]} for n, p in adapters.items()]
    return parse_composition({"name": name, "base": str(base), "experts": experts, **fields})


@pytest.fixture(scope="module")
def four(zoo, adapters):
    """The issue's four kinds over one base: BTX token-routed, routed attention, per-request
    merging, a single adapter."""
    base = zoo["base"]
    return [
        spec("btx", base, adapters, router={"kind": "hidden", "top_k": 2}),
        spec("routed", base, adapters, router={"kind": "hidden", "top_k": 2, "attention": "routed"}),
        spec("per-request", base, adapters, method="mergeme",
             router={"kind": "perplexity", "top_k": 2, "attention": "dynamic", "inverse_temperature": 10}),
        spec("single", base, {"math": adapters["math"]}),
    ]


def run(engine, placed: dict, requests: list[tuple[str, str]]) -> dict[str, tuple[list[int], list[float]]]:
    """Add every (composition, prompt) request at once, step to the end; tokens and logprobs per request."""
    out = {}
    for i, (comp, prompt) in enumerate(requests):
        rid = f"{comp}-{i}"
        ids = placed[comp].tokenizer(PROMPTS[prompt])["input_ids"]
        placed[comp].add_request(rid, ids, SamplingParams(**GREEDY))
        out[rid] = ([], [])
    while engine.has_work():
        for o in engine.step():
            out[o.request_id][0].extend(o.new_token_ids)
            out[o.request_id][1].extend(lp.logprob for lp in o.logprobs)
    return out


def assert_same(got: tuple[list[int], list[float]], want: tuple[list[int], list[float]], what) -> None:
    assert got[0] == want[0], what
    torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(want[1]), atol=1e-4, rtol=0)


def test_each_composition_alone_on_a_base_engine_equals_its_own_engine(four):
    pool = ExpertPool()
    for c in [build(s, pool) for s in four]:
        shared, own = BaseEngine(c, CONFIG), Engine(c, CONFIG)
        requests = [(c.name, p) for p in PROMPTS]
        got = run(shared, {c.name: shared.place(c)}, requests)
        want = run(own, {c.name: own}, requests)
        for rid in want:
            assert_same(got[rid], want[rid], (c.name, rid))


def test_four_compositions_in_one_batch_equal_each_alone(four):
    pool = ExpertPool()
    composed = [build(s, pool) for s in four]
    shared = BaseEngine(composed[0], CONFIG)
    placed = {c.name: shared.place(c) for c in composed}
    requests = [(c.name, p) for c in composed for p in PROMPTS]
    together = run(shared, placed, requests)
    for c in composed:
        alone = Engine(c, CONFIG)
        expected = run(alone, {c.name: alone}, [(c.name, p) for p in PROMPTS])
        for i, p in enumerate(PROMPTS):
            rid = next(r for r, (name, prompt) in zip(together, requests) if name == c.name and prompt == p)
            assert_same(together[rid], expected[f"{c.name}-{i}"], (c.name, p))


def test_a_dense_merge_is_refused_by_a_base_engine(zoo, adapters):
    pool = ExpertPool()
    shared = BaseEngine(build(spec("btx", zoo["base"], adapters, router={"kind": "random", "top_k": 2}), pool), CONFIG)
    ties = build(spec("ties", zoo["base"], adapters, method="ties"), pool)
    with pytest.raises(NotLowRank):
        shared.place(ties)


def test_compositions_of_one_base_share_its_engine_behind_the_admin_api(zoo, adapters):
    """A composition alone on its base runs in an engine of its own (placement auto); when a second
    one over that base arrives, both run on the base's engine (the first is rebuilt there) and the
    admin API says so; each answers with its own routing; deleting one leaves the other serving."""
    from live import live_gateway, wait_until
    from mergeserve.engine.executor import Executor
    from mergeserve.server import Registry
    from mergeserve.server.auth import Auth
    from mergeserve.server.builder import Builder

    registry, executor = Registry(), Executor()
    builder = Builder(registry, ExpertPool(), executor, EngineConfig(max_num_seqs=4, max_model_len=128))
    experts = [{"name": n, "source": str(p), "prompts": [PROMPTS[n]]} for n, p in adapters.items()]
    spec = {"base": str(zoo["base"]), "experts": experts}
    with live_gateway(registry, executor, Auth(admin_key="k"), builder) as server:
        a = server.put_and_wait("a", {**spec, "router": {"kind": "hidden", "top_k": 2}})
        assert a["backend"]["placement"] == {"engine": "own"}
        b = server.put_and_wait("b", {**spec, "router": {"kind": "centroid", "top_k": 1}})
        assert b["backend"]["placement"]["engine"] == "base"
        wait_until(lambda: server.status("a")["revision"] == a["revision"] + 1 and server.status("a")["state"] == "ready",
                   what="a to move onto the base engine")
        assert server.status("a")["backend"]["placement"]["compositions"] == ["b", "a"]
        for name in ("a", "b"):
            answer = server.client.completions.create(model=name, prompt="What is 12 + 7?", max_tokens=4, temperature=0)
            assert answer.choices[0].text and answer.model == name
        assert server.http.delete("/admin/compositions/b", headers=server.admin).status_code == 200
        wait_until(lambda: server.status("a")["backend"]["placement"]["compositions"] == ["a"], what="b to be freed")
        assert server.client.completions.create(model="a", prompt="Hi", max_tokens=2).choices[0].text is not None
    builder.shutdown()


def test_tables_of_many_entries_slice_out_those_in_use_and_agree(four, monkeypatch):
    """Past DENSE_MAX_ENTRIES a base engine keeps the adapters' own factors and each forward runs
    only the entries its tokens use (attention terms, the MoE kernel): the same requests give the
    same tokens and logprobs."""
    from mergeserve.engine import tables

    pool = ExpertPool()
    composed = [build(s, pool) for s in four]
    requests = [(c.name, p) for c in composed for p in PROMPTS]
    results = []
    for dense_max in (tables.DENSE_MAX_ENTRIES, 0):
        monkeypatch.setattr(tables, "DENSE_MAX_ENTRIES", dense_max)
        shared = BaseEngine(composed[0], CONFIG)
        results.append(run(shared, {c.name: shared.place(c) for c in composed}, requests))
    for rid in results[0]:
        assert_same(results[1][rid], results[0][rid], rid)


def test_the_attention_most_compositions_share_is_folded_into_the_weights(zoo, adapters):
    """Two routers over the same experts hold the same averaged attention: it becomes each layer's
    anchor, folded into its q/k/v and o, and their tokens run no attention terms. When they go,
    the composition left (a single adapter) gets its attention folded instead."""
    pool = ExpertPool()
    single, hidden, centroid = (
        build(spec("single", zoo["base"], {"math": adapters["math"]}), pool),
        build(spec("hidden", zoo["base"], adapters, router={"kind": "hidden", "top_k": 2}), pool),
        build(spec("centroid", zoo["base"], adapters, router={"kind": "centroid", "top_k": 2}), pool),
    )
    shared = BaseEngine(hidden, CONFIG)
    placed = [shared.place(c) for c in (single, hidden, centroid)]
    tables = shared.runner.tables
    averaged = placed[1].tables.layers[0].attention
    assert tables.layers()[0].anchor.key == averaged.key == placed[2].tables.layers[0].attention.key
    x = torch.randn(5, hidden.config.hidden_size)
    two_routers = StepRouting([Row(placed[1].tables, 3), Row(placed[2].tables, 2)])
    assert two_routers.attention_gate(0, x, tables.attention[0].size, tables.layers()[0].anchor) is None
    with_single = StepRouting([Row(placed[0].tables, 3), Row(placed[1].tables, 2)])
    gate = with_single.attention_gate(0, x, tables.attention[0].size, tables.layers()[0].anchor)
    assert gate[3:].abs().sum() == 0 and gate[:3].abs().sum() > 0  # only the single adapter's tokens carry terms
    placed[1].close(), placed[2].close()
    assert tables.layers()[0].anchor.key == placed[0].tables.layers[0].attention.key


def test_tables_of_many_entries_hold_the_adapters_own_factors(four, monkeypatch):
    """Past DENSE_MAX_ENTRIES no stacked copy of the adapters is made: each entry's A (and B^T)
    is the tensor the pool loaded (a lower-rank adapter's are zero-padded to the table's rank)."""
    from mergeserve.engine import tables as tables_module

    monkeypatch.setattr(tables_module, "DENSE_MAX_ENTRIES", 0)
    pool = ExpertPool()
    composed = [build(s, pool) for s in four]
    shared = BaseEngine(composed[0], CONFIG)
    for c in composed:
        shared.place(c)
    tables = shared.runner.tables
    layer = tables.layers()[0]
    for factors, entries in ((layer.attention.qkv.parts[0], tables.attention[0]), (layer.ffn.up, tables.ffn[0])):
        own = [(j, part[1 if factors is layer.ffn.up else 0]) for j, part in enumerate(entries.parts) if part]
        full = [(j, w) for j, w in own if w is not None and w.rank == factors.rank]
        assert full, "the highest-rank adapter is held as it is"
        for j, w in full:
            assert factors.a[j].data_ptr() == w.a.data_ptr() and factors.bt[j].data_ptr() == w.b.data_ptr()


def test_placement_own_gives_every_composition_an_engine_of_its_own(zoo, adapters):
    from mergeserve.engine.executor import Executor
    from mergeserve.kernels.packed import WeightPacker
    from mergeserve.server.placement import BaseEngines

    pool = ExpertPool()
    composed = [build(spec(n, zoo["base"], adapters, router={"kind": "random", "top_k": 2}), pool) for n in ("a", "b")]
    for policy, placed in (("own", [False, False]), ("auto", [False, True]), ("base", [True, True])):
        bases = BaseEngines(EngineConfig(placement=policy), WeightPacker(), Executor())
        assert [bases.place(c, f"{c.name}@1")[0] is not None for c in composed] == placed, policy


def test_int8_and_bf16_compositions_over_one_base_run_in_base_engines_of_their_own_format(zoo, adapters):
    from mergeserve.engine.executor import Executor
    from mergeserve.kernels.int8 import Int8, int8_works
    from mergeserve.server.placement import BaseEngines

    pool = ExpertPool()
    bases = BaseEngines(EngineConfig(placement="base", max_model_len=128), pool.packer, Executor())
    # dtype int8 and bfloat16 load the same bf16 checkpoints: one base, two formats.
    specs = [spec(n, zoo["base"], adapters, router={"kind": "random", "top_k": 2}, dtype=d)
             for n, d in (("a", "int8"), ("b", "int8"), ("c", "bfloat16"))]
    a, b, c = (bases.place(build(s, pool), f"{s.name}@1")[0] for s in specs)
    assert a.base_engine is b.base_engine and c.base_engine is not a.base_engine
    assert isinstance(a.base_engine.runner.model.runs[0].qkv, Int8) == int8_works()
    assert not isinstance(c.base_engine.runner.model.runs[0].qkv, Int8)
    with pytest.raises(NotLowRank, match="int8"):
        c.base_engine.place(build(specs[0], pool))
    tokens, logprobs = run(a.base_engine, {"a": a, "b": b}, [("a", "math"), ("b", "code")])["b-1"]
    assert len(tokens) == 6 and all(lp <= 0 for lp in logprobs)


def test_counting_a_compositions_requests_from_another_thread_survives_a_changing_queue(four):
    """The event loop asks how many requests a placed composition has (admission limits) while
    the executor thread moves sequences between queues."""


    single = build(four[3], ExpertPool())
    engine = BaseEngine(single, CONFIG)
    placed = engine.place(single)
    ids = placed.tokenizer(PROMPTS["math"])["input_ids"]
    seqs = [placed.sequence(f"r{i}", ids, SamplingParams(**GREEDY)) for i in range(2000)]
    engine.scheduler.waiting.extend(seqs)
    stop = threading.Event()

    def churn() -> None:  # what the executor does to the queue, as fast as it can
        while not stop.is_set():
            engine.scheduler.waiting.append(engine.scheduler.waiting.popleft())

    mover = threading.Thread(target=churn)
    mover.start()
    try:
        counts = [placed.num_waiting for _ in range(200)]
    finally:
        stop.set()
        mover.join()
    assert set(counts) <= {1999, 2000}  # one sequence may be between popleft and append
