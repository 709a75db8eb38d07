"""The OpenAI-compatible server, exercised over real HTTP with the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from transformers import PreTrainedTokenizerFast

from live import Gateway, live_gateway, local_registry
from mergeserve.engine.engine import Engine
from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve.server import Registry, create_app
from mergeserve.spec import EngineConfig, parse_composition
from tiny import CHAT_TEMPLATE, make_checkpoint

MOE = "tiny-moe"
STRICT = "strict"  # a dense model whose chat template refuses system messages, as some real ones do


def strict_checkpoint(zoo: dict[str, Path], root: Path) -> Path:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(zoo["base"])
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('system messages are not supported') }}{% endif %}"
        + CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(root / "tokenizer")
    return make_checkpoint(root / "model", "llama", seed=7, tokenizer_from=root / "tokenizer")


@pytest.fixture(scope="module")
def server(zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    pool = ExpertPool()
    moe = parse_composition({
        "name": MOE, "base": str(zoo["base"]), "router": {"kind": "random", "top_k": 2},
        "experts": [{"name": name, "source": str(zoo[name])} for name in ("code", "german", "math")],
    })
    strict_path = strict_checkpoint(zoo, tmp_path_factory.mktemp("strict"))
    strict = parse_composition({
        "name": STRICT, "base": str(strict_path), "router": {"kind": "random", "top_k": 1},
        "experts": [{"name": "only", "source": str(strict_path)}],
    })
    config = EngineConfig(max_num_seqs=4, max_model_len=512)
    executor = Executor()
    registry = local_registry(executor, config, moe, strict, pool=pool)
    with live_gateway(registry, executor, client_timeout=30) as gateway:
        yield gateway


def chat_prompt_tokens(engine: Engine, messages: list[dict[str, str]]) -> int:
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(engine.tokenizer.encode(text, add_special_tokens=False))


def metric_samples(server: Gateway) -> dict[str, list]:
    response = server.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def total(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if labels.items() <= s.labels.items())


# --- basic routes ------------------------------------------------------------------------------


def test_health_ready_and_models(server: Gateway) -> None:
    assert server.http.get("/health").status_code == 200
    assert server.http.get("/ready").status_code == 200
    models = server.client.models.list()
    assert {m.id for m in models.data} == {MOE, STRICT}


# --- non-streaming -----------------------------------------------------------------------------


def test_chat_completion(server: Gateway) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 7?"}]
    response = server.client.chat.completions.create(
        model=MOE, messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True},
    )
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert response.model == MOE
    [choice] = response.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == chat_prompt_tokens(server.engine, messages)
    assert response.usage.completion_tokens == 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + 8


def test_completion_with_batched_prompts_and_n(server: Gateway) -> None:
    prompts = ["Der Hund", "def add(a, b):"]
    response = server.client.completions.create(
        model=MOE, prompt=prompts, n=2, max_tokens=5, temperature=0, extra_body={"ignore_eos": True},
    )
    assert response.id.startswith("cmpl-") and response.object == "text_completion"
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in response.choices)
    by_index = {c.index: c.text for c in response.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy: both samples of a prompt agree
    assert response.usage.prompt_tokens == sum(len(server.engine.tokenizer.encode(p)) for p in prompts)
    assert response.usage.completion_tokens == 4 * 5


def test_completion_from_token_ids(server: Gateway) -> None:
    ids = server.engine.tokenizer.encode("The quick brown fox")
    by_ids = server.client.completions.create(model=MOE, prompt=ids, max_tokens=6, temperature=0)
    by_text = server.client.completions.create(model=MOE, prompt="The quick brown fox", max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


# --- streaming ---------------------------------------------------------------------------------


def test_streaming_chat_matches_non_streaming(server: Gateway) -> None:
    request = {"model": MOE, "messages": [{"role": "user", "content": "Hello, how are you?"}], "max_tokens": 12,
               "temperature": 0}
    whole = server.client.chat.completions.create(**request)
    chunks = list(server.client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_streaming_completion_matches_non_streaming(server: Gateway) -> None:
    request = {"model": MOE, "prompt": "Tom has 5 apples", "max_tokens": 12, "temperature": 0}
    whole = server.client.completions.create(**request)
    chunks = list(server.client.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_streaming_several_choices(server: Gateway) -> None:
    request = {"model": MOE, "prompt": ["Der Hund", "Hello"], "n": 2, "max_tokens": 6, "temperature": 0,
               "extra_body": {"ignore_eos": True}}
    whole = server.client.completions.create(**request)
    streamed: dict[int, str] = {}
    for chunk in server.client.completions.create(**request, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {c.index: c.text for c in whole.choices}


def test_requests_beyond_the_batch_wait_and_finish(server: Gateway) -> None:
    async def send_all() -> list:
        async with openai.AsyncOpenAI(base_url=server.client.base_url, api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(
                client.completions.create(model=MOE, prompt=f"Hello {i}", max_tokens=8, extra_body={"ignore_eos": True})
                for i in range(10)  # max_num_seqs is 4
            ))

    responses = asyncio.run(send_all())
    assert [r.usage.completion_tokens for r in responses] == [8] * 10
    assert all(r.choices[0].finish_reason == "length" for r in responses)


def test_stream_ends_with_done(server: Gateway) -> None:
    body = {"model": MOE, "prompt": "Hello", "max_tokens": 3, "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert all(json.loads(d)["object"] == "text_completion" for d in data[:-1])


# --- sampling parameters -----------------------------------------------------------------------


def test_stop_string_cuts_the_text(server: Gateway) -> None:
    request = {"model": MOE, "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0,
               "extra_body": {"ignore_eos": True}}
    full = server.client.completions.create(**request).choices[0].text
    # A stop string from the middle of the greedy text: printable ASCII, so no partial characters.
    start = next(i for i in range(2, len(full) - 2) if full[i:i + 2].isascii() and full[i:i + 2].isprintable())
    stop = full[start:start + 2]
    stopped = server.client.completions.create(**request, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.index(stop)]


def test_seed_makes_sampling_reproducible(server: Gateway) -> None:
    def sample(seed: int) -> str:
        return server.client.completions.create(
            model=MOE, prompt="Hello", max_tokens=16, temperature=1.0, seed=seed, extra_body={"ignore_eos": True},
        ).choices[0].text

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_logprobs(server: Gateway) -> None:
    completion = server.client.completions.create(model=MOE, prompt="Hello", max_tokens=4, temperature=0, logprobs=3,
                                                  extra_body={"ignore_eos": True})
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(x <= 0 for x in lp.token_logprobs)
    # Three alternatives (fewer only where two tokens decode to the same text), the greedy pick the best of them.
    assert all(1 <= len(top) <= 3 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)
    assert [max(top.values()) for top in lp.top_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-5)

    chat = server.client.chat.completions.create(
        model=MOE, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 4
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)


def test_echo_returns_the_prompt_with_the_logprob_of_every_token_after_the_first(server: Gateway) -> None:
    """What lm-eval's loglikelihood requests send (echo, max_tokens 1, logprobs 1): the prompt's
    token logprobs must equal the engine's own scoring of the same tokens."""
    prompt = "Tom has 5 apples and buys 3 more"
    ids = server.engine.tokenizer.encode(prompt)
    out = server.client.completions.create(model=MOE, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = out.choices[0].logprobs
    assert out.choices[0].text.startswith(server.engine.tokenizer.decode(ids))
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == out.choices[0].text
    expected = server.engine.score([ids])[0]  # [len - 1]
    assert lp.token_logprobs[1:-1] == pytest.approx(expected.tolist(), abs=1e-4)
    assert all(max(top.values()) >= t - 1e-6 for t, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]))

    streamed = list(server.client.completions.create(model=MOE, prompt=prompt, max_tokens=3, temperature=0, logprobs=0,
                                                     echo=True, stream=True))
    first = streamed[0].choices[0]
    assert first.text.startswith(prompt) and first.logprobs.token_logprobs[0] is None
    plain = server.client.completions.create(model=MOE, prompt=prompt, max_tokens=3, temperature=0, echo=True)
    assert plain.choices[0].text == "".join(c.choices[0].text for c in streamed if c.choices)


def test_lm_eval_scores_a_loglikelihood_task_against_the_server(server: Gateway, tmp_path: Path) -> None:
    """The real lm-eval harness, `--model local-completions`, on a two-question task of our own:
    every choice's loglikelihood it reports is the engine's own score of that continuation."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    docs = [("Tom has 5 apples and buys 3 more, so he has", ["8.", "2 apples."]), ("What is 12 + 7? 12 + 7 =", ["19.", "5."])]
    (tmp_path / "arith.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "label": 0}) + "\n" for q, c in docs))
    (tmp_path / "arith.yaml").write_text(
        "task: tiny_arith\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'arith.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_target: label\ndoc_to_choice: '{{choices}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    tokenizer = tmp_path / "tokenizer"
    server.engine.tokenizer.save_pretrained(tokenizer)
    url = str(server.client.base_url).rstrip("/")
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=["tiny_arith"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
        model_args=f"model={MOE},base_url={url}/completions,tokenizer={tokenizer},tokenizer_backend=huggingface,max_retries=1",
    )
    samples = results["samples"]["tiny_arith"]
    tok = server.engine.tokenizer
    for sample, (question, choices) in zip(sorted(samples, key=lambda s: s["doc_id"]), docs):
        for (loglikelihood, _), choice in zip(sample["filtered_resps"], choices):
            context = tok.encode(question)
            whole = tok.encode(question + " " + choice)  # lm-eval's target delimiter, then its split of the pair
            continuation = len(whole) - len(context)
            assert float(loglikelihood) == pytest.approx(float(server.engine.score([whole])[0][-continuation:].sum()), abs=1e-3)
    assert results["results"]["tiny_arith"]["acc,none"] in (0.0, 0.5, 1.0)


def test_a_failed_engine_step_is_a_500_for_its_request_only(server: Gateway) -> None:
    """Injected: the forward raises on one poisoned prompt. Its request gets a 500 in the OpenAI
    envelope (streamed: an in-band error), others are served, and the failure is counted."""
    poison = 3
    forward = server.engine.model.forward

    def failing(batch, *args, **kwargs):
        if bool((batch.tokens == poison).any()):
            raise RuntimeError("injected fault")
        return forward(batch, *args, **kwargs)

    server.engine.model.forward = failing
    try:
        with pytest.raises(openai.InternalServerError) as error:
            server.client.completions.create(model=MOE, prompt=[5, poison, 9], max_tokens=4)
        assert error.value.body["code"] == "engine_error" and "injected fault" in error.value.body["message"]
        stream = server.client.completions.create(model=MOE, prompt=[poison, 5], max_tokens=4, stream=True)
        with pytest.raises(openai.APIError, match="injected fault"):
            list(stream)
        ok = server.client.completions.create(model=MOE, prompt=[5, 6, 9], max_tokens=4, extra_body={"ignore_eos": True})
        assert ok.choices[0].finish_reason == "length"
    finally:
        server.engine.model.forward = forward
    assert total(metric_samples(server), "mergeserve:engine_step_failures_total", model=MOE) == 2


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, param", [
    ({"temperature": -1}, "temperature"),
    ({"temperature": True}, "temperature"),  # JSON true is not 1.0
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 9}, "n"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"suffix": "and so on"}, "suffix"),
])
def test_invalid_parameters_are_400(server: Gateway, bad: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        server.client.completions.create(**{"model": MOE, "prompt": "Hello", **bad})
    assert error.value.body["param"] == param
    assert error.value.body["type"] == "invalid_request_error"


def test_prompt_longer_than_the_context_is_400(server: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        server.client.completions.create(model=MOE, prompt=[1] * 500, max_tokens=20)
    assert error.value.code == "context_length_exceeded"


def test_unknown_model_is_404(server: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        server.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    assert error.value.code == "model_not_found"


def test_chat_template_failure_is_422(server: Gateway) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as error:
        server.client.chat.completions.create(
            model=STRICT, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        )
    assert "system messages are not supported" in error.value.message
    ok = server.client.chat.completions.create(model=STRICT, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_unexpected_errors_are_500_envelopes() -> None:
    app = create_app(Registry(), Executor())

    @app.get("/broken")
    async def broken() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/broken")
    assert response.status_code == 500
    error = {"message": "internal server error", "type": "server_error", "param": None, "code": None}
    assert response.json() == {"error": error}


def test_a_server_without_compositions_is_not_ready() -> None:
    with TestClient(create_app(Registry(), Executor())) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 503


def test_malformed_json_and_unknown_route_use_the_envelope(server: Gateway) -> None:
    response = server.http.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    response = server.http.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


# --- metrics and slots -------------------------------------------------------------------------


def test_metrics(server: Gateway) -> None:
    server.client.completions.create(model=MOE, prompt="Hello", max_tokens=4, extra_body={"ignore_eos": True})
    samples = metric_samples(server)
    assert total(samples, "mergeserve:prompt_tokens_total", model=MOE) > 0
    assert total(samples, "mergeserve:generation_tokens_total", model=MOE) >= 4
    assert total(samples, "mergeserve:request_success_total", model=MOE, finished_reason="length") >= 1
    assert total(samples, "mergeserve:time_to_first_token_seconds_count", model=MOE) >= 1
    assert total(samples, "mergeserve:e2e_request_latency_seconds_count", model=MOE) >= 1
    assert total(samples, "mergeserve:http_requests_total", route="/v1/completions", status="200") >= 1
    assert total(samples, "mergeserve:num_requests_running", model=MOE) == 0
    assert total(samples, "mergeserve:num_requests_waiting", model=MOE) == 0
    experts = [s for s in samples["mergeserve:expert_tokens_total"] if s.labels["model"] == MOE]
    assert {s.labels["expert"] for s in experts} == {"code", "german", "math"}
    assert {s.labels["layer"] for s in experts} == {"0", "1"}
    assert sum(s.value for s in experts) > 0
    # Each token's top-2 weights sum to 1: a layer's summed routing weight is half its picks.
    weights = [s for s in samples["mergeserve:expert_routing_weight_total"] if s.labels["model"] == MOE]
    layer0 = sum(s.value for s in weights if s.labels["layer"] == "0")
    assert layer0 == pytest.approx(sum(s.value for s in experts if s.labels["layer"] == "0") / 2)


def succeeded(server: Gateway) -> float:
    return total(metric_samples(server), "mergeserve:request_success_total", model=MOE)


def wait_until_idle(engine: Engine, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while engine.num_running or engine.num_waiting:
        assert time.monotonic() < deadline, "an abandoned request still holds its slot"
        time.sleep(0.05)


def test_disconnecting_stream_frees_its_slot(server: Gateway) -> None:
    before = succeeded(server)
    body = {"model": MOE, "prompt": "Hello", "stream": True, "max_tokens": 500, "ignore_eos": True}
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        next(line for line in response.iter_lines() if line.startswith("data: "))
        assert server.engine.num_running == 1
    # Leaving the block closed the connection long before 500 tokens were generated.
    wait_until_idle(server.engine)
    assert succeeded(server) == before  # aborted, not finished


def test_disconnecting_non_streaming_request_frees_its_slots(server: Gateway) -> None:
    before = succeeded(server)
    # Eight choices on four slots: seconds of work, abandoned after a fraction of one.
    body = {"model": MOE, "prompt": "Hello", "n": 8, "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        server.http.post("/v1/completions", json=body, timeout=0.3)
    wait_until_idle(server.engine)
    assert succeeded(server) == before
