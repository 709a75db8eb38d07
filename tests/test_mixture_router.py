"""MergeME sequence routers: one choice of experts per request, made from its prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mergeserve.engine.engine import Engine
from mergeserve.engine.executor import Executor
from mergeserve.engine.mixture_router import MixtureRouter, top_k_softmax
from mergeserve.engine.model import Batch, Transformer
from mergeserve.engine.sequence import SamplingParams
from mergeserve.engine.task_vector import routed_keys
from mergeserve.experts import ExpertPool
from mergeserve.export import export_composition
from mergeserve.learn.compose import build
from mergeserve.server.backends.local import LocalBackend
from mergeserve.server.metrics import Metrics
from mergeserve.spec import EngineConfig, parse_composition
from tiny import perturbed_copy

NAMES = ("code", "german", "math")
TEXTS = ("def add(a, b):\n    return a + b\n", "Die Katze schläft im Haus.", "What is 12 + 7? 12 + 7 = 19.")
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def experts(zoo, tmp_path_factory) -> dict[str, Path]:
    """Fine-tune stand-ins that change only the decoder layers, as LoRA experts do: the
    composition's shared embeddings, final norm and head are then every expert's own."""
    root = tmp_path_factory.mktemp("layer_experts")
    return {n: perturbed_copy(zoo["base"], root / n, seed=i + 1, only="model.layers.") for i, n in enumerate(NAMES)}


def compose(zoo, experts, **router):
    spec = parse_composition({
        "name": "seq", "base": str(zoo["base"]), "router": router,
        "experts": [{"name": n, "source": str(p)} for n, p in experts.items()],
    })
    return build(spec, ExpertPool())


def tokenize(composed, texts=TEXTS) -> list[list[int]]:
    return [composed.tokenizer(t)["input_ids"] for t in texts]


def one_hot(choices: list[int]) -> torch.Tensor:
    return F.one_hot(torch.tensor(choices), len(NAMES)).float()


def hf_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_separate_attention_routed_to_one_expert_is_that_experts_dense_model(zoo, experts):
    composed = compose(zoo, experts, kind="perplexity")
    model = Transformer(composed, max_len=128)
    prompts = tokenize(composed)
    for e, name in enumerate(NAMES):
        logits = model.logits(model(Batch.right_padded(prompts, alpha=one_hot([e] * len(prompts)))))  # [B, T, V]
        reference = hf_model(experts[name])
        for row, ids in enumerate(prompts):
            with torch.no_grad():
                expected = reference(torch.tensor([ids])).logits[0]
            torch.testing.assert_close(logits[row, : len(ids)], expected, atol=1e-4, rtol=0)


def test_requests_routed_to_different_experts_decode_like_each_expert_alone(zoo, experts, monkeypatch):
    composed = compose(zoo, experts, kind="perplexity")
    prompts = tokenize(composed)
    choice = {tuple(p): e for e, p in enumerate(prompts)}  # prompt i goes to expert i
    engine = Engine(composed, EngineConfig(max_num_seqs=4, max_prefill_tokens=8))  # chunked prefill
    monkeypatch.setattr(engine.mixture_router, "weights", lambda ps, _bias=None, _spans=None: one_hot([choice[tuple(p)] for p in ps]))
    together = engine.generate(prompts, GREEDY)
    for ids, got, name in zip(prompts, together, NAMES):
        with torch.no_grad():
            expected = hf_model(experts[name]).generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=12, min_new_tokens=12,
            )[0, len(ids):].tolist()
        assert got == expected, name
    # One request per expert; every layer counts each request's tokens (the last sampled one is never fed).
    assert engine.expert_requests.tolist() == [1, 1, 1]
    fed = torch.tensor([len(p) + GREEDY.max_tokens - 1 for p in prompts])
    assert (engine.expert_load == fed).all()


@pytest.mark.parametrize("kind,attention", [
    ("perplexity", "separate"), ("perplexity", "merged"), ("task_vector", "separate"), ("task_vector", "merged"),
])
def test_batched_generation_equals_one_at_a_time(zoo, experts, kind, attention):
    composed = compose(zoo, experts, kind=kind, attention=attention, top_k=2, inverse_temperature=200.0)
    engine = Engine(composed, EngineConfig(max_num_seqs=4, max_prefill_tokens=8))
    prompts = tokenize(composed, (*TEXTS, "Hello", "x"))  # 5 prompts over 4 slots
    together = engine.generate(prompts, GREEDY)
    alone = [engine.generate([p], GREEDY)[0] for p in prompts]
    assert together == alone
    assert engine.expert_requests.sum() == 2 * 2 * len(prompts)  # top-2, each prompt routed twice


def test_metrics_count_the_requests_each_expert_was_chosen_for(zoo, experts):
    engine = Engine(compose(zoo, experts, kind="perplexity", top_k=1))
    engine.generate(tokenize(engine.composed), GREEDY)
    text = generate_latest(Metrics(lambda: [LocalBackend(engine, Executor())]).registry).decode()
    samples = {s.labels["expert"]: s.value for f in text_string_to_metric_families(text)
               if f.name == "mergeserve:expert_requests" for s in f.samples}
    assert samples == dict(zip(NAMES, map(float, engine.expert_requests.tolist())))
    assert sum(samples.values()) == len(TEXTS)


@pytest.mark.parametrize("scale", [None, 300.0])
def test_perplexity_routing_prefers_the_expert_with_the_lowest_perplexity(zoo, experts, scale):
    router = {"kind": "perplexity", "top_k": 2} | ({"inverse_temperature": scale} if scale else {})
    composed = compose(zoo, experts, **router)
    prompts = tokenize(composed)
    alpha = MixtureRouter(composed).weights(prompts)  # [B, E]
    ppl = torch.empty(len(prompts), len(NAMES))
    for e, name in enumerate(NAMES):
        reference = hf_model(experts[name])
        for row, ids in enumerate(prompts):
            with torch.no_grad():
                ppl[row, e] = torch.exp(reference(torch.tensor([ids]), labels=torch.tensor([ids])).loss)
    # alpha = softmax(scale * top-2 of 1/PPL); without router.inverse_temperature the paper's softmax(top-2 of 1/PPL).
    expected = top_k_softmax(1 / ppl, 2, scale or 1.0)
    torch.testing.assert_close(alpha, expected, atol=1e-5, rtol=1e-4)
    assert alpha.argmax(dim=1).tolist() == ppl.argmin(dim=1).tolist()
    assert ((alpha > 0).sum(dim=1) == 2).all()


def test_log_likelihood_scores_take_offsets_as_log_priors(zoo, experts):
    paper = compose(zoo, experts, kind="perplexity")
    prompts = tokenize(paper)
    inverse_ppl = MixtureRouter(paper).scores(prompts)  # [B, E]
    priors = {"code": 0.0, "german": -0.5, "math": 0.25}
    bayes = compose(zoo, experts, kind="perplexity", score="log_likelihood", inverse_temperature=1.0, offsets=priors)
    router = MixtureRouter(bayes)
    torch.testing.assert_close(router.scores(prompts), inverse_ppl.log(), atol=1e-5, rtol=1e-5)
    # alpha = top-2 of p(x | e) * exp(prior_e), renormalised: the posterior over experts restricted to the best two.
    posterior = inverse_ppl * torch.tensor([priors[n] for n in NAMES]).exp()  # [B, E], up to each row's scale
    expected = torch.zeros_like(posterior)
    top = posterior.topk(2, dim=1)
    expected.scatter_(1, top.indices, top.values / top.values.sum(1, keepdim=True))
    torch.testing.assert_close(router.weights(prompts), expected, atol=1e-5, rtol=1e-4)


def test_task_vector_scores_are_cosines_of_the_descent_direction_and_the_task_vectors(zoo, experts):
    composed = compose(zoo, experts, kind="task_vector")
    # Three lengths in one padded pass; the longest exceeds sqrt(k_proj's size), so both the
    # Gram-matrix and the per-prompt-gradient forms of |g_b| are exercised.
    prompts = tokenize(composed, (TEXTS[0] * 5, TEXTS[1], "Hello, how are you today?"))
    assert len({len(p) for p in prompts}) == 3 and max(map(len, prompts)) ** 2 > 32 * 64
    scores = MixtureRouter(composed).scores(prompts)  # [B, E]

    pool = ExpertPool()
    base, keys = pool.get(str(zoo["base"])).tensors, routed_keys(2)
    taus = [torch.cat([(pool.get(str(experts[n])).tensors[k] - base[k]).flatten() for k in keys]) for n in NAMES]
    model = hf_model(zoo["base"])
    params = dict(model.named_parameters())
    expected = torch.empty(len(prompts), len(NAMES))
    for row, ids in enumerate(prompts):
        model.zero_grad()
        model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.backward()
        descent = -torch.cat([params[k].grad.flatten() for k in keys])
        expected[row] = torch.stack([F.cosine_similarity(descent, t, dim=0) for t in taus])
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)  # cosines here are ~1e-3
    assert expected.abs().max() > 1e-3  # the comparison is not between zeros


def test_merged_attention_equals_the_token_moe_with_a_bias_forcing_the_same_weights(zoo, experts):
    sequence = compose(zoo, experts, kind="perplexity", attention="merged")
    token = compose(zoo, experts, kind="random")
    for layer in token.layers:
        layer.router = torch.zeros_like(layer.router)  # the bias alone decides
    prompts = tokenize(sequence)
    alpha = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.2, 0.8], [0.0, 1.0, 0.0]])  # per prompt, fixed
    # softmax(log alpha) = alpha on every token of the prompt: the token MoE routed like the sequence.
    bias = torch.cat([alpha[row].log().expand(len(ids), -1) for row, ids in enumerate(prompts)])  # [real tokens, E]
    seq_model, token_model = Transformer(sequence, 128), Transformer(token, 128)
    got = seq_model.logits(seq_model(Batch.right_padded(prompts, alpha=alpha)))
    expected = token_model.logits(token_model(Batch.right_padded(prompts, router_bias=bias)))
    for row, ids in enumerate(prompts):
        torch.testing.assert_close(got[row, : len(ids)], expected[row, : len(ids)], atol=1e-5, rtol=0)
    assert seq_model.cache_layers == 2  # merged attention: one KV layer per layer, shared by the experts


def test_export_refuses_a_sequence_routed_composition(zoo, experts, tmp_path):
    composed = compose(zoo, experts, kind="task_vector")
    with pytest.raises(ValueError, match="routes once per request"):
        export_composition(composed, tmp_path / "out")


def test_task_vector_routing_holds_no_dense_task_vector(zoo, experts):
    """Built once per engine: every dense task vector is the pool's two tensors, never their difference."""
    composed = compose(zoo, experts, kind="task_vector")
    router = MixtureRouter(composed)
    pool_ptrs = {t.data_ptr() for c in (composed.mixture_routing.base, *composed.mixture_routing.experts) for t in c.held()}
    for taus in router.task_vector.taus.values():
        for t in taus:
            assert t is None or (t.w.data_ptr() in pool_ptrs and t.w0.data_ptr() in pool_ptrs)


def test_a_step_routes_prompts_of_at_most_max_prefill_tokens(zoo, experts):
    """Scoring runs every expert over a prompt: long prompts are routed a few per step, not all in one."""
    composed = compose(zoo, experts, kind="perplexity")
    engine = Engine(composed, EngineConfig(max_num_seqs=4, max_prefill_tokens=40, max_model_len=128))
    for i in range(3):
        engine.add_request(str(i), list(range(5, 35)), SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    routed = []
    while engine.has_work():
        engine.step()
        routed.append(int(engine.expert_requests.sum()) // composed.top_k)
    assert routed[:3] == [1, 2, 3]  # 30-token prompts, a 40-token budget: one a step


@pytest.mark.parametrize("kind", ["perplexity", "task_vector"])
def test_sequence_routing_runs_over_bf16_weights(zoo, experts, kind):
    """Scoring takes its inputs in the weights' dtype (bf16 weights, an fp32 residual stream)."""
    spec = parse_composition({
        "name": "seq", "base": str(zoo["base"]), "dtype": "bfloat16", "router": {"kind": kind, "top_k": 2},
        "experts": [{"name": n, "source": str(p)} for n, p in experts.items()],
    })
    engine = Engine(build(spec, ExpertPool()), EngineConfig(max_model_len=128))
    [out] = engine.generate(tokenize(engine.composed)[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out) == 4 and int(engine.expert_requests.sum()) == 2
