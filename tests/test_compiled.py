"""The compiled decode step (engine/compiled.py): every block strategy, compiled, decodes what the
eager engine decodes (fp32: the same tokens, log-probabilities within 1e-4), with decode batches
padded to a bucket; compiling happens in the background and a failure leaves the engine eager."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import perturbed_copy

from mergeserve.engine.engine import Engine
from mergeserve.engine.sequence import SamplingParams
from mergeserve.experts import ExpertPool
from mergeserve.kernels.int8 import Int8, int8_works
from mergeserve.learn.compose import build
from mergeserve.spec import EngineConfig, parse_composition
from mergeserve.weights import LowRank

PROMPTS = ("def add(a, b):\n    return a + b\n", "Die Katze schläft im Haus.", "What is 12 + 7?")
NAMES = ("code", "german", "math")


@pytest.fixture(scope="module")
def layer_experts(zoo, tmp_path_factory) -> dict[str, Path]:
    """Dense fine-tune stand-ins that change only the decoder layers."""
    root = tmp_path_factory.mktemp("layer_experts")
    return {n: perturbed_copy(zoo["base"], root / n, seed=i + 1, only="model.layers.") for i, n in enumerate(NAMES)}


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("inductor"))


def spec(base: Path, experts: dict[str, Path], name: str = "compiled", dtype: str = "float32", **router) -> dict:
    return {"name": name, "base": str(base), "router": router, "dtype": dtype,
            "experts": [{"name": n, "source": str(p), "prompts": [PROMPTS[NAMES.index(n)]]} for n, p in experts.items()]}


def composition(base: Path, experts: dict[str, Path], name: str = "compiled", pool: ExpertPool | None = None,
                dtype: str = "float32", **router):
    return build(parse_composition(spec(base, experts, name, dtype, **router)), pool or ExpertPool())


def engine(composed, **compile) -> Engine:
    return Engine(composed, EngineConfig(max_num_seqs=4, max_prefill_tokens=16, max_model_len=128, compile=compile))


def decode(e: Engine, faces: list | None = None) -> dict[str, tuple[list[int], list[float]]]:
    """Greedy tokens and their log-probabilities for every prompt sent to each of `faces` (the
    compositions placed on a base engine `e`; default: `e` itself), of different lengths, so the
    decode batch shrinks as they finish. The first arrives a step ahead: its prompt is a prefill
    of one chunk, the others' share a step."""
    requests = [(face, prompt) for face in (faces or [e]) for prompt in PROMPTS]
    out = {str(i): ([], []) for i in range(len(requests))}

    def step() -> None:
        for o in e.step():
            out[o.request_id][0].extend(o.new_token_ids)
            out[o.request_id][1].extend(lp.logprob for lp in o.logprobs)

    for i, (face, prompt) in enumerate(requests):
        face.add_request(str(i), face.tokenizer(prompt)["input_ids"],
                         SamplingParams(max_tokens=4 + 3 * (i % len(PROMPTS)), temperature=0, ignore_eos=True, logprobs=0))
        if i == 0:
            step()
    while e.has_work():
        step()
    return out


def assert_same_decodes(got: dict, want: dict, abs: float = 1e-4) -> None:
    for rid, (tokens, logprobs) in want.items():
        assert got[rid][0] == tokens, rid
        assert got[rid][1] == pytest.approx(logprobs, abs=abs), rid


def assert_compiled_decodes_like_eager(composed, inductor_cache: str, autotune: bool = False, abs: float = 1e-4) -> Engine:
    compiled = engine(composed, enabled=True, autotune=autotune, buckets=[4], cache_dir=inductor_cache)
    assert compiled.runner.compiled.wait(timeout=900), compiled.compile_state
    got, want = decode(compiled), decode(engine(composed))
    state = compiled.compile_state
    assert state["status"] == "ready" and state["ready_buckets"] == [4] and state["prefill"]["ready"]
    assert state["compiled_steps"] > 0 and state["eager_steps"] == 0, state
    # every prefill compiled: the first prompt's alone, the others' chunks packed into one row
    assert state["prefill"]["compiled_steps"] > 0 and state["prefill"]["eager_steps"] == 0, state["prefill"]
    assert_same_decodes(got, want, abs)
    return compiled


def test_token_routed_lora_experts_compiled_with_autotuned_kernels(zoo, adapters, inductor_cache):
    composed = composition(zoo["base"], adapters, kind="hidden", top_k=2)
    assert_compiled_decodes_like_eager(composed, inductor_cache, autotune=True)


@pytest.mark.skipif(not int8_works(), reason="torch's _weight_int8pack_mm does not run here")
def test_int8_weights_compiled_run_as_int8(zoo, adapters, inductor_cache):
    """The graph runs int8 weights (the base's copies shared with the eager engine); bf16 activations round alike, not bit for bit."""
    composed = composition(zoo["base"], adapters, dtype="int8", kind="hidden", top_k=2)
    compiled = assert_compiled_decodes_like_eager(composed, inductor_cache, abs=2e-2)
    graph, eager = compiled.runner.compiled.model.run_layers[0], compiled.runner.model.run_layers[0]
    shared = graph.lora.gate_up, eager.lora.gate_up  # the base FFN's int8 copy: one for both
    assert isinstance(shared[0], Int8) and shared[0].weight.data_ptr() == shared[1].weight.data_ptr()
    assert isinstance(graph.o_proj, Int8)


def test_prompts_prefilled_in_one_step_run_packed_in_the_prefill_graph(zoo, adapters, inductor_cache):
    """Three prompts of different lengths arrive together: one prefill step, their chunks packed
    into one row of the compiled graph, and each request comes out as it does eagerly."""
    composed = composition(zoo["base"], adapters, kind="hidden", top_k=2)

    def first_step(**compile) -> tuple[Engine, dict]:
        e = Engine(composed, EngineConfig(max_num_seqs=4, max_prefill_tokens=128, max_model_len=128, compile=compile))
        if compile:
            assert e.runner.compiled.wait(timeout=900), e.compile_state
        for i, prompt in enumerate(PROMPTS):
            e.add_request(str(i), e.tokenizer(prompt)["input_ids"], SamplingParams(max_tokens=1, temperature=0, logprobs=0))
        return e, {o.request_id: (o.new_token_ids, [lp.logprob for lp in o.logprobs]) for o in e.step()}

    compiled, got = first_step(enabled=True, autotune=False, buckets=[4], cache_dir=inductor_cache)
    eager, want = first_step()
    assert sorted(got) == ["0", "1", "2"]  # every prompt prefilled in the one step
    assert compiled.compile_state["prefill"]["compiled_steps"] == 1 and compiled.compile_state["prefill"]["eager_steps"] == 0
    assert_same_decodes(got, want)
    assert compiled.expert_load.tolist() == eager.expert_load.tolist()  # the packed tokens' picks, padding none


def test_routed_attention_compiled(zoo, adapters, inductor_cache):
    composed = composition(zoo["base"], adapters, kind="hidden", top_k=2, attention="routed")
    assert_compiled_decodes_like_eager(composed, inductor_cache)


def test_per_request_merging_compiled(zoo, adapters, inductor_cache):
    composed = composition(zoo["base"], adapters, kind="perplexity", top_k=2, attention="dynamic")
    assert_compiled_decodes_like_eager(composed, inductor_cache)


def test_dense_experts_compiled(zoo, inductor_cache):
    composed = composition(zoo["base"], {n: zoo[n] for n in NAMES}, kind="hidden", top_k=2)
    assert_compiled_decodes_like_eager(composed, inductor_cache)


def test_dense_and_lora_experts_in_one_moe_compiled(zoo, adapters, layer_experts, inductor_cache):
    composed = composition(zoo["base"], {"code": adapters["code"], "german": layer_experts["german"],
                                         "math": adapters["math"]}, kind="hidden", top_k=2)
    kinds = [type(e.gate_proj) for e in composed.layers[0].experts]
    assert kinds == [LowRank, torch.Tensor, LowRank]  # the MoE runs the LoRA kernel and the dense op side by side
    assert_compiled_decodes_like_eager(composed, inductor_cache)


def test_a_mixture_router_over_moe_ffns_compiled(zoo, adapters, inductor_cache):
    composed = composition(zoo["base"], adapters, kind="perplexity", top_k=2, attention="merged")
    assert_compiled_decodes_like_eager(composed, inductor_cache)


def test_separate_attention_compiled(zoo, layer_experts, inductor_cache):
    composed = composition(zoo["base"], layer_experts, kind="perplexity", top_k=2, attention="separate")
    assert_compiled_decodes_like_eager(composed, inductor_cache)


# A server process: it compiles its composition's step unfrozen into a cache folder and says how it went.
SERVER = """
import json, sys
from mergeserve.engine.engine import Engine
from mergeserve.experts import ExpertPool
from mergeserve.learn.compose import build
from mergeserve.spec import EngineConfig, parse_composition
spec, cache = json.loads(sys.argv[1]), sys.argv[2]
compile = dict(enabled=True, freeze=False, buckets=[4], cache_dir=cache)
engine = Engine(build(parse_composition(spec), ExpertPool()), EngineConfig(max_num_seqs=4, max_model_len=128, compile=compile))
engine.runner.compiled.wait(900)
print(json.dumps(engine.compile_state))
"""


def test_a_restart_loads_unfrozen_graphs_whole_from_the_cache(zoo, adapters, tmp_path):
    def start() -> dict:
        done = subprocess.run([sys.executable, "-c", SERVER, json.dumps(spec(zoo["base"], adapters, kind="hidden", top_k=2)),
                               str(tmp_path)], capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.splitlines()[-1])

    cold, warm = start(), start()
    assert cold["status"] == warm["status"] == "ready", (cold, warm)
    assert cold["cached_graphs"] == 0
    assert warm["cached_graphs"] >= 2  # the bucket's decode graph and the prefill graph, from disk


def test_unfrozen_graphs_decode_like_eager_in_engines_of_one_shape(zoo, adapters, inductor_cache):
    """Two engines of the same shapes may share one unfrozen graph: each still runs its own
    weights, KV cache and expert pieces (what the graph reads of them are inputs and guards)."""
    both = [composition(zoo["base"], adapters, kind=kind, top_k=2, attention="routed") for kind in ("hidden", "centroid")]
    compiled = [engine(c, enabled=True, freeze=False, buckets=[4], cache_dir=inductor_cache) for c in both]
    for e in compiled:
        assert e.runner.compiled.wait(timeout=900), e.compile_state
    for e, c in zip(compiled, both):
        assert_same_decodes(decode(e), decode(engine(c)))
        assert e.compile_state["compiled_steps"] > 0 and e.compile_state["eager_steps"] == 0


def test_router_statistics_count_real_rows_only(zoo, adapters, inductor_cache):
    composed = composition(zoo["base"], adapters, kind="hidden", top_k=2)
    compiled = engine(composed, enabled=True, autotune=False, buckets=[4], cache_dir=inductor_cache)
    compiled.runner.compiled.wait(timeout=900)
    eager = engine(composed)
    decode(compiled), decode(eager)
    assert compiled.compile_state["compiled_steps"] > 0 and compiled.compile_state["eager_steps"] == 0
    assert compiled.expert_load.tolist() == eager.expert_load.tolist()


def test_a_compile_that_fails_leaves_the_engine_eager_with_its_reason(zoo, adapters, tmp_path):
    not_a_folder = tmp_path / "not-a-folder"
    not_a_folder.write_text("")
    composed = composition(zoo["base"], adapters, kind="hidden", top_k=2)
    broken = engine(composed, enabled=True, autotune=False, buckets=[4], cache_dir=str(not_a_folder))
    assert not broken.runner.compiled.wait(timeout=900)
    state = broken.compile_state
    assert state["status"] == "failed" and state["error"] and state["ready_buckets"] == []
    assert decode(broken) == decode(engine(composed))
    assert broken.compile_state["compiled_steps"] == 0


def test_a_base_engine_compiled_serves_four_kinds_of_composition_in_one_step_like_eager(zoo, adapters, inductor_cache):
    """The graph holds the base; each row's composition (token-routed, routed attention,
    per-request merging, a single adapter) comes in by operator, so one graph serves any mix."""
    from mergeserve.engine.base_engine import BaseEngine

    pool = ExpertPool()
    kinds = {"btx": dict(kind="hidden", top_k=2), "routed": dict(kind="hidden", top_k=2, attention="routed"),
             "per-request": dict(kind="perplexity", top_k=2, attention="dynamic", inverse_temperature=10)}
    composed = [composition(zoo["base"], adapters, name, pool, **router) for name, router in kinds.items()]
    composed.append(composition(zoo["base"], {"math": adapters["math"]}, "single", pool))

    def base_engine(**compile) -> tuple[BaseEngine, list]:
        e = BaseEngine(composed[0], EngineConfig(max_num_seqs=16, max_prefill_tokens=16, max_model_len=128, compile=compile))
        return e, [e.place(c) for c in composed]

    compiled, faces = base_engine(enabled=True, autotune=False, buckets=[16], cache_dir=inductor_cache)
    assert compiled.runner.compiled.wait(timeout=900), compiled.compile_state
    got = decode(compiled, faces)
    eager, eager_faces = base_engine()
    assert_same_decodes(got, decode(eager, eager_faces))
    state = faces[0].compile_state
    assert state["compiled_steps"] > 0 and state["eager_steps"] == 0, state
    assert state["prefill"]["compiled_steps"] > 0 and state["prefill"]["eager_steps"] == 0, state
    for mine, theirs in zip(faces, eager_faces):  # the picks of the compiled step, counted per composition
        assert mine.tables.expert_load.tolist() == theirs.tables.expert_load.tolist()


def test_the_admin_api_shows_the_compiled_step_while_the_server_answers(zoo, adapters, inductor_cache):
    from live import live_gateway, wait_until

    from mergeserve.engine.executor import Executor
    from mergeserve.server.auth import Auth
    from mergeserve.server.backends.local import LocalBackend
    from mergeserve.server.registry import Registry

    composed = composition(zoo["base"], adapters, kind="hidden", top_k=2)
    served = engine(composed, enabled=True, autotune=False, buckets=[1], cache_dir=inductor_cache)
    executor = Executor()
    with live_gateway(Registry([LocalBackend(served, executor)]), executor, Auth(admin_key="admin-key")) as gateway:
        ask = dict(model="compiled", messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0)
        first = gateway.client.chat.completions.create(**ask)  # answered while (or after) it compiles
        wait_until(lambda: gateway.status("compiled")["compile"]["status"] == "ready", timeout=600, what="the compiled step")
        again = gateway.client.chat.completions.create(**ask)
        state = gateway.status("compiled")["compile"]
    assert first.choices[0].message.content == again.choices[0].message.content
    assert state["ready_buckets"] == [1] and state["compiled_steps"] > 0 and state["bucket_seconds"]["1"] > 0
