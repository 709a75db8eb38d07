"""Per-request expert control: `experts` restricts routing to a subset, `expert_bias` shifts the router."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from mergeserve.engine.engine import Engine
from mergeserve.engine.executor import Executor
from mergeserve.server.backends.local import LocalBackend
from mergeserve.engine.sequence import SamplingParams
from mergeserve.server import Registry, create_app
from mergeserve.server.errors import APIError
from mergeserve.server.protocol import ChatCompletionRequest, CompletionRequest, expert_names_of
from mergeserve.spec import parse_composition
from tiny import composition, engine_for, perturbed_copy

NAMES = ["code", "german", "math"]
PROMPTS = ("def add(a, b):\n    return a + b\n", "Die Katze schläft im Haus.", "What is 12 + 7?", "Hello")
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def allow(engine: Engine, *names: str) -> tuple[float, ...]:
    """The router_bias that routes only to `names`."""
    return tuple(0.0 if n in names else -math.inf for n in engine.expert_names)


def bias(engine: Engine, **per_expert: float) -> tuple[float, ...]:
    return tuple(per_expert.get(n, 0.0) for n in engine.expert_names)


def tokenize(engine: Engine, texts=PROMPTS) -> list[list[int]]:
    return [engine.tokenizer(t)["input_ids"] for t in texts]


def compose(name: str, base: Path, experts: dict[str, Path], **router) -> Engine:
    spec = parse_composition(composition(name, base, experts, router=router))
    return engine_for(spec, max_num_seqs=4, max_prefill_tokens=8, max_model_len=128)


def dense(path: Path) -> Engine:
    return compose("dense", path, {"only": path})


@pytest.fixture(scope="module")
def ffn_experts(zoo, tmp_path_factory) -> dict[str, Path]:
    """Fine-tunes of the base that differ only in their FFNs: a BTX MoE of them routed to
    one expert alone is exactly that expert's own model."""
    root = tmp_path_factory.mktemp("ffn_experts")
    return {n: perturbed_copy(zoo["base"], root / n, seed=i + 1, only=".mlp.") for i, n in enumerate(NAMES)}


@pytest.fixture(scope="module")
def layer_experts(zoo, tmp_path_factory) -> dict[str, Path]:
    """Fine-tunes that differ in whole decoder layers (what a sequence router's separate attention runs)."""
    root = tmp_path_factory.mktemp("layer_experts")
    return {n: perturbed_copy(zoo["base"], root / n, seed=i + 1, only="model.layers.") for i, n in enumerate(NAMES)}


@pytest.fixture(scope="module")
def moe(zoo, ffn_experts) -> Engine:
    return compose("moe", zoo["base"], ffn_experts, kind="random", top_k=2)


def load_of(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> torch.Tensor:
    """Tokens each expert received while generating, summed over layers, [E]."""
    before = engine.expert_load.clone()
    engine.generate(prompts, params)
    return (engine.expert_load - before).sum(0)


def logprobs_of(engine: Engine, ids: list[int], params: SamplingParams) -> torch.Tensor:
    """Log-probability of each generated token, [max_tokens]."""
    engine.add_request("lp", ids, params)
    outs = []
    while engine.has_work():
        outs += engine.step()
    return torch.tensor([lp.logprob for o in outs for lp in o.logprobs])


def run_together(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """Each prompt with its own params, all in the same continuous batch."""
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", prompt, p)
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_work():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return list(out.values())


# --- the engine ----------------------------------------------------------------------------------


def test_one_allowed_expert_under_top_2_is_that_experts_own_model(moe, ffn_experts):
    prompts = tokenize(moe)
    params = replace(GREEDY, router_bias=allow(moe, "math"))
    before = moe.expert_load.clone()
    assert moe.generate(prompts, params) == dense(ffn_experts["math"]).generate(prompts, GREEDY)
    # The second top-k slot gets weight 0: nothing runs on it and nothing is counted for it.
    fed = sum(len(p) + params.max_tokens - 1 for p in prompts)  # the last sampled token is never fed
    assert (moe.expert_load - before).tolist() == [[0, 0, fed]] * 2


def test_one_allowed_expert_gives_that_experts_log_probabilities(moe, ffn_experts):
    ids = tokenize(moe)[0]
    with_logprobs = replace(GREEDY, logprobs=0)
    got = logprobs_of(moe, ids, replace(with_logprobs, router_bias=allow(moe, "code")))
    expected = logprobs_of(dense(ffn_experts["code"]), ids, with_logprobs)
    assert torch.isfinite(got).all()  # the empty top-k slot is weight 0, not NaN
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_bias_moves_load_toward_and_away_from_an_expert(moe):
    prompts = tokenize(moe)
    share = {}
    for label, b in (("none", None), ("up", bias(moe, german=2.0)), ("down", bias(moe, german=-2.0))):
        load = load_of(moe, prompts, SamplingParams(max_tokens=1, router_bias=b))  # the prompts' tokens only
        assert load.sum() == 2 * 2 * sum(map(len, prompts))  # still top-2 in each of 2 layers
        share[label] = float(load[NAMES.index("german")] / load.sum())
    assert share["down"] < share["none"] < share["up"]


def test_a_restricted_request_leaves_its_batch_neighbours_alone(moe):
    prompts = tokenize(moe)
    params = [
        GREEDY,
        replace(GREEDY, router_bias=allow(moe, "code", "german")),
        replace(GREEDY, router_bias=bias(moe, code=3.0, math=-1.5)),
        GREEDY,
    ]
    together = run_together(moe, prompts, params)  # chunked, padded prefill of rows with and without a bias
    alone = [run_together(moe, [p], [sp])[0] for p, sp in zip(prompts, params)]
    assert together == alone
    unsteered = moe.generate(prompts[1:3], GREEDY)
    assert together[1] != unsteered[0] and together[2] != unsteered[1]  # the steering did change those two


def test_the_engine_refuses_a_malformed_router_bias(moe, zoo):
    ids = tokenize(moe)[0]
    for wrong in [(0.0, 0.0), (-math.inf,) * 3, (math.nan, 0.0, 0.0)]:
        with pytest.raises(ValueError, match="router_bias"):
            moe.add_request("bad", ids, SamplingParams(router_bias=wrong))
    with pytest.raises(ValueError, match="dense"):
        dense(zoo["base"]).add_request("bad", ids, SamplingParams(router_bias=(0.0,)))


def test_a_sequence_router_chooses_among_the_allowed_experts_only(zoo, layer_experts):
    engine = compose("seq", zoo["base"], layer_experts, kind="perplexity", top_k=2)
    prompts = tokenize(engine)
    got = engine.generate(prompts, replace(GREEDY, router_bias=allow(engine, "german")))
    # Each request went to german alone (alpha one-hot), which separate attention runs as german's own model.
    assert engine.expert_requests.tolist() == [0, len(prompts), 0]
    assert got == dense(layer_experts["german"]).generate(prompts, GREEDY)
    both = run_together(engine, prompts[:1], [SamplingParams(max_tokens=1, router_bias=allow(engine, "code", "math"))])
    assert len(both[0]) == 1 and engine.expert_requests.tolist() == [1, len(prompts), 1]



def test_merged_attention_counts_a_restricted_request_for_its_expert_only(zoo, layer_experts):
    engine = compose("merged", zoo["base"], layer_experts, kind="perplexity", top_k=2, attention="merged")
    restricted, free = tokenize(engine, PROMPTS[:2])
    german = torch.tensor([0, 1, 0])
    prefill = SamplingParams(max_tokens=1)
    run_together(engine, [restricted, free], [replace(prefill, router_bias=allow(engine, "german")), prefill])
    free_choice = engine.expert_requests - german  # the two experts the other request chose
    assert free_choice.sum() == 2
    # Rows of one forward pick 1 and 2 experts: the restricted row's empty slot counts nowhere.
    expected = len(restricted) * german + len(free) * free_choice  # per layer
    assert (engine.expert_load == expected).all()


# --- the request fields --------------------------------------------------------------------------


def request(**fields) -> CompletionRequest:
    return CompletionRequest(model="moe", prompt="Hi", **fields)


def test_experts_and_expert_bias_become_one_router_bias():
    assert request().router_bias(NAMES) is None
    assert request(experts=["math", "code"]).router_bias(NAMES) == (0.0, -math.inf, 0.0)
    assert request(expert_bias={"math": 1.5}).router_bias(NAMES) == (0.0, 0.0, 1.5)
    both = request(experts=["math", "code"], expert_bias={"code": -2.0})
    assert both.sampling_params(16, None, NAMES).router_bias == (-2.0, -math.inf, 0.0)
    chat = ChatCompletionRequest(model="moe", messages=[{"role": "user", "content": "Hi"}], experts=["german"])
    assert chat.sampling_params(16, None, NAMES).router_bias == (-math.inf, 0.0, -math.inf)


@pytest.mark.parametrize("fields,param,message", [
    ({"experts": ["math", "physics"]}, "experts", "no expert named ['physics']; this model's experts are ['code', 'german', 'math']"),
    ({"experts": []}, "experts", "at least one expert"),
    ({"experts": ["math", "math"]}, "experts", "must not repeat a name: ['math']"),
    ({"expert_bias": {"chemistry": 1.0}}, "expert_bias", "this model's experts are ['code', 'german', 'math']"),
    ({"expert_bias": {"math": math.inf}}, "expert_bias", "must be a finite number"),
    ({"expert_bias": {"math": math.nan}}, "expert_bias", "must be a finite number"),
    ({"expert_bias": {"math": 1e30}}, "expert_bias", "in [-100, 100]"),
    ({"experts": ["code"], "expert_bias": {"math": 1.0}}, "expert_bias", "'math', which experts leaves out"),
])
def test_invalid_expert_fields_are_a_400_naming_the_field(fields, param, message):
    with pytest.raises(APIError) as error:
        request(**fields).router_bias(NAMES)
    assert (error.value.status, error.value.param) == (400, param)
    assert message in error.value.message


@pytest.mark.parametrize("fields,param", [({"experts": ["only"]}, "experts"), ({"expert_bias": {"only": 1.0}}, "expert_bias")])
def test_a_dense_composition_has_no_experts_to_choose(fields, param):
    with pytest.raises(APIError, match="this model is dense") as error:
        request(**fields).sampling_params(16, None, expert_names=None)
    assert (error.value.status, error.value.param) == (400, param)


def test_expert_names_of_an_engine(moe, zoo):
    assert expert_names_of(moe) == NAMES
    assert expert_names_of(dense(zoo["base"])) is None


# --- over HTTP, with the openai client's extra_body -------------------------------------------------


@pytest.fixture(scope="module")
def client(zoo, ffn_experts) -> Iterator[tuple[openai.OpenAI, Engine]]:
    engine = compose("moe", zoo["base"], ffn_experts, kind="random", top_k=2)
    executor = Executor()
    app = create_app(Registry([LocalBackend(e, executor) for e in (engine, dense(zoo["base"]))]), executor)
    with TestClient(app) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0), engine


def test_extra_body_restricts_a_chat_completion_to_one_expert(client):
    client, engine = client
    before = engine.expert_load.clone()
    response = client.chat.completions.create(
        model="moe", messages=[{"role": "user", "content": "What is 12 + 7?"}], max_tokens=4, temperature=0,
        extra_body={"experts": ["math"], "expert_bias": {"math": 1.5}, "ignore_eos": True},
    )
    assert response.usage.completion_tokens == 4
    load = (engine.expert_load - before).sum(0)
    assert load[NAMES.index("math")] > 0 and load.sum() == load[NAMES.index("math")]


@pytest.mark.parametrize("model,extra,param,message", [
    ("moe", {"experts": ["physics"]}, "experts", "this model's experts are ['code', 'german', 'math']"),
    ("moe", {"expert_bias": {"math": "high"}}, "expert_bias", "expert_bias"),
    ("dense", {"experts": ["only"]}, "experts", "this model is dense"),
])
def test_invalid_expert_fields_over_http_are_openai_400s(client, model, extra, param, message):
    client, _ = client
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model, prompt="Hi", max_tokens=2, extra_body=extra)
    body = error.value.response.json()["error"]
    assert (body["type"], body["param"]) == ("invalid_request_error", param)
    assert message in body["message"]
