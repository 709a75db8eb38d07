"""`method: route`: whole models of different families and sizes behind one name, each request
routed at admission to one of them (keywords, centroid or perplexity), each model in its own engine."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
import yaml
from live import Gateway, built, live_gateway
from safetensors.torch import save_file
from tiny import make_checkpoint
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from mergeserve.cli import main
from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve.router.request import KeywordRouter
from mergeserve.server import Registry
from mergeserve.server.backends.route import BatchedRouter
from mergeserve.server.builder import Builder
from mergeserve.spec import EngineConfig, parse_composition
from mergeserve.zoo.splits import write_jsonl

CODE, GERMAN, MATH = "def add(a, b):\n    return a + b\n", "Die Katze schläft im Haus.", "What is 12 + 7? 12 + 7 = 19."


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> dict[str, Path]:
    """Three whole models of different families, widths and depths."""
    root = tmp_path_factory.mktemp("members")
    return {
        "coder": make_checkpoint(root / "coder", "llama", seed=1, layers=2),
        "german": make_checkpoint(root / "german", "mistral", seed=2, layers=3, hidden_size=96, intermediate_size=128),
        "math": make_checkpoint(root / "math", "qwen2", seed=3, layers=1, hidden_size=32, intermediate_size=64),
    }


def route_spec(members: dict[str, Path], name: str = "zoo", **router) -> dict:
    extra = {"coder": {"keywords": ["def", "return", "python"], "prompts": [CODE]},
             "german": {"keywords": ["die", "katze", "haus"], "prompts": [GERMAN]},
             "math": {"keywords": ["plus", "sum", "12"], "prompts": [MATH]}}
    return {"name": name, "method": "route", "router": router or {"kind": "keywords"},
            "experts": [{"name": n, "source": str(p)} | extra[n] for n, p in members.items()]}


@pytest.fixture()
def server(members) -> Iterator[Gateway]:
    registry, executor = Registry(), Executor()
    builder = Builder(registry, ExpertPool(), executor, EngineConfig(max_num_seqs=4, max_model_len=128))
    with live_gateway(registry, executor, builder=builder, timeout=60) as gateway:
        yield gateway


def complete(server: Gateway, model: str, prompt: str, **extra) -> tuple[str, str, str]:
    """(the member that served it, the greedy text, the system fingerprint)."""
    raw = server.client.completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True, **extra})
    body = raw.parse()
    return raw.headers["x-mergeserve-member"], body.choices[0].text, body.system_fingerprint


@pytest.mark.parametrize("kind", ["keywords", "centroid"])
def test_each_request_goes_to_the_model_its_text_names(server, members, kind):
    built(server.builder, parse_composition(route_spec(members, **{"kind": kind})))
    for prompt, expected in ((CODE, "coder"), (GERMAN, "german"), (MATH, "math")):
        member, _, fingerprint = complete(server, "zoo", prompt)
        assert member == expected and fingerprint.endswith(f":{expected}")


def bits_per_byte(path: Path, text: str) -> float:
    """The reference: the member's loss per UTF-8 byte under transformers itself, with the tokenizer
    the checkpoint ships (saved as the generic class; AutoTokenizer would pick Qwen2's own for qwen2)."""
    tok, model = PreTrainedTokenizerFast.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[tok.bos_token_id, *tok.encode(text, add_special_tokens=False)]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss * (ids.shape[1] - 1)
    return float(loss) / len(text.encode())


def test_the_perplexity_router_picks_the_lowest_loss_per_byte(server, members):
    built(server.builder, parse_composition(route_spec(members, kind="perplexity")))
    for prompt in (CODE, GERMAN, MATH, "Hello, how are you today?"):
        expected = min(members, key=lambda n: bits_per_byte(members[n], prompt))
        assert complete(server, "zoo", prompt)[0] == expected


def test_experts_restrict_and_expert_bias_shifts_the_choice(server, members):
    built(server.builder, parse_composition(route_spec(members)))
    assert complete(server, "zoo", CODE, experts=["german", "math"])[0] in ("german", "math")
    assert complete(server, "zoo", CODE, expert_bias={"math": 50.0})[0] == "math"
    with pytest.raises(openai.BadRequestError, match="no expert named"):
        complete(server, "zoo", CODE, experts=["nobody"])


def test_a_request_routed_to_one_model_equals_that_model_served_alone(server, members):
    built(server.builder, parse_composition(route_spec(members)))
    for name, path in members.items():
        built(server.builder, parse_composition({"name": f"alone-{name}", "base": str(path),
                                                    "experts": [{"name": name, "source": str(path)}]}))
    for prompt, member in ((CODE, "coder"), (GERMAN, "german"), (MATH, "math")):
        assert complete(server, "zoo", prompt)[1] == server.client.completions.create(
            model=f"alone-{member}", prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}).choices[0].text


@pytest.mark.parametrize("top_k", [1, 2])
def test_a_mixed_batch_equals_each_request_run_alone(server, members, top_k):
    """Concurrent requests, each on its member (top_k=2: on two members in lockstep, 10 sequences
    over three engines of 4 slots, so some wait for a slot), give what each gives alone."""
    built(server.builder, parse_composition(route_spec(members, kind="keywords", top_k=top_k)))
    prompts = [CODE, GERMAN, MATH, CODE + " # again", GERMAN + " Ja."]
    alone = [complete(server, "zoo", p)[:2] for p in prompts]
    together: list = [None] * len(prompts)

    def send(i: int) -> None:
        together[i] = complete(server, "zoo", prompts[i])[:2]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_a_converted_model_keeps_the_tokenizer_it_was_saved_with(members):
    """The Qwen2 member was saved with a generic tokenizer: the pool serves exactly that one."""
    text = "def f(x):\n    return  x + 123\n"
    served = ExpertPool().get(str(members["math"])).tokenizer
    assert served.encode(text) == PreTrainedTokenizerFast.from_pretrained(members["math"]).encode(text)


def test_chat_uses_the_chosen_models_own_template_and_streams(server, members):
    built(server.builder, parse_composition(route_spec(members)))
    raw = server.client.chat.completions.with_raw_response.create(
        model="zoo", messages=[{"role": "user", "content": "Die Katze und das Haus"}], max_tokens=4, temperature=0)
    assert raw.headers["x-mergeserve-member"] == "german" and raw.parse().choices[0].message.content is not None
    chunks = list(server.client.chat.completions.create(
        model="zoo", messages=[{"role": "user", "content": "def f(): return 1"}], max_tokens=4, stream=True))
    assert chunks and all(c.system_fingerprint.endswith(":coder") for c in chunks)


def test_token_id_prompts_are_refused_since_members_tokenize_differently(server, members):
    built(server.builder, parse_composition(route_spec(members)))
    with pytest.raises(openai.BadRequestError, match="as text"):
        server.client.completions.create(model="zoo", prompt=[1, 2, 3], max_tokens=2)


def test_members_count_their_own_requests_and_tokens(server, members):
    built(server.builder, parse_composition(route_spec(members)))
    complete(server, "zoo", CODE)
    complete(server, "zoo", MATH)
    text = server.http.get("/metrics").text
    assert 'mergeserve:member_requests_total{member="coder",model="zoo"} 1.0' in text
    assert 'mergeserve:generation_tokens_total{model="zoo.math"} 6.0' in text
    assert 'mergeserve:engine_step_failures_total{model="zoo.german"} 0.0' in text


@pytest.mark.parametrize(("change", "message"), [
    ({"base": "/somewhere"}, "give no base"),
    ({"router": {"kind": "keywords", "top_k": 4}}, "top_k=4 exceeds the 3 experts"),
    ({"router": {"kind": "hidden"}}, "not a request router"),
    ({"router": {"kind": "centroid", "encoder": "nobody"}}, "not one of the experts"),
])
def test_a_broken_route_spec_is_refused_by_name(members, change, message):
    with pytest.raises(ValueError, match=message):
        parse_composition(route_spec(members) | change)


def test_keywords_are_required_for_every_member(members):
    spec = route_spec(members)
    spec["experts"][1]["keywords"] = []
    with pytest.raises(ValueError, match=r"keywords for every expert; none for \['german'\]"):
        parse_composition(spec)


def test_a_learned_router_trained_on_unlabeled_text_routes_like_the_best_member(server, members, tmp_path):
    """train-router on a route spec labels each text by the member with the best loss per byte
    (the perplexity router's choice) and learns to predict it from the prompt's mean embedding."""
    texts = [CODE, GERMAN, MATH, "Hello, how are you today?", "Der Hund läuft schnell über die Straße.",
             "import os\nprint(os.getcwd())\n", "Tom has 5 apples and buys 3 more, so he has 8."]
    write_jsonl(tmp_path / "calib.jsonl", [{"text": t} for t in texts])
    spec = route_spec(members, kind="learned", weights=str(tmp_path / "router.safetensors"))
    (tmp_path / "route.yaml").write_text(yaml.safe_dump(spec))
    assert main(["train-router", "--spec", str(tmp_path / "route.yaml"), "--data", str(tmp_path / "calib.jsonl"),
                 "--out", str(tmp_path / "router.safetensors"), "--threads", "1"]) == 0
    expected = {t: min(members, key=lambda n: bits_per_byte(members[n], t)) for t in texts}
    built(server.builder, parse_composition(spec))
    assert {t: complete(server, "zoo", t)[0] for t in texts} == expected


def test_a_learned_router_for_other_members_is_refused(server, members, tmp_path):
    save_file({"weight": torch.zeros(2, 32), "bias": torch.zeros(2)}, str(tmp_path / "r.safetensors"),
              metadata={"expert_names": '["coder", "math"]', "encoder": "math"})
    revision = built(server.builder, parse_composition(route_spec(members, kind="learned", weights=str(tmp_path / "r.safetensors"))))
    assert revision.state == "failed" and "a request router for the members ['coder', 'math']" in revision.error


def test_replacing_one_member_reloads_only_that_model(server, members, tmp_path):
    def weights(revision) -> dict[str, int]:
        return {n: m.engine.composed.embed.data_ptr() for n, m in revision.backend.members.items()}

    first = weights(built(server.builder, parse_composition(route_spec(members))))
    other = make_checkpoint(tmp_path / "other", "qwen2", seed=9, layers=2, hidden_size=32, intermediate_size=64)
    spec = route_spec(members)
    spec["experts"][2]["source"] = str(other)
    second = built(server.builder, parse_composition(spec))
    assert second.state == "ready"
    now = weights(second)  # the unchanged members run on the very tensors the pool loaded for the first build
    assert (now["coder"], now["german"]) == (first["coder"], first["german"]) and now["math"] != first["math"]
    used = {e["source"]: e["used_by"] for e in server.builder.pool.sources()}
    assert used[str(members["coder"])] == [second.id] and str(members["math"]) not in used


def test_prompts_that_arrive_together_are_routed_in_one_batch():
    """The perplexity router's cost is a forward per member: the backend scores every prompt that
    arrived while the last routing ran in one call (here, all five in the first)."""
    router = KeywordRouter([["def"], ["die"], ["12"]])
    calls = []

    class Counted:
        def scores(self, texts: list[str]) -> torch.Tensor:
            calls.append(len(texts))
            return router.scores(texts)

    texts = [CODE, GERMAN, MATH, CODE, GERMAN]

    async def route_all() -> list[torch.Tensor]:
        batcher = BatchedRouter(Counted())
        return await asyncio.gather(*(batcher.scores(t) for t in texts))

    rows = asyncio.run(route_all())
    assert calls == [5]
    torch.testing.assert_close(torch.stack(rows), router.scores(texts))


def test_a_member_may_be_a_lora_adapter_over_its_own_base(server, members, adapters, zoo):
    spec = route_spec(members)
    spec["experts"].append({"name": "adapted", "source": str(adapters["math"]), "base": str(zoo["base"]), "keywords": ["apples"]})
    built(server.builder, parse_composition(spec))
    built(server.builder, parse_composition({"name": "alone", "base": str(zoo["base"]),
                                                "experts": [{"name": "adapted", "source": str(adapters["math"])}]}))
    member, text, _ = complete(server, "zoo", "Tom has 5 apples")
    assert member == "adapted" and text == server.client.completions.create(
        model="alone", prompt="Tom has 5 apples", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}).choices[0].text


def mixture_greedy(paths: list[Path], weights: torch.Tensor, prompt: str, steps: int) -> tuple[list[str], list[float]]:
    """The reference for top-k routing: greedy tokens of sum_i w_i p_i(token), each p_i from
    transformers' own forward over the whole sequence; each token's text and mixture log-prob."""
    tok = PreTrainedTokenizerFast.from_pretrained(paths[0])
    models = [AutoModelForCausalLM.from_pretrained(p) for p in paths]
    ids, tokens, logprobs = tok.encode(prompt), [], []
    for _ in range(steps):
        with torch.no_grad():
            probs = torch.stack([m(torch.tensor([ids])).logits[0, -1].softmax(-1) for m in models])  # [k, V]
        mixed = (weights.unsqueeze(1) * probs).sum(0)
        ids.append(int(mixed.argmax()))
        tokens.append(tok.decode(ids[-1:]))
        logprobs.append(float(mixed.max().log()))
    return tokens, logprobs


def test_top_k_routing_draws_each_token_from_the_members_mixture(server, members):
    """router.top_k=2: the request runs on its two best members, each in its own engine, and each
    greedy token is the argmax of their distributions mixed by softmax of the router's scores."""
    spec = parse_composition(route_spec(members, kind="keywords", top_k=2))
    built(server.builder, spec)
    prompt = "def total(a, b): return the sum of 12 and die"  # keywords: coder 2, math 2, german 1
    raw = server.client.completions.with_raw_response.create(
        model="zoo", prompt=prompt, max_tokens=6, temperature=0, logprobs=0,
        extra_body={"ignore_eos": True, "expert_bias": {"math": 0.5}})  # math ahead of coder
    assert raw.headers["x-mergeserve-member"] == "math+coder"
    served = raw.parse().choices[0].logprobs
    scores = KeywordRouter([e.keywords for e in spec.experts]).scores([prompt])[0] + torch.tensor([0.0, 0.0, 0.5])
    tokens, logprobs = mixture_greedy([members["math"], members["coder"]], torch.softmax(scores[[2, 0]], dim=0), prompt, 6)
    assert served.tokens == tokens
    torch.testing.assert_close(torch.tensor(served.token_logprobs), torch.tensor(logprobs), atol=1e-4, rtol=1e-4)


def test_top_k_never_mixes_a_member_of_another_tokenizer(server, members, tmp_path):
    odd = make_checkpoint(tmp_path / "odd", "llama", seed=4, layers=1, tokenizer_vocab=300)
    spec = route_spec(members, kind="keywords", top_k=2)
    spec["experts"].append({"name": "odd", "source": str(odd), "keywords": ["def"]})
    built(server.builder, parse_composition(spec))
    assert complete(server, "zoo", CODE, expert_bias={"odd": 10.0})[0] == "odd"  # the best, alone
    # coder 2, odd 1.5, math 0.2, german 0: odd is the runner-up, but math is mixed in instead
    assert complete(server, "zoo", CODE, expert_bias={"odd": 0.5, "math": 0.2})[0] == "coder+math"


def test_a_mixed_request_refuses_prompt_logprobs(server, members):
    built(server.builder, parse_composition(route_spec(members, kind="keywords", top_k=2)))
    with pytest.raises(openai.BadRequestError, match="mixed over several"):
        server.client.completions.create(model="zoo", prompt=CODE, max_tokens=2, echo=True, logprobs=1)


def test_a_mixed_request_counts_its_tokens_for_every_member_it_ran_on(server, members):
    built(server.builder, parse_composition(route_spec(members, kind="keywords", top_k=2)))
    assert complete(server, "zoo", CODE, expert_bias={"math": 1.0})[0] == "coder+math"
    text = server.http.get("/metrics").text
    for member in ("coder", "math"):
        assert f'mergeserve:generation_tokens_total{{model="zoo.{member}"}} 6.0' in text
        assert f'mergeserve:member_requests_total{{member="{member}",model="zoo"}} 1.0' in text


def wait_until_idle(engines: list, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(engine.has_work() for engine in engines):
        assert time.monotonic() < deadline, "a member still holds a sequence"
        time.sleep(0.05)


def test_a_client_that_leaves_a_mixed_request_frees_every_members_slot(server, members):
    revision = built(server.builder, parse_composition(route_spec(members, kind="keywords", top_k=3)))
    stream = server.client.completions.create(model="zoo", prompt=CODE, max_tokens=100, stream=True,
                                              extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    wait_until_idle(revision.backend.engines)


def test_a_mixed_request_finishes_while_one_of_its_members_is_replaced(server, members, tmp_path):
    old = built(server.builder, parse_composition(route_spec(members, kind="keywords", top_k=2))).backend.engines
    stream = server.client.completions.create(model="zoo", prompt=CODE, max_tokens=40, stream=True,
                                              extra_body={"ignore_eos": True, "expert_bias": {"math": 1.0}})
    chunks = iter(stream)
    tokens = [next(chunks)]
    spec = route_spec(members, kind="keywords", top_k=2)
    spec["experts"][2]["source"] = str(make_checkpoint(tmp_path / "math2", "qwen2", seed=5, layers=1, hidden_size=32,
                                                       intermediate_size=64))
    assert built(server.builder, parse_composition(spec)).state == "ready"
    tokens += list(chunks)
    assert tokens[-1].choices[0].finish_reason == "length"
    assert complete(server, "zoo", CODE, expert_bias={"math": 1.0})[0] == "coder+math"  # the new build serves
    wait_until_idle(old)  # the old build drained: no member holds a follower
