"""Routing a user can see: every response says which experts it used and how much (issue 26),
in its `experts` field beside `usage` and in the X-Mergeserve-Experts header, and feedback can be
split by the expert that carried a response."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from tiny import composition, engine_for

from live import Gateway, live_gateway, local_registry
from mergeserve.engine.base_engine import BaseEngine
from mergeserve.engine.engine import Engine
from mergeserve.engine.executor import Executor
from mergeserve.engine.sequence import RequestOutput, SamplingParams
from mergeserve.experts import ExpertPool
from mergeserve.learn.compose import build
from mergeserve.spec import EngineConfig, parse_composition

CONFIG = EngineConfig(max_num_seqs=4, max_model_len=128)
GREEDY = dict(temperature=0, ignore_eos=True)


def spec(zoo, adapters, name: str = "moe", **router):
    experts = {n: adapters[n] for n in ("code", "german", "math")}
    return parse_composition(composition(name, zoo["base"], experts, router=router or {"kind": "random", "top_k": 2}))


def finish(engine, face, prompt: list[int], **params) -> RequestOutput:
    """Run one request on `face` (an engine, or a composition placed on a base engine) to its end: its last output."""
    face.add_request("r", prompt, SamplingParams(**(GREEDY | params)))
    last = None
    while engine.has_work():
        last = next((o for o in engine.step() if o.finished), last)
    return last


def test_a_token_routed_response_reports_each_experts_share_of_its_tokens_routing(zoo, adapters):
    """A one-token prompt: every forward the request ran produced one of its tokens, so its shares
    are the router statistics' weight per expert, summed over layers, normalised."""
    engine = Engine(build(spec(zoo, adapters), ExpertPool()), CONFIG)
    out = finish(engine, engine, [7], max_tokens=6)
    weight = engine.expert_weight.sum(0)  # [E] over the 6 forwards: the prompt token and 5 decodes
    assert out.experts == pytest.approx((weight / weight.sum()).tolist(), abs=1e-9)
    assert math.isclose(sum(out.experts), 1.0) and len(out.experts) == 3


def test_requests_batched_together_each_report_their_own_routing(zoo, adapters):
    """Prompts prefilled in one step and decoded in one batch: each request's shares are what it
    gets alone (its own tokens' routing, not a neighbour's)."""
    composed = build(spec(zoo, adapters), ExpertPool())
    prompts = [composed.tokenizer(t)["input_ids"] for t in ("def add(a, b):", "Die Katze schläft im Haus.", "12 + 7 =")]
    alone = []
    for ids in prompts:
        engine = Engine(composed, CONFIG)
        alone.append(finish(engine, engine, ids, max_tokens=4).experts)
    engine = Engine(composed, CONFIG)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, SamplingParams(max_tokens=4, **GREEDY))
    together = {}
    while engine.has_work():
        together |= {o.request_id: o.experts for o in engine.step() if o.finished}
    for i, want in enumerate(alone):
        assert together[str(i)] == pytest.approx(want, abs=1e-6), i
    assert alone[0] != pytest.approx(alone[1], abs=1e-3)  # the prompts route differently: the check can tell them apart


def test_an_expert_the_request_excludes_has_no_share(zoo, adapters):
    engine = Engine(build(spec(zoo, adapters), ExpertPool()), CONFIG)
    out = finish(engine, engine, engine.tokenizer("What is 12 + 7?")["input_ids"], max_tokens=4,
                 router_bias=(0.0, float("-inf"), 0.0))
    assert out.experts[1] == 0.0 and math.isclose(sum(out.experts), 1.0)


def test_a_shared_base_engine_reports_what_an_engine_of_its_own_does(zoo, adapters):
    pool = ExpertPool()
    composed = build(spec(zoo, adapters), pool)
    single = build(parse_composition(composition("single", zoo["base"], {"math": adapters["math"]})), pool)
    prompt = composed.tokenizer("Die Katze schläft im Haus.")["input_ids"]
    own = Engine(composed, CONFIG)
    want = finish(own, own, prompt, max_tokens=5).experts
    shared = BaseEngine(composed, CONFIG)
    face = shared.place(composed)
    shared.place(single)  # another composition on the engine, of one expert: its rows have no routing
    assert finish(shared, face, prompt, max_tokens=5).experts == pytest.approx(want, abs=1e-6)


def test_a_sequence_router_reports_its_weights(zoo, adapters):
    router = {"kind": "perplexity", "top_k": 2, "attention": "dynamic", "inverse_temperature": 10}
    engine = engine_for(spec(zoo, adapters, "per-request", **router), CONFIG)
    out = finish(engine, engine, engine.tokenizer("def add(a, b):")["input_ids"], max_tokens=3)
    alpha = engine.runner.route([_sequence(engine, "def add(a, b):")])[0]
    assert out.experts == pytest.approx((alpha / alpha.sum()).tolist(), abs=1e-6)
    assert sum(share > 0 for share in out.experts) == 2  # top_k of them


def test_a_composition_of_one_expert_reports_none(zoo, adapters):
    engine = engine_for(parse_composition(composition("single", zoo["base"], {"math": adapters["math"]})), CONFIG)
    assert finish(engine, engine, [7, 8], max_tokens=2).experts is None


def _sequence(engine: Engine, text: str):
    return engine.sequence("probe", engine.tokenizer(text)["input_ids"], SamplingParams())


@pytest.fixture(scope="module")
def server(zoo, adapters) -> Iterator[Gateway]:
    executor = Executor()
    registry = local_registry(executor, CONFIG, spec(zoo, adapters))
    with live_gateway(registry, executor) as gateway:
        yield gateway


HELLO = [{"role": "user", "content": "What is 12 + 7?"}]


def test_a_chat_response_carries_its_experts_beside_usage_and_in_a_header(server: Gateway):
    raw = server.client.chat.completions.with_raw_response.create(model="moe", messages=HELLO, max_tokens=4, temperature=0)
    answer = raw.parse()
    experts = answer.model_extra["experts"]
    assert list(experts) == sorted(experts, key=lambda n: -experts[n]) and set(experts) == {"code", "german", "math"}
    assert math.isclose(sum(experts.values()), 1.0, abs_tol=1e-3)
    header = dict(pair.split("=") for pair in raw.headers["x-mergeserve-experts"].split(","))
    assert list(header) == list(experts) and all(math.isclose(float(header[n]), experts[n], abs_tol=0.006) for n in experts)


def test_a_stream_sends_each_choices_experts_with_its_finish_and_the_whole_with_usage(server: Gateway):
    chunks = list(server.client.chat.completions.create(model="moe", messages=HELLO, max_tokens=4, temperature=0, n=2,
                                                        stream=True, stream_options={"include_usage": True}))
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 2 and all(math.isclose(sum(c.model_extra["experts"].values()), 1.0, abs_tol=1e-3) for c in finishing)
    usage = chunks[-1]
    assert usage.usage is not None and math.isclose(sum(usage.model_extra["experts"].values()), 1.0, abs_tol=1e-3)
    assert all(c.model_extra.get("experts") is None for c in chunks if c not in finishing and c is not usage)
    both = [c.model_extra["experts"] for c in finishing]
    assert usage.model_extra["experts"] == pytest.approx({n: (both[0][n] + both[1][n]) / 2 for n in both[0]}, abs=2e-4)


def test_feedback_is_split_by_the_expert_that_carried_the_response(server: Gateway):
    answer = server.client.completions.create(model="moe", prompt="def add(a, b):", max_tokens=3, temperature=0)
    top = next(iter(answer.model_extra["experts"]))
    scored = server.http.post("/v1/feedback", json={"id": answer.id, "score": 0.5}).json()
    assert scored["experts"] == answer.model_extra["experts"]
    samples = [s for s in server.scrape() if s.name == "mergeserve:feedback_score_by_expert_sum"]
    assert [(s.labels, s.value) for s in samples] == [({"model": "moe", "expert": top}, 0.5)]


def test_what_the_header_reports_is_what_the_engine_routed(server: Gateway):
    """Over HTTP as in the engine: a one-token prompt's response, against the router statistics."""
    engine = server.engine
    before = engine.expert_weight.sum(0).clone()
    answer = server.client.completions.create(model="moe", prompt=[7], max_tokens=5, temperature=0)
    weight = engine.expert_weight.sum(0) - before
    want = dict(zip(engine.expert_names, (weight / weight.sum()).tolist()))
    assert answer.model_extra["experts"] == pytest.approx(want, abs=1e-4)


# --- sequence routers on short chat prompts ------------------------------------------------------

def test_a_chat_is_routed_on_its_last_user_message_not_the_template(zoo, adapters):
    from mergeserve.server.backends.local import _chat_prompt

    router = {"kind": "perplexity", "top_k": 2, "attention": "dynamic", "inverse_temperature": 10}
    engine = engine_for(spec(zoo, adapters, "per-request", **router), CONFIG)
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Was ist 12 + 7?"}]
    ids, span = _chat_prompt(engine, messages)
    assert engine.tokenizer.decode(ids[span[0]:span[1]]).strip() == "Was ist 12 + 7?"
    out = finish(engine, engine, ids, max_tokens=2, route_span=span)
    on_content = engine.mixture_router.weights([ids], spans=[span])[0]
    on_everything = engine.mixture_router.weights([ids])[0]
    assert out.experts == pytest.approx((on_content / on_content.sum()).tolist(), abs=1e-6)
    assert not torch.allclose(on_content, on_everything)  # the template would have moved the choice


def test_the_router_scores_only_the_span_it_is_given():
    from mergeserve.engine.layers import Batch, next_token_targets

    batch = Batch.right_padded([[1, 2, 3, 4, 5], [6, 7, 8]])
    predicted, targets, row, counts = next_token_targets(batch, [(2, 4), None])
    assert targets.tolist() == [3, 4, 7, 8] and counts.tolist() == [2, 2]
    _, targets, _, _ = next_token_targets(batch, [(0, 1), (5, 9)])  # spans that predict nothing: every token
    assert targets.tolist() == [2, 3, 4, 5, 7, 8]


def test_an_unsure_router_mixes_every_expert():
    from mergeserve.engine.mixture_router import top_k_softmax

    scores = torch.tensor([[0.50, 0.49, 0.10],   # two experts nearly tied: unsure
                           [0.90, 0.20, 0.10]])  # one clear winner
    alpha = top_k_softmax(scores, k=1, temperature=10, min_margin=0.2)
    assert (alpha[0] > 0).all() and torch.allclose(alpha[0], torch.softmax(10 * scores[0], 0))
    assert alpha[1].tolist() == [1.0, 0.0, 0.0]
    assert torch.equal(top_k_softmax(scores, k=1, temperature=10), torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]))


def test_temperature_scaling_finds_the_temperature_the_labels_were_drawn_at():
    from mergeserve.learn.router_temperature import fit_inverse_temperature

    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(4000, 3, generator=generator)
    truth = torch.multinomial(torch.softmax(7.0 * scores, dim=1), 1, generator=generator).squeeze(1)
    assert fit_inverse_temperature(scores, truth) == pytest.approx(7.0, rel=0.1)


def test_vector_scaling_finds_the_offsets_the_labels_were_drawn_with():
    from mergeserve.learn.router_temperature import fit_calibration

    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(6000, 3, generator=generator)
    offsets = torch.tensor([0.0, 0.3, -0.2])
    truth = torch.multinomial(torch.softmax(5.0 * (scores + offsets), dim=1), 1, generator=generator).squeeze(1)
    t, fitted = fit_calibration(scores, truth)
    assert t == pytest.approx(5.0, rel=0.1) and fitted.tolist() == pytest.approx(offsets.tolist(), abs=0.05)


def test_offsets_move_a_sequence_routers_choice(zoo, adapters):
    router = {"kind": "perplexity", "top_k": 1, "inverse_temperature": 10}
    ids = [5, 6, 7, 8]
    plain = engine_for(spec(zoo, adapters, "plain", **router), CONFIG).mixture_router.weights([ids])[0]
    loser = int(plain.argmin())
    nudged = {"code": 0.0, "german": 0.0, "math": 0.0} | {("code", "german", "math")[loser]: 100.0}
    moved = engine_for(spec(zoo, adapters, "nudged", **router, offsets=nudged), CONFIG).mixture_router.weights([ids])[0]
    assert int(moved.argmax()) == loser != int(plain.argmax())
    with pytest.raises(Exception, match="router.offsets names"):
        spec(zoo, adapters, "bad", **router, offsets={"physics": 1.0})


def test_calibrate_router_writes_the_spec_with_its_fitted_temperature(zoo, adapters, tmp_path):
    import yaml

    from mergeserve.cli import main
    from mergeserve.spec import load_composition

    experts = {n: adapters[n] for n in ("code", "german", "math")}
    raw = composition("per-request", zoo["base"], experts, method="mergeme", router={"kind": "perplexity", "top_k": 2})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    texts = {"code": ["def add(a, b):", "return x + 1"], "german": ["Die Katze schläft.", "Wo ist das Haus?"],
             "math": ["What is 12 + 7?", "How much is 3 * 4?"]}
    for name, lines in texts.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(f'{{"text": "{t}"}}\n' for t in lines))
    data = [f"{n}={tmp_path / n}.jsonl" for n in texts]
    assert main(["calibrate-router", "--spec", str(tmp_path / "spec.yaml"), "--data", *data, "--threads", "1"]) == 0
    fitted = load_composition(tmp_path / "spec.calibrated.yaml")
    assert fitted.router.inverse_temperature > 0 and fitted.router.inverse_temperature != 1.0
    assert set(fitted.router.offsets) == set(texts) and fitted.router.offsets["code"] == 0.0
    assert main(["calibrate-router", "--spec", str(tmp_path / "spec.yaml"), "--data", f"physics={tmp_path}/math.jsonl"]) == 2


def test_the_server_routes_a_chat_on_its_user_message(zoo, adapters):
    from mergeserve.server.backends.local import _chat_prompt

    router = {"kind": "perplexity", "top_k": 2, "attention": "dynamic", "inverse_temperature": 10}
    executor = Executor()
    registry = local_registry(executor, CONFIG, spec(zoo, adapters, "per-request", **router))
    with live_gateway(registry, executor) as gateway:
        messages = [{"role": "user", "content": "Was ist 12 + 7?"}]
        answer = gateway.client.chat.completions.create(model="per-request", messages=messages, max_tokens=2, temperature=0)
        engine = gateway.engine
        ids, span = _chat_prompt(engine, messages)
        alpha = engine.mixture_router.weights([ids], spans=[span])[0]
        want = {n: w for n, w in zip(engine.expert_names, (alpha / alpha.sum()).tolist())}
        assert answer.model_extra["experts"] == pytest.approx(want, abs=1e-4)
