"""The compiled decode step (engine/compiled.py): every block strategy, compiled, decodes what the
eager engine decodes (fp32: the same tokens, log-probabilities within 1e-4), with decode batches
padded to a bucket; compiling happens in the background and a failure leaves the engine eager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import perturbed_copy

from mergeserve.engine.engine import Engine
from mergeserve.engine.sequence import SamplingParams
from mergeserve.experts import ExpertPool
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


def composition(base: Path, experts: dict[str, Path], **router):
    return build(parse_composition({
        "name": "compiled", "base": str(base), "router": router,
        "experts": [{"name": n, "source": str(p), "prompts": [PROMPTS[NAMES.index(n)]]} for n, p in experts.items()],
    }), ExpertPool())


def engine(composed, **compile) -> Engine:
    return Engine(composed, EngineConfig(max_num_seqs=4, max_prefill_tokens=16, max_model_len=128, compile=compile))


def decode(e: Engine) -> dict[str, tuple[list[int], list[float]]]:
    """Greedy tokens and their log-probabilities for three requests of different lengths, so the
    decode batch runs at 3, 2 and 1 rows (all in the bucket of 4). The first arrives a step
    ahead: its prompt is a prefill of one chunk, the others' share a step."""
    out = {str(i): ([], []) for i in range(len(PROMPTS))}

    def step() -> None:
        for o in e.step():
            out[o.request_id][0].extend(o.new_token_ids)
            out[o.request_id][1].extend(lp.logprob for lp in o.logprobs)

    for i, prompt in enumerate(PROMPTS):
        e.add_request(str(i), e.tokenizer(prompt)["input_ids"], SamplingParams(max_tokens=4 + 3 * i, temperature=0,
                                                                              ignore_eos=True, logprobs=0))
        if i == 0:
            step()
    while e.has_work():
        step()
    return out


def assert_compiled_decodes_like_eager(composed, inductor_cache: str, autotune: bool = False) -> None:
    compiled = engine(composed, enabled=True, autotune=autotune, buckets=[4], cache_dir=inductor_cache)
    assert compiled.runner.compiled.wait(timeout=900), compiled.compile_state
    got, want = decode(compiled), decode(engine(composed))
    state = compiled.compile_state
    assert state["status"] == "ready" and state["ready_buckets"] == [4] and state["prefill"]["ready"]
    assert state["compiled_steps"] > 0 and state["eager_steps"] == 0, state
    assert state["prefill"]["compiled_steps"] > 0, state["prefill"]
    for rid, (tokens, logprobs) in want.items():
        assert got[rid][0] == tokens
        assert got[rid][1] == pytest.approx(logprobs, abs=1e-4)


def test_token_routed_lora_experts_compiled_with_autotuned_kernels(zoo, adapters, inductor_cache):
    composed = composition(zoo["base"], adapters, kind="hidden", top_k=2)
    assert_compiled_decodes_like_eager(composed, inductor_cache, autotune=True)


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


def test_a_base_engine_says_it_serves_eagerly(zoo, adapters):
    from mergeserve.engine.base_engine import BaseEngine

    composed = composition(zoo["base"], adapters, kind="hidden", top_k=2)
    base = BaseEngine(composed, EngineConfig(max_num_seqs=4, max_model_len=128, compile={"enabled": True}))
    assert base.compile_state["status"] == "unsupported" and "base engine" in base.compile_state["error"]


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
