"""Routed attention (router.attention: routed): LoRA experts' attention deltas mixed per token
by a router of their own, checked against peft and against the same mixture done densely."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from mergeserve.weights import LowRank, dense
from mergeserve.engine.engine import Engine
from mergeserve.engine.layers import Batch
from mergeserve.engine.model import Capture, Transformer
from mergeserve.engine.sequence import SamplingParams
from mergeserve.experts import CheckpointError, ExpertPool
from mergeserve.export import export_composition
from mergeserve.kernels.routed_lowrank import RoutedLowRank
from mergeserve.learn.compose import build
from mergeserve.spec import EngineConfig, SpecError, parse_composition

PROMPTS = ("def add(a, b):\n    return a + b\n", "Die Katze schläft im Haus.", "What is 12 + 7?")
PROMPTS_OF = {"code": [PROMPTS[0]], "german": [PROMPTS[1]], "math": [PROMPTS[2]]}


def spec_of(base, experts: dict, kind: str = "random", attention: str = "routed", **router):
    return parse_composition({
        "name": "routed", "base": str(base), "router": {"kind": kind, "top_k": 2, "attention": attention, **router},
        "experts": [{"name": n, "source": str(p), "prompts": PROMPTS_OF[n]} for n, p in experts.items()],
    })


def engine(spec, pool: ExpertPool | None = None) -> Engine:
    return Engine(build(spec, pool or ExpertPool()), EngineConfig(max_num_seqs=4, max_prefill_tokens=16, max_model_len=128))


def run(moe: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple[list[int], list[float]]]:
    for rid, (prompt, params) in requests.items():
        moe.add_request(rid, prompt, params)
    out = {rid: ([], []) for rid in requests}
    while moe.has_work():
        for o in moe.step():
            out[o.request_id][0].extend(o.new_token_ids)
            out[o.request_id][1].extend(lp.logprob for lp in o.logprobs)
    return out


def only(e: int, n: int = 3) -> tuple[float, ...]:
    return tuple(0.0 if i == e else -math.inf for i in range(n))


def test_a_request_restricted_to_one_expert_equals_that_adapter_with_its_attention(zoo, adapters):
    moe = engine(spec_of(zoo["base"], adapters))
    prompt = moe.tokenizer(PROMPTS[0])["input_ids"]
    params = dict(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    out = run(moe, {name: (prompt, SamplingParams(**params, router_bias=only(e))) for e, name in enumerate(adapters)})
    for name, path in adapters.items():
        tokens, logprobs = out[name]
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["base"]), path).eval()
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
        assert tokens == logits.argmax(-1).tolist()
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=0)


def test_the_routed_deltas_equal_the_gate_weighted_sum_of_dense_deltas():
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    experts = [LowRank(base, torch.randn(2, 5), torch.randn(6, 2), 0.5), base, LowRank(base, torch.randn(3, 5), torch.randn(6, 3), 2.0)]
    routed = RoutedLowRank.stack([[w] for w in experts], torch.float32)
    x, gate = torch.randn(4, 5), torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])
    expected = sum(gate[:, e:e + 1] * (x @ (dense(w) - base).T) for e, w in enumerate(experts))
    torch.testing.assert_close(routed(x, gate), expected)
    assert routed.rank == 3 and routed.a.shape == (9, 5)  # ranks zero-padded to the largest; the base has rank 0


@pytest.mark.parametrize("attention", ["routed", "dynamic"])
def test_a_mixed_batch_equals_each_request_run_alone(zoo, adapters, attention):
    """Requests routed (or merged) differently share one batch and lose nothing by it."""
    moe = engine(spec_of(zoo["base"], adapters) if attention == "routed" else dynamic_spec(zoo["base"], adapters, top_k=2))
    prompts = [moe.tokenizer(p)["input_ids"] for p in PROMPTS]
    biases = [None, only(1), (1.0, -math.inf, -1.0)]
    requests = {str(i): (p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0, router_bias=b))
                for i, (p, b) in enumerate(zip(prompts, biases))}
    together = run(moe, requests)
    for rid, request in requests.items():
        alone = run(moe, {rid: request})[rid]
        assert alone[0] == together[rid][0]
        torch.testing.assert_close(torch.tensor(alone[1]), torch.tensor(together[rid][1]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["hidden", "centroid", "arrow", "random"])
def test_every_token_router_kind_gives_attention_rows_of_its_own(zoo, adapters, kind):
    composed = build(spec_of(zoo["base"], adapters, kind=kind), ExpertPool())
    for layer in composed.layers:
        assert layer.attn_router.shape == layer.router.shape
        assert not torch.allclose(layer.attn_router, layer.router)


def test_hidden_attention_rows_score_each_domain_scale_logits_above_the_rest(zoo, adapters):
    """The hidden init, by hand: row_i = scale * d_i / |d_i|^2 over the input-normed states
    before attention, d_i = (expert i's prompts' mean state) - (the other experts' mean)."""
    spec = spec_of(zoo["base"], adapters, kind="hidden")
    composed = build(spec, ExpertPool())
    model = Transformer(composed, max_len=128)
    means = []
    for e, name in enumerate(adapters):
        ids = composed.tokenizer(PROMPTS_OF[name][0], add_special_tokens=False)["input_ids"]
        captured = Capture(attention=[])
        bias = torch.full((len(ids), 3), -math.inf)
        bias[:, e] = 0.0
        model(Batch.right_padded([ids], router_bias=bias), capture=captured)
        means.append(torch.stack([s.mean(0) for s in captured.attention]))  # [L, D]
    for e in range(3):
        d = means[e] - torch.stack([m for j, m in enumerate(means) if j != e]).mean(0)  # [L, D]
        margins = torch.stack([layer.attn_router[e] for layer in composed.layers]) * d  # [L, D]
        torch.testing.assert_close(margins.sum(-1), torch.full((len(composed.layers),), spec.router.scale), atol=1e-3, rtol=0)


def test_routed_attention_holds_factors_only_and_keeps_the_base_attention(zoo, adapters):
    pool = ExpertPool()
    composed = build(spec_of(zoo["base"], adapters), pool)
    base = pool.get(str(zoo["base"]))
    layer = composed.layers[0]
    assert layer.attn.q_proj.data_ptr() == base.stored["model.layers.0.self_attn.q_proj.weight"].data_ptr()
    assert isinstance(layer.attn_experts[0].q_proj, LowRank)
    german = layer.attn_experts[list(adapters).index("german")]
    assert german.k_proj is base.stored["model.layers.0.self_attn.k_proj.weight"]  # not adapted: the base itself


def test_what_routed_attention_cannot_serve_is_refused_with_its_reason(zoo, adapters):
    dense_expert = {"math": adapters["math"], "code": zoo["code"]}  # code: a full fine-tune
    with pytest.raises(CheckpointError, match=r"expert .code.*router.attention=routed/dynamic needs LoRA experts"):
        build(spec_of(zoo["base"], dense_expert), ExpertPool())
    with pytest.raises(CheckpointError, match="routed/dynamic needs LoRA experts"):
        build(spec_of(zoo["base"], adapters), ExpertPool(lora="merged"))
    with pytest.raises(SpecError, match="router.attention=separate does not apply to kind=hidden"):
        spec_of(zoo["base"], adapters, kind="hidden", attention="separate")
    with pytest.raises(ValueError, match="Mixtral checkpoint has one shared attention"):
        export_composition(build(spec_of(zoo["base"], adapters), ExpertPool()), "/nonexistent")


# --- per-request merging (router.attention: dynamic) -----------------------------------------


def dynamic_spec(base, experts: dict, top_k: int = 3):
    return parse_composition({
        "name": "dynamic", "base": str(base), "router": {"kind": "perplexity", "top_k": top_k, "attention": "dynamic"},
        "experts": [{"name": n, "source": str(p)} for n, p in experts.items()],
    })


def linear_merge(base, experts: dict, weights: list[float]) -> Engine:
    """The offline merge: base + sum_e w_e (expert_e - base), one dense model."""
    return engine(parse_composition({
        "name": "offline", "base": str(base), "method": "linear",
        "experts": [{"name": n, "source": str(p), "weight": w} for (n, p), w in zip(experts.items(), weights)],
    }))


def test_a_request_merged_with_weights_w_equals_the_model_merged_offline_with_w(zoo, adapters):
    moe = engine(dynamic_spec(zoo["base"], adapters))
    ids = moe.tokenizer(PROMPTS[0])["input_ids"]
    alpha = moe.mixture_router.weights([ids])  # [1, E]: this prompt's weights under the perplexity router
    assert (alpha > 0).all() and float(alpha.sum()) == pytest.approx(1.0)
    offline = linear_merge(zoo["base"], adapters, alpha[0].tolist())
    torch.testing.assert_close(moe.logits(ids), offline.logits(ids), atol=1e-4, rtol=0)
    w = torch.tensor([[0.2, 0.0, 0.8]])  # any weights, given to the forward directly
    hidden = moe.model(Batch.right_padded([ids], alpha=w))
    expected = linear_merge(zoo["base"], adapters, [0.2, 1e-9, 0.8]).logits(ids)
    torch.testing.assert_close(moe.model.logits(hidden)[0], expected, atol=1e-4, rtol=0)


def test_per_request_merging_of_a_dense_expert_is_refused(zoo, adapters):
    with pytest.raises(CheckpointError, match=r"expert 'code'.*routed/dynamic needs LoRA experts"):
        build(dynamic_spec(zoo["base"], {"math": adapters["math"], "code": zoo["code"]}, top_k=2), ExpertPool())
