"""Schemathesis fuzzes the live server against its own OpenAPI schema: no 5xx, and every response
(status, content type, headers, body) is one the schema documents."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from live import live_server, local_registry
from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve.server import Registry, create_app
from mergeserve.spec import EngineConfig, parse_composition

schemathesis = pytest.importorskip("schemathesis")

MODEL = "tiny-moe"
# Fuzzed max_tokens and prompts are bounded by the server, not by the schema: the limit turns a
# large max_tokens into a 400, and a short context keeps every request to a few decode steps.
ENGINE = EngineConfig(max_num_seqs=8, max_model_len=128, max_tokens_limit=8)
# Per operation, in the fuzzing phase; the coverage phase adds its own boundary cases (~600 requests
# in all). Most schema-valid bodies are refused by checks the schema cannot express (see below), so
# few reach generation: 100 gives them a fair chance for a few seconds more than 25.
# (test_generation_answers_as_the_schema_says makes sure streams are checked.)
MAX_EXAMPLES = 100
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",  # schema-invalid input gets a 4xx
    "missing_required_header",
    "unsupported_method",  # e.g. TRACE /health: 405 with an Allow header
    # Left out:
    # - positive_data_acceptance: schema-valid is not servable. The schema cannot say that `model`
    #   must name a served composition, that top_logprobs needs logprobs, that prompt token ids lie
    #   in the vocabulary or that prompt + max_tokens fit the context; and parameters we declare
    #   for OpenAI compatibility but cannot honour (echo, suffix, tools, logit_bias, penalties) are
    #   refused with 400 on purpose (see protocol.py).
    # - use_after_free, ensure_resource_availability, object_level_authorization: stateful checks
    #   over resources that one operation creates and another reads; /v1 creates none (the admin
    #   API, fuzzed below, is stateless per case here too).
    # - ignored_auth: no API keys are configured, so every operation is open by design.
]
# Reproducible: derandomized, no example database; schemathesis sets Hypothesis' deadline to None.
CONFIG = {
    "seed": 0,
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    "phases": {"stateful": {"enabled": False}},
    "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
    "request-timeout": 30,
}


@pytest.fixture(scope="module")
def served(zoo: dict[str, Path]) -> Iterator[tuple[str, str]]:
    """(base URL, the id of one response it gave) of a live server with one small MoE, no API keys."""
    spec = parse_composition({
        "name": MODEL, "base": str(zoo["base"]), "router": {"kind": "random", "top_k": 1},
        "experts": [{"name": name, "source": str(zoo[name])} for name in ("code", "math")],
    })
    executor = Executor()
    registry = local_registry(executor, ENGINE, spec)
    with live_server(create_app(registry, executor)) as url:
        hello = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        response = httpx.post(f"{url}/v1/chat/completions", json=hello, timeout=30)
        response.raise_for_status()
        yield url, response.json()["id"]


def app_schema() -> dict:
    """The app's OpenAPI schema; it does not depend on what the app serves, so pytest can collect
    the operations before any server runs. (`schemathesis.pytest.from_fixture`, which would load
    /openapi.json from the live server, breaks on pytest 9.2 in schemathesis 4.32.5: it reads and
    sets `Function._nodeid`, which pytest removed. test_the_live_server_serves_this_schema checks
    that the live server serves the same schema.)"""
    return create_app(Registry(), Executor()).openapi()


# The admin API (and vLLM's adapter routes under /v1, which take the admin key) is fuzzed on a server of its own, below.
ADMIN_PATHS = "^/admin/|^/v1/(un)?load_lora_adapter$"
schema = schemathesis.openapi.from_dict(app_schema(), config=schemathesis.Config.from_dict(CONFIG))
schema = schema.exclude(path_regex=ADMIN_PATHS)


def test_the_live_server_serves_this_schema(served: tuple[str, str]) -> None:
    url, _ = served
    assert httpx.get(f"{url}/openapi.json", timeout=30).json() == schema.raw_schema


@schema.parametrize()
def test_the_server_answers_as_its_schema_says(case, served: tuple[str, str]) -> None:
    url, response_id = served
    body = case.body
    # Aim the generated strings that name something at things that exist, so requests get past
    # the lookup to generation (and feedback to its success path); the fuzzed rest stays as it is.
    if isinstance(body, dict):
        if isinstance(body.get("model"), str):
            body["model"] = MODEL
        if case.path == "/v1/feedback" and isinstance(body.get("id"), str) and 1 <= len(body["id"]) <= 256:
            body["id"] = response_id  # only a valid id: an invalid one is what a negative case tests
    case.call_and_validate(base_url=url)


HELLO = [{"role": "user", "content": "hi"}]
GENERATIONS = [
    pytest.param("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3, "logprobs": 2}, id="completion"),
    pytest.param("/v1/completions", {
        "model": MODEL, "prompt": ["hi", "ho"], "max_tokens": 3, "n": 2, "logprobs": 1, "stream": True,
        "stream_options": {"include_usage": True},
    }, id="completion-stream"),
    pytest.param("/v1/chat/completions", {
        "model": MODEL, "messages": HELLO, "max_tokens": 3, "logprobs": True, "top_logprobs": 2,
    }, id="chat"),
    pytest.param("/v1/chat/completions", {
        "model": MODEL, "messages": HELLO, "max_tokens": 3, "n": 2, "logprobs": True, "stream": True,
        "stream_options": {"include_usage": True}, "experts": ["math"],
    }, id="chat-stream"),
]


@pytest.mark.parametrize(("path", "body"), GENERATIONS)
def test_generation_answers_as_the_schema_says(served: tuple[str, str], path: str, body: dict) -> None:
    """Whole and streamed responses, whichever of them the fuzzer happens to reach, meet the same checks."""
    url, _ = served
    schema[path]["POST"].Case(body=body).call_and_validate(base_url=url)


# --- the admin API ---------------------------------------------------------------------------

ADMIN = {"Authorization": "Bearer fuzz-admin"}
admin_schema = schemathesis.openapi.from_dict(
    app_schema(), config=schemathesis.Config.from_dict(CONFIG | {"generation": CONFIG["generation"] | {"max-examples": 25}}),
).include(path_regex=ADMIN_PATHS)


@pytest.fixture(scope="module")
def admin_served(zoo: dict[str, Path]) -> Iterator[str]:
    """A live server with the admin API on, sources confined to the tiny zoo, one composition built."""
    from mergeserve.server.auth import Auth
    from mergeserve.server.builder import Builder

    registry, executor = Registry(), Executor()
    builder = Builder(registry, ExpertPool(roots=[zoo["base"].parent]), executor, ENGINE)
    with live_server(create_app(registry, executor, Auth(admin_key="fuzz-admin"), builder)) as url:
        spec = {"base": str(zoo["base"]), "experts": [{"name": "code", "source": str(zoo["code"])}]}
        httpx.put(f"{url}/admin/compositions/{MODEL}", json=spec, headers=ADMIN, timeout=30).raise_for_status()
        yield url


@admin_schema.parametrize()
def test_the_admin_api_answers_as_its_schema_says(case, admin_served: str) -> None:
    """Fuzzed specs, aliases and names with the admin key: no 5xx, every answer documented."""
    case.call_and_validate(base_url=admin_served, headers=ADMIN)
