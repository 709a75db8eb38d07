"""One request must never hurt another: every request's work is bounded and admitted for what it costs.

Each way a request once hurt others has its test here; then a bystander's greedy stream that must not notice
a volley of hostile requests, and Hypothesis throwing extreme JSON at every /v1 route.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from live import Gateway, live_gateway, local_registry, wait_until
from mergeserve.engine.engine import Engine
from mergeserve.engine.executor import EngineError, Executor
from mergeserve.engine.sequence import SamplingParams
from mergeserve.server.backends.local import MAX_CHARS_PER_TOKEN
from mergeserve.server.protocol import (
    MAX_EXPERTS, MAX_LOGIT_BIAS, MAX_MESSAGES, MAX_PROMPTS, MAX_STOP, MAX_TOOLS,
)
from mergeserve.spec import EngineConfig, parse_composition

MODEL = "tiny-moe"
MAX_WAITING = 16
ENGINE = EngineConfig(max_num_seqs=4, max_model_len=160, max_tokens_limit=96, max_waiting=MAX_WAITING)
MAX_ERROR_BYTES = 8 << 10  # an error is a few KB at most, whatever the request
MAX_RESPONSE_BYTES = 1 << 20  # any answer of this small server (n x prompts x max_tokens are bounded)
BYSTANDER = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 96, "temperature": 0}
HELLO = [{"role": "user", "content": "Hello"}]


class SteeredExecutor(Executor):
    """Steps engines only while `running` is set, each step `step_delay_s` late: a test can hold
    requests in the queue, or keep a stream running while it sends others."""

    def __init__(self) -> None:
        super().__init__()
        self.running = threading.Event()
        self.running.set()
        self.step_delay_s = 0.0

    def _step(self, engine: Engine) -> None:
        self.running.wait()
        time.sleep(self.step_delay_s)
        super()._step(engine)


@pytest.fixture(scope="module")
def server(zoo: dict[str, Path]) -> Iterator[Gateway]:
    spec = parse_composition({
        "name": MODEL, "base": str(zoo["base"]), "router": {"kind": "random", "top_k": 1},
        "experts": [{"name": name, "source": str(zoo[name])} for name in ("code", "math")],
    })
    executor = SteeredExecutor()
    with live_gateway(local_registry(executor, ENGINE, spec), executor, client_timeout=20) as gateway:
        yield gateway
        executor.running.set()


@contextmanager
def paused(executor: SteeredExecutor) -> Iterator[None]:
    executor.running.clear()
    try:
        yield
    finally:
        executor.running.set()


def completion(**fields: object) -> dict:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 2} | fields


def chat(**fields: object) -> dict:
    return {"model": MODEL, "messages": HELLO, "max_tokens": 2} | fields


def refusal(response: httpx.Response, status: int = 400) -> dict:
    """The error of a refused request, checked to be small and in OpenAI's envelope."""
    assert response.status_code == status, response.text[:500]
    assert len(response.content) < MAX_ERROR_BYTES
    error = response.json()["error"]
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    return error


# --- one test per finding -------------------------------------------------------------------------


def test_a_seed_past_int64_is_a_400_naming_it(server: Gateway) -> None:
    for seed in (2**64, 2**63, -(2**63) - 1):
        error = refusal(server.http.post("/v1/completions", json=completion(seed=seed)))
        assert error["param"] == "seed" and "922337203685477580" in error["message"]  # one bound or the other
    for seed in (2**63 - 1, -(2**63)):  # the edges of OpenAI's range, with n: choice j samples with seed + j
        response = server.http.post("/v1/completions", json=completion(seed=seed, n=2))
        assert response.status_code == 200 and len(response.json()["choices"]) == 2


def test_a_request_that_fails_admission_fails_alone(server: Gateway) -> None:
    """A seed the generator cannot take, past the API's check (any fault while the engine takes a
    request from its inbox stands for the same): that request fails, the one beside it runs on."""
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    async def tokens(request_id: str, params: SamplingParams) -> list[int]:
        ids = []
        async for out in server.executor.generate(server.engine, request_id, [5, 6, 7], params):
            ids += out.new_token_ids
        return ids

    async def side_by_side() -> list:
        with paused(server.executor):  # both reach the inbox before a step takes them
            both = [asyncio.ensure_future(tokens("bystander", greedy)),
                    asyncio.ensure_future(tokens("bad-seed", dataclasses.replace(greedy, seed=2**64)))]
            while server.engine.num_waiting < 2:
                await asyncio.sleep(0.01)
        return await asyncio.wait_for(asyncio.gather(*both, return_exceptions=True), timeout=30)

    alone = asyncio.run(tokens("alone", greedy))
    bystander, bad = asyncio.run(side_by_side())
    assert bystander == alone and isinstance(bad, EngineError)
    assert server.engine.num_running == server.engine.num_waiting == 0


def test_a_prompt_list_times_n_is_admitted_whole_or_refused_without_queueing(server: Gateway) -> None:
    error = refusal(server.http.post("/v1/completions", json=completion(prompt=["Hi"] * 5000, n=8)))
    assert error["param"] == "prompt"
    # Within the schema's bounds, but 20 x 8 sequences could never fit a queue of MAX_WAITING.
    error = refusal(server.http.post("/v1/completions", json=completion(prompt=["Hi"] * 20, n=8)))
    assert (error["param"], error["code"]) == ("n", "too_many_sequences")
    assert server.engine.num_waiting == 0
    assert server.http.post("/v1/chat/completions", json=chat()).status_code == 200  # nobody else is refused


def test_admission_counts_sequences_not_requests(server: Gateway) -> None:
    """8 sequences wait: a request of 16 more is a 429 and queues nothing; one sequence still fits."""
    with ThreadPoolExecutor(2) as pool, paused(server.executor):
        eight = pool.submit(server.http.post, "/v1/completions", json=completion(prompt=["a", "b"], n=4))
        wait_until(lambda: server.engine.num_waiting == 8, what="8 sequences waiting")
        error = refusal(server.http.post("/v1/completions", json=completion(prompt=["a", "b"], n=8)), 429)
        assert error["code"] == "queue_full" and server.engine.num_waiting == 8
        one = pool.submit(server.http.post, "/v1/chat/completions", json=chat())
        wait_until(lambda: server.engine.num_waiting == 9, what="the ninth sequence")
        server.executor.running.set()
        assert eight.result().status_code == one.result().status_code == 200


def test_twenty_thousand_experts_are_refused_at_once(server: Gateway) -> None:
    start = time.monotonic()
    error = refusal(server.http.post("/v1/completions", json=completion(experts=["code"] * 20_000)))
    assert error["param"] == "experts" and str(MAX_EXPERTS) in error["message"]
    assert time.monotonic() - start < 2  # generous: it was 3.9 s of a blocked event loop
    error = refusal(server.http.post("/v1/completions", json=completion(experts=[f"x{i}" for i in range(MAX_EXPERTS)])))
    assert error["param"] == "experts" and "and 246 more" in error["message"]  # lists 10 names, counts the rest


def test_a_hundred_thousand_malformed_messages_get_a_small_error(server: Gateway) -> None:
    error = refusal(server.http.post("/v1/chat/completions", json=chat(messages=[{"role": "nobody"}] * 100_000)))
    assert error["param"] == "messages" and str(MAX_MESSAGES) in error["message"]
    # Under the bound, every message wrong: the first five problems are listed, the rest counted.
    error = refusal(server.http.post("/v1/chat/completions", json=chat(messages=[{"role": "nobody"}] * 1000)))
    assert error["param"] == "messages" and "and 995 more problems" in error["message"]
    assert error["message"].count("messages[") == 5
    # A problem's location can be a client's dict key: it is clipped too.
    error = refusal(server.http.post("/v1/completions", json=completion(logit_bias={"k" * 100_000: "x"})))
    assert error["param"] == "logit_bias"


def test_the_stop_list_is_bounded(server: Gateway) -> None:
    assert server.http.post("/v1/completions", json=completion(stop=["\n"] * MAX_STOP)).status_code == 200
    for stop in (["\n"] * (MAX_STOP + 1), ["x"] * 100_000, "x" * 2000):
        assert refusal(server.http.post("/v1/completions", json=completion(stop=stop)))["param"] == "stop"


def test_templates_and_tokenizers_run_off_the_event_loop_over_bounded_text(
    server: Gateway, monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, bool, int]] = []  # (what, on the event loop, characters)

    def recorded(name: str, method: Callable[..., object]) -> Callable[..., object]:
        def call(text: object, *args: object, **kwargs: object) -> object:
            calls.append((name, on_event_loop(), len(str(text))))
            return method(text, *args, **kwargs)
        return call

    tokenizer = server.engine.tokenizer
    monkeypatch.setattr(tokenizer, "encode", recorded("encode", tokenizer.encode))
    monkeypatch.setattr(tokenizer, "apply_chat_template", recorded("template", tokenizer.apply_chat_template))
    too_long = "Hello " * 200_000  # 1.2 MB: refused by its length before any template or tokenizer sees it
    assert refusal(server.http.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": too_long}])))[
        "code"] == "context_length_exceeded"
    assert refusal(server.http.post("/v1/completions", json=completion(prompt=["Hi", too_long])))["param"] == "prompt"
    assert calls == []
    assert server.http.post("/v1/chat/completions", json=chat()).status_code == 200
    assert server.http.post("/v1/completions", json=completion(echo=True)).status_code == 200
    assert {name for name, _, _ in calls} == {"encode", "template"}
    assert not any(on_loop for _, on_loop, _ in calls)
    assert max(chars for _, _, chars in calls) <= MAX_CHARS_PER_TOKEN * ENGINE.max_model_len


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_the_schema_documents_the_bounds(server: Gateway) -> None:
    schemas = server.http.get("/openapi.json").json()["components"]["schemas"]
    fields = schemas["CompletionRequest"]["properties"] | schemas["ChatCompletionRequest"]["properties"]
    bounds = {"seed": 2**63 - 1, "prompt": MAX_PROMPTS, "stop": MAX_STOP, "experts": MAX_EXPERTS, "expert_bias": MAX_EXPERTS,
              "logit_bias": MAX_LOGIT_BIAS, "messages": MAX_MESSAGES, "tools": MAX_TOOLS}
    for field, bound in bounds.items():
        assert str(bound) in fields[field]["description"], field


# --- a bystander among hostile requests -----------------------------------------------------------


def hostile_requests() -> list[tuple[str, dict, str]]:
    """(route, body, the param its refusal names), built before the bystander starts."""
    return [
        ("/v1/completions", completion(seed=18446744073709551616), "seed"),
        ("/v1/completions", completion(prompt=["Hi"] * 5000, n=8), "prompt"),
        ("/v1/completions", completion(prompt=["Hi"] * 20, n=8), "n"),
        ("/v1/completions", completion(experts=["code"] * 20_000), "experts"),
        ("/v1/chat/completions", chat(messages=[{"role": "nobody"}] * 100_000), "messages"),
        ("/v1/completions", completion(stop=["x"] * 10_000), "stop"),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "Hello " * 200_000}]), "messages"),
    ]


def stream_text(server: Gateway) -> Iterator[str]:
    stream = server.client.completions.create(stream=True, extra_body={"ignore_eos": True}, **BYSTANDER)
    for chunk in stream:
        yield "".join(c.text for c in chunk.choices)


def read_in_background(chunks: Iterator[str]) -> tuple[threading.Thread, list[tuple[float, str]], list[BaseException]]:
    arrivals: list[tuple[float, str]] = []
    failures: list[BaseException] = []

    def read() -> None:
        try:
            arrivals.extend((time.monotonic(), text) for text in chunks)
        except BaseException as e:  # noqa: BLE001 - the test reports it
            failures.append(e)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, arrivals, failures


def health_latencies(url: str, done: threading.Event) -> list[float]:
    latencies = []
    with httpx.Client(base_url=url, timeout=30) as http:
        while not done.is_set():
            start = time.monotonic()
            assert http.get("/health").status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.05)
    return latencies


def test_hostile_requests_leave_a_bystander_stream_and_health_alone(server: Gateway) -> None:
    alone = "".join(stream_text(server))
    requests = hostile_requests()
    server.executor.step_delay_s = 0.02  # the bystander's 96 tokens take 2 s or more: it runs throughout
    try:
        chunks = stream_text(server)
        first = next(chunks)
        reader, arrivals, failures = read_in_background(chunks)
        done = threading.Event()
        with ThreadPoolExecutor(4) as pool:
            health = pool.submit(health_latencies, server.url, done)
            start = time.monotonic()
            answers = list(pool.map(lambda r: httpx.post(server.url + r[0], json=r[1], timeout=20), requests))
            end = time.monotonic()
            done.set()
            latencies = health.result()
        reader.join(timeout=60)
    finally:
        server.executor.step_delay_s = 0.0
    assert not failures and first + "".join(text for _, text in arrivals) == alone
    assert any(start < t < end for t, _ in arrivals)  # the stream went on while they were answered
    for (route, _, param), response in zip(requests, answers):
        assert refusal(response)["param"] == param, route
    assert latencies and max(latencies) < 2
    assert server.http.post("/v1/chat/completions", json=chat()).status_code == 200  # and nobody is starved


# --- Hypothesis: extreme JSON into every /v1 route ------------------------------------------------

SAMPLING = ["model", "max_tokens", "n", "seed", "temperature", "top_p", "top_k", "stop", "logprobs", "stream",
            "stream_options", "logit_bias", "experts", "expert_bias", "user", "ignore_eos", "presence_penalty"]
ROUTES = {  # route: (a valid body, the fields to replace)
    "/v1/completions": (completion(), ["prompt", "echo", "suffix", *SAMPLING]),
    "/v1/chat/completions": (chat(), ["messages", "max_completion_tokens", "top_logprobs", "tools", "response_format", *SAMPLING]),
    "/v1/feedback": ({"id": "cmpl-0", "score": 1}, ["id", "score"]),
    "/v1/models": ({}, ["model"]),
}
# Raw JSON text, so that values Python's json module would not write (deep nesting) can be sent.
numbers = st.one_of(
    st.integers().map(str),
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**30, -(10**30), 2**31, -1, 0, 1]).map(str),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "1e308", "-0.0", "4.9e-324"]),
    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
)
short_strings = st.text(max_size=20).map(json.dumps)
strings = st.one_of(short_strings, st.integers(0, 1 << 18).map(lambda n: json.dumps("x" * n)))
nested = st.integers(1, 50_000).flatmap(
    lambda depth: st.sampled_from(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth]),
)
scalars = st.one_of(numbers, strings, st.sampled_from(["true", "false", "null", "[]", "{}"]))
objects = st.dictionaries(st.sampled_from(["role", "content", "type", "text", "include_usage", "model"]), scalars, max_size=4).map(
    lambda d: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in d.items()) + "}",
)
small = st.one_of(numbers, short_strings, st.sampled_from(["true", "null", "[]", "{}"]), objects.filter(lambda o: len(o) < 200))
long_lists = st.tuples(small, st.integers(0, 20_000)).map(lambda v: "[" + ",".join([v[0]] * v[1]) + "]")
values = st.one_of(numbers, scalars, long_lists, nested, objects, st.lists(objects, max_size=3).map(lambda o: f"[{','.join(o)}]"))
NUMERIC = {"max_tokens", "max_completion_tokens", "n", "seed", "temperature", "top_p", "top_k", "logprobs", "top_logprobs",
           "presence_penalty", "score"}


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, str]:
    """(route, JSON text): a valid body with a few fields replaced by extreme values, or a whole extreme value."""
    route = draw(st.sampled_from(sorted(ROUTES)))
    if draw(st.integers(0, 9)) == 0:
        return route, draw(values)
    valid, names = ROUTES[route]
    fields = {k: json.dumps(v) for k, v in valid.items()}
    for name in draw(st.sets(st.sampled_from(names), min_size=1, max_size=3)):  # numbers into numbers, lists into lists, mostly
        fields[name] = draw(st.one_of(numbers if name in NUMERIC else long_lists, values))
    return route, "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in fields.items()) + "}"


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(bodies())
def test_extreme_json_gets_an_answer_never_a_server_error(server: Gateway, body: tuple[str, str]) -> None:
    route, text = body
    method = "GET" if route == "/v1/models" else "POST"
    response = server.http.request(method, route, content=text, headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text[:500]
    assert len(response.content) < MAX_RESPONSE_BYTES
    if response.status_code >= 400:
        refusal(response, response.status_code)
    else:
        assert '"server_error"' not in response.text  # a stream's in-band error
