"""LoRA experts kept as factors: the pool, the LoRA-expert kernel and every composition built
from them, each checked against the same thing done with dense merged experts or with peft."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from tiny import FFN_PROJECTIONS, make_adapter, perturbed_copy
from transformers import AutoModelForCausalLM

from mergeserve.weights import ExpertFFN, LowRank, dense

from mergeserve.engine.engine import Engine
from mergeserve.engine.sequence import SamplingParams
from mergeserve.experts import CheckpointError, ExpertPool
from mergeserve.export import export_composition
from mergeserve.kernels import LoraExperts, lora_moe_ffn
from mergeserve.learn.compose import build
from mergeserve.router.arrow import factor_subspace, subspace
from mergeserve.spec import EngineConfig, parse_composition

TEXTS = ("def add(a, b):\n    return a + b\n", "Die Katze schläft im Haus.", "What is 12 + 7?", "Hello, how are you today?")


@pytest.fixture(scope="module")
def ffn_adapters(zoo, tmp_path_factory) -> dict[str, Path]:
    """Adapters on the FFN only: routed to one expert, a BTX MoE of them is that adapter's own model."""
    root = tmp_path_factory.mktemp("ffn_adapters")
    return {n: make_adapter(zoo["base"], root / n, i + 4, FFN_PROJECTIONS, r=2 + 2 * i) for i, n in enumerate(["math", "code", "german"])}


def spec_of(base: Path, experts: dict[str, Path], **fields):
    return parse_composition({
        "name": "moe", "base": str(base), "router": {"kind": "random", "top_k": 2},
        "experts": [{"name": n, "source": str(p)} for n, p in experts.items()], **fields,
    })


def engine(spec, lora: str = "factored") -> Engine:
    return Engine(build(spec, ExpertPool(lora=lora)), EngineConfig(max_num_seqs=4, max_prefill_tokens=16, max_model_len=128))


def ids_of(e: Engine, texts=TEXTS) -> list[list[int]]:
    return [e.tokenizer(t)["input_ids"] for t in texts]


def test_the_pool_keeps_adapters_as_factors_over_the_shared_base(zoo, adapters):
    pool = ExpertPool()
    base = pool.get(str(zoo["base"]))
    code = pool.get(str(adapters["code"]), base=str(zoo["base"]))
    assert code.kind == "peft" and set(code.factored) == {
        f"model.layers.{n}.{m}.weight" for n in range(2) for m in
        [f"self_attn.{x}" for x in ("q_proj", "k_proj", "v_proj", "o_proj")] + [f"mlp.{x}" for x in FFN_PROJECTIONS]
    }
    gate, down = code.factored["model.layers.0.mlp.gate_proj.weight"], code.factored["model.layers.0.mlp.down_proj.weight"]
    assert gate.base is base.stored["model.layers.0.mlp.gate_proj.weight"]  # the base's own tensor
    assert (gate.rank, down.rank) == (8, 2)  # rank_pattern
    assert gate.scale == pytest.approx(5 / math.sqrt(8)) and down.scale == pytest.approx(16 / math.sqrt(2))  # rsLoRA, alpha_pattern
    base_ptrs = {t.untyped_storage().data_ptr() for t in base.held()}
    own = [t for t in code.held() if t.untyped_storage().data_ptr() not in base_ptrs]
    assert own and all(t.dim() == 2 and min(t.shape) <= 8 for t in own)  # only factors: no dense copy
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["base"]), adapters["code"]).merge_and_unload()
    for key, w in code.factored.items():
        torch.testing.assert_close(w.dense(), reference.state_dict()[key], atol=1e-5, rtol=0)


def test_an_adapter_that_cannot_stay_factored_is_merged_and_says_why(zoo, tmp_path, caplog):
    dora = make_adapter(zoo["base"], tmp_path / "dora", 5, ["q_proj", "up_proj"], use_dora=True)
    with caplog.at_level(logging.INFO, logger="mergeserve.experts.peft_adapter"):
        expert = ExpertPool().get(str(dora), base=str(zoo["base"]))
    assert not expert.factored and "DoRA" in caplog.text and "merged into dense weights" in caplog.text
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["base"]), dora).merge_and_unload()
    key = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(expert.tensors[key], reference.state_dict()[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("router", ["random", "arrow"])
def test_a_lora_native_moe_equals_the_same_moe_of_merged_dense_experts(zoo, adapters, router):
    spec = spec_of(zoo["base"], adapters, router={"kind": router, "top_k": 2})
    factored, merged = engine(spec), engine(spec, lora="merged")
    assert isinstance(factored.composed.layers[0].experts[0].gate_proj, LowRank)
    assert isinstance(merged.composed.layers[0].experts[0].gate_proj, torch.Tensor)
    for ids in ids_of(factored):
        torch.testing.assert_close(factored.logits(ids), merged.logits(ids), atol=1e-4, rtol=0)
    greedy = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    assert factored.generate(ids_of(factored), greedy) == merged.generate(ids_of(merged), greedy)


def test_a_request_restricted_to_one_lora_expert_equals_transformers_with_peft(zoo, ffn_adapters):
    moe = engine(spec_of(zoo["base"], ffn_adapters))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    for e, (name, path) in enumerate(ffn_adapters.items()):
        only = tuple(0.0 if i == e else -math.inf for i in range(3))
        prompt = ids_of(moe, TEXTS[:1])[0]
        moe.add_request(name, prompt, SamplingParams(**{**vars(params), "router_bias": only}))
        out, lps = [], []
        while moe.has_work():
            for o in moe.step():
                out += o.new_token_ids
                lps += [lp.logprob for lp in o.logprobs]
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["base"]), path).eval()
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(out).unsqueeze(1)).squeeze(1)
        assert out == logits.argmax(-1).tolist()
        torch.testing.assert_close(torch.tensor(lps), expected, atol=1e-4, rtol=0)


def test_a_mixed_batch_equals_each_request_run_alone(zoo, adapters):
    moe = engine(spec_of(zoo["base"], adapters))
    prompts = ids_of(moe)
    steering = [None, (0.0, -math.inf, 0.0), (2.0, 0.0, -1.0), (0.0, 0.0, -math.inf)]
    requests = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0, router_bias=b) for b in steering]

    def run(pairs):
        for i, (p, params) in pairs:
            moe.add_request(str(i), p, params)
        out: dict[str, list[float]] = {str(i): [] for i, _ in pairs}
        while moe.has_work():
            for o in moe.step():
                out[o.request_id] += [lp.logprob for lp in o.logprobs]
        return out

    together = run(list(enumerate(zip(prompts, requests))))
    for i, pair in enumerate(zip(prompts, requests)):
        torch.testing.assert_close(torch.tensor(run([(i, pair)])[str(i)]), torch.tensor(together[str(i)]), atol=1e-4, rtol=0)


def test_a_composition_mixing_dense_and_lora_experts_equals_its_merged_twin(zoo, adapters, tmp_path):
    experts = {"math": adapters["math"], "dense": perturbed_copy(zoo["base"], tmp_path / "dense", seed=9), "code": adapters["code"]}
    spec = spec_of(zoo["base"], experts)
    factored, merged = engine(spec), engine(spec, lora="merged")
    assert isinstance(factored.composed.layers[0].experts[0].gate_proj, LowRank)
    assert isinstance(factored.composed.layers[0].experts[1].gate_proj, torch.Tensor)
    for ids in ids_of(factored):
        torch.testing.assert_close(factored.logits(ids), merged.logits(ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("strategy", ["masked", "gathered", "grouped"])
def test_every_kernel_strategy_equals_a_per_token_loop(strategy):
    g = torch.Generator().manual_seed(0)
    d, i, n_experts = 16, 24, 5
    base = [torch.randn(*shape, generator=g) for shape in ((i, d), (i, d), (d, i))]

    def lora(w, r):
        return LowRank(w, torch.randn(r, w.shape[1], generator=g), torch.randn(w.shape[0], r, generator=g), scale=0.5)

    # Ranks differ; expert 3 is the base itself (rank 0); expert 4 adapts only gate.
    experts = [ExpertFFN(*(lora(w, r) for w in base)) for r in (2, 4, 3)]
    experts += [ExpertFFN(*base), ExpertFFN(lora(base[0], 2), base[1], base[2])]
    lx = LoraExperts.build(experts)
    x = torch.randn(7, d, generator=g)
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:2] for _ in range(7)])  # [T, 2]
    weights = torch.rand(7, 2, generator=g)
    weights[0, 1] = 0.0  # a pick that runs nothing
    out = lora_moe_ffn(x, weights, ids, lx, strategy)

    def ffn(t, e):
        gate, up, down = (dense(w) for w in (experts[e].gate_proj, experts[e].up_proj, experts[e].down_proj))
        return F.linear(F.silu(F.linear(x[t], gate)) * F.linear(x[t], up), down)

    expected = torch.stack([sum(weights[t, j] * ffn(t, int(ids[t, j])) for j in range(2)) for t in range(7)])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_arrow_prototypes_from_factors_equal_the_svd_of_the_dense_delta():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 40, generator=g), torch.randn(90, 6, generator=g)
    base = torch.randn(90, 40, generator=g)
    v_factors, v_dense = factor_subspace(a, b, base, 1)[0], subspace(b @ a, base, 1)[0]
    assert abs(float(v_factors @ v_dense)) == pytest.approx(1.0, abs=1e-4)  # the same direction, up to sign


@pytest.mark.parametrize("fields", [
    {"method": "mergeme", "merge": {"method": "ties", "density": 0.5}},
    {"method": "mergeme", "merge": {"method": "dare_ties", "density": 0.7, "seed": 3}},
    {"method": "ties", "merge": {"density": 0.5}, "router": {}},
])
def test_task_vector_merges_from_factors_equal_the_merged_dense_path(zoo, adapters, fields):
    spec = spec_of(zoo["base"], adapters, **fields)
    factored, merged = engine(spec), engine(spec, lora="merged")
    for ids in ids_of(factored)[:2]:
        torch.testing.assert_close(factored.logits(ids), merged.logits(ids), atol=1e-4, rtol=0)


def test_task_vector_routing_from_factors_equals_the_merged_dense_path(zoo, adapters):
    spec = spec_of(zoo["base"], adapters, router={"kind": "task_vector", "top_k": 2})
    factored, merged = engine(spec), engine(spec, lora="merged")
    prompts = ids_of(factored)
    torch.testing.assert_close(
        factored.mixture_router.scores(prompts), merged.mixture_router.scores(prompts),
        atol=1e-5, rtol=1e-4,
    )
    torch.testing.assert_close(factored.logits(prompts[0]), merged.logits(prompts[0]), atol=1e-4, rtol=0)


def test_the_mixtral_export_of_a_lora_native_moe_equals_the_merged_one(zoo, adapters, tmp_path):
    from safetensors.torch import load_file

    spec = spec_of(zoo["base"], adapters)
    export_composition(build(spec, ExpertPool()), tmp_path / "factored")
    export_composition(build(spec, ExpertPool(lora="merged")), tmp_path / "merged")
    a, b = load_file(str(tmp_path / "factored/model.safetensors")), load_file(str(tmp_path / "merged/model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


def test_an_adapter_that_names_another_base_is_logged_or_refused(zoo, adapters, tmp_path, caplog):
    """Shapes cannot tell two bases of one architecture apart; the adapter's own record can."""
    other = tmp_path / "other"
    shutil.copytree(adapters["math"], other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "someorg/another-model"}))
    spec = {"name": "m", "base": str(zoo["base"]), "router": {"kind": "random"},
            "experts": [{"name": "math", "source": str(other)}, {"name": "code", "source": str(adapters["code"])}]}
    with caplog.at_level(logging.WARNING, logger="mergeserve.merge.btx"):
        build(parse_composition(spec), ExpertPool())
    assert "'someorg/another-model'" in caplog.text and "code" not in caplog.text  # the matching adapter passes quietly
    with pytest.raises(CheckpointError, match=r"expert 'math' .* names the base 'someorg/another-model'"):
        build(parse_composition(spec | {"strict_base": True}), ExpertPool())
    build(parse_composition({**spec, "strict_base": True, "experts": spec["experts"][1:] * 1}), ExpertPool())
