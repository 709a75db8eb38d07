"""The engine against transformers, and the continuous-batching loop's promises."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import dense_spec, engine_for, make_checkpoint
from transformers import AutoModelForCausalLM

from mergeserve.weights import dense
from mergeserve.engine.engine import Engine, StepFailed
from mergeserve.engine.sequence import SamplingParams
from mergeserve.experts import ExpertPool
from mergeserve.kernels import FusedFFN, moe_ffn, top_k_experts
from mergeserve.learn.compose import build
from mergeserve.spec import parse_composition

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
TEXT = "def add(a, b):\n    return a + b\nDer Hund läuft schnell."


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_dense_model_matches_transformers(tmp_path, family):
    path = make_checkpoint(tmp_path / family, family, tie=family == "qwen2")
    engine = engine_for(dense_spec(path))
    ids = engine.tokenizer(TEXT)["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
        expected_tokens = reference.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=24, min_new_tokens=24
        )[0, len(ids):].tolist()
    torch.testing.assert_close(engine.logits(ids), expected, atol=1e-4, rtol=0)
    # Generation goes through the KV cache, the scheduler and the sampler.
    assert engine.generate([ids], GREEDY)[0] == expected_tokens


@pytest.mark.parametrize("family, window", [
    ("mistral", {"sliding_window": 5}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),  # layer 0 full, then windows
])
def test_sliding_windows_past_their_length_match_transformers(tmp_path, family, window):
    """Prompts and generations several windows long, prefilled in chunks smaller than the prompt."""
    path = make_checkpoint(tmp_path / family, family, layers=3, **window)
    engine = engine_for(dense_spec(path), max_prefill_tokens=7)
    ids = engine.tokenizer(TEXT)["input_ids"]
    assert len(ids) > 3 * window["sliding_window"]
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    generated = engine.generate([ids], GREEDY)[0]  # through the KV cache, past the window
    with torch.no_grad():
        logits = reference(torch.tensor([ids + generated])).logits[0]
    torch.testing.assert_close(engine.logits(ids), logits[:len(ids)], atol=1e-4, rtol=0)
    assert generated == logits[len(ids) - 1:-1].argmax(-1).tolist()  # each token transformers' greedy pick


def test_moe_of_base_copies_reproduces_the_base(zoo):
    base = str(zoo["base"])
    spec = parse_composition({
        "name": "copies", "base": base, "router": {"kind": "random", "seed": 3},
        "experts": [{"name": n, "source": base} for n in ("a", "b", "c")],
    })
    moe, dense = engine_for(spec), engine_for(dense_spec(zoo["base"]))
    ids = moe.tokenizer(TEXT)["input_ids"]
    assert moe.composed.num_experts == 3
    torch.testing.assert_close(moe.logits(ids), dense.logits(ids), atol=1e-4, rtol=0)
    assert moe.generate([ids], GREEDY) == dense.generate([ids], GREEDY)


def test_grouped_dispatch_equals_a_per_token_loop(zoo):
    spec = parse_composition({
        "name": "moe", "base": str(zoo["base"]), "router": {"kind": "random"},
        "experts": [{"name": n, "source": str(zoo[n])} for n in ("code", "german", "math")],
    })
    layer = build(spec, ExpertPool()).layers[0]
    x = torch.randn(37, layer.router.shape[1])
    weights, ids = top_k_experts(x, layer.router, 2)
    out = moe_ffn(x, weights, ids, [FusedFFN.of(e) for e in layer.experts])
    expected = torch.stack([
        sum(w * reference_mlp(x[t], layer.experts[e]) for w, e in zip(weights[t], ids[t].tolist()))
        for t in range(x.shape[0])
    ])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def reference_mlp(x: torch.Tensor, e) -> torch.Tensor:
    g, u, d = (dense(w) for w in (e.gate_proj, e.up_proj, e.down_proj))
    return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


@pytest.fixture(scope="module")
def moe_engine(zoo) -> Engine:
    spec = parse_composition({
        "name": "moe", "base": str(zoo["base"]), "router": {"kind": "random"},
        "experts": [{"name": n, "source": str(zoo[n])} for n in ("code", "german", "math")],
    })
    return engine_for(spec, max_num_seqs=4, max_prefill_tokens=8)


def test_batched_generation_equals_one_at_a_time(moe_engine):
    prompts = [moe_engine.tokenizer(t)["input_ids"] for t in (TEXT, "Hello", "What is 12 + 7?", "Die Katze", "x")]
    together = moe_engine.generate(prompts, GREEDY)  # 5 prompts over 4 slots, chunked prefill of 8 tokens
    alone = [moe_engine.generate([p], GREEDY)[0] for p in prompts]
    assert together == alone
    assert all(len(t) == 24 for t in together)


def test_a_long_request_does_not_block_a_short_one(moe_engine):
    tok = moe_engine.tokenizer
    moe_engine.add_request("long", tok(TEXT)["input_ids"], SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(3):
        moe_engine.step()
    moe_engine.add_request("short", tok("Hello")["input_ids"], SamplingParams(max_tokens=4, ignore_eos=True))
    finished = []
    while "short" not in finished:
        finished += [o.request_id for o in moe_engine.step() if o.finished]
    assert finished == ["short"] and moe_engine.num_running == 1
    moe_engine.abort("long")
    moe_engine.step()
    assert not moe_engine.has_work()


def run(engine: Engine, prompt: str, params: SamplingParams):
    engine.add_request("r", engine.tokenizer(prompt)["input_ids"], params)
    outs = []
    while engine.has_work():
        outs += engine.step()
    return outs


def test_sampling_controls(moe_engine):
    greedy = moe_engine.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    top1 = SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=4, ignore_eos=True)
    assert moe_engine.generate([[5, 6, 7]], top1)[0] == greedy
    tiny_p = SamplingParams(max_tokens=12, temperature=1.5, top_p=1e-6, seed=4, ignore_eos=True)
    assert moe_engine.generate([[5, 6, 7]], tiny_p)[0] == greedy
    hot = SamplingParams(max_tokens=12, temperature=2.0, seed=11, ignore_eos=True)
    first, again = (moe_engine.generate([[5, 6, 7]], hot)[0] for _ in range(2))
    other = moe_engine.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=2.0, seed=12, ignore_eos=True))[0]
    assert first == again and first != other


def test_stop_strings_max_tokens_and_logprobs(moe_engine):
    outs = run(moe_engine, "Hello", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=3))
    text = "".join(o.new_text for o in outs)
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 16
    lps = [lp for o in outs for lp in o.logprobs]
    assert len(lps) == 16 and all(lp.logprob <= 0 and len(lp.top) == 3 for lp in lps)
    assert all(lp.top[0][2] == pytest.approx(lp.logprob) for lp in lps)  # greedy picks the best
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    outs = run(moe_engine, "Hello", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=(stop,)))
    assert outs[-1].finish_reason == "stop"
    assert "".join(o.new_text for o in outs) == text[: text.find(stop)]


def test_prompts_prefilled_together_match_prompts_prefilled_alone(zoo):
    spec = parse_composition({
        "name": "moe", "base": str(zoo["base"]), "router": {"kind": "random"},
        "experts": [{"name": n, "source": str(zoo[n])} for n in ("code", "german", "math")],
    })
    engine = engine_for(spec, max_num_seqs=4, max_prefill_tokens=512)
    prompts = [engine.tokenizer(t)["input_ids"] for t in (TEXT * 3, "Hello", "What is 12 + 7?", "Die Katze")]
    assert len({len(p) for p in prompts}) == 4  # one padded forward holds rows of four lengths
    together = engine.generate(prompts, GREEDY)
    alone = [engine.generate([p], GREEDY)[0] for p in prompts]
    assert together == alone
    # Padding is routed nowhere: expert load counts real tokens only (top-2 per token per layer).
    engine.model.expert_load.zero_()
    engine.generate(prompts, SamplingParams(max_tokens=1))
    assert (engine.expert_load.sum(dim=1) == 2 * sum(len(p) for p in prompts)).all()


def test_score_gives_each_tokens_log_probability_like_transformers(zoo):
    engine = engine_for(dense_spec(zoo["code"]))
    texts = [TEXT, "Hello, how are you today?", "Die Katze schläft im Haus."]
    sequences = [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    reference = AutoModelForCausalLM.from_pretrained(zoo["code"], dtype=torch.float32).eval()
    scores = engine.score(sequences, max_batch_tokens=40)  # forces several padded batches
    for ids, got in zip(sequences, scores):
        with torch.no_grad():
            logprobs = torch.log_softmax(reference(torch.tensor([ids])).logits[0, :-1], dim=-1)
        expected = logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_linear_merge_is_one_dense_model_of_averaged_weights(zoo):
    spec = parse_composition({
        "name": "avg", "base": str(zoo["base"]), "method": "linear",
        "experts": [{"name": "code", "source": str(zoo["code"]), "weight": 3}, {"name": "math", "source": str(zoo["math"])}],
    })
    composed = build(spec, ExpertPool())
    assert composed.num_experts == 1 and all(layer.router is None for layer in composed.layers)
    pool = ExpertPool()
    code, math = (pool.get(str(zoo[n])).tensors for n in ("code", "math"))
    key = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(composed.layers[1].experts[0].up_proj, 0.75 * code[key] + 0.25 * math[key])
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(composed.layers[0].attn.q_proj, 0.75 * code[key] + 0.25 * math[key])


def test_a_step_that_raises_fails_only_its_own_requests(zoo):
    """A poisoned prompt makes the forward raise (injected): its request fails, the request
    decoding beside it and the requests after it are served, and the failure is counted."""
    engine = engine_for(dense_spec(zoo["base"]))
    poison = 7
    forward = engine.model.forward

    def failing(batch, *args, **kwargs):
        if bool((batch.tokens == poison).any()):
            raise RuntimeError("injected fault")
        return forward(batch, *args, **kwargs)

    engine.model.forward = failing
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.add_request("a", [5, 6, 8], params)
    tokens = {"a": engine.step()[0].new_token_ids}  # a is prefilled and decoding
    engine.add_request("p", [5, poison, 8], params)
    failed = []
    while engine.has_work():
        try:
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        except StepFailed as e:
            failed += e.request_ids
    assert failed == ["p"] and "p" not in tokens and engine.failed_steps == 1
    assert not engine.scheduler.running and len(engine.scheduler.free_slots) == engine.config.max_num_seqs
    assert engine.generate([[5, 6, 8]], params) == [tokens["a"]]  # a finished whole, and the engine still serves


def test_the_kv_cache_budget_bounds_the_sequences_that_run_at_once(zoo):
    """A budget for two whole sequences: a burst of four long requests runs two at a time, the
    cache is sized for two, and everything finishes."""
    spec = dense_spec(zoo["base"])
    probe = engine_for(spec, max_model_len=64)
    per_sequence = probe.cache.k[:, 0].numel() * 4 * 2  # K and V of one slot, fp32
    engine = engine_for(spec, max_model_len=64, max_num_seqs=8, kv_cache_budget_bytes=2 * per_sequence + 100)
    assert engine.slots == 2 and engine.cache.k.shape[1] == 2 + 1  # plus the scratch slot
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for i in range(4):
        engine.add_request(str(i), [5, 6, 7, 8], params)
    most, done = 0, set()
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                done.add(out.request_id)
        most = max(most, engine.num_running)
    assert most == 2 and done == {"0", "1", "2", "3"}
    with pytest.raises(ValueError, match="holds no sequence"):
        engine_for(spec, max_model_len=64, kv_cache_budget_bytes=per_sequence // 2)
