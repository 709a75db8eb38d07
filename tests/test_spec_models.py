"""Spec models: one per merge method and router kind, defaults in sight, a published JSON Schema,
and old field names that point at their new place."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from mergeserve.cli import main
from mergeserve.spec import (MergeOverride, SpecError, composition_schema, load_composition, load_serve_config,
                             parse_composition, serve_schema, upgrade_saved)
from mergeserve.spec.merge import DareTiesMerge, MergemeTies, TiesMerge
from mergeserve.spec.router import HiddenRouterSpec, KeywordsRouterSpec, PerplexityRouterSpec

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "examples" / "spec.schema.json"
SERVE_SCHEMA_FILE = REPO / "examples" / "serve.schema.json"
SPECS = sorted(p for p in (REPO / "examples").rglob("specs/**/*.yaml") if p.name != "experts.yaml")
CONFIGS = [REPO / "examples" / "demo.yaml", REPO / "examples" / "vllm.yaml"]  # deploy/ configs name paths in the image
TWO = [{"name": "a", "source": "/a", "prompts": ["x"]}, {"name": "b", "source": "/b", "prompts": ["y"]}]


def moe(**fields: object) -> dict:
    return {"name": "m", "base": "/base", "experts": TWO} | fields


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_example_spec_loads_and_fits_the_published_schema(path: Path):
    load_composition(path)
    jsonschema.validate(yaml.safe_load(path.read_text()), json.loads(SCHEMA_FILE.read_text()))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_example_serve_config_loads_and_fits_the_published_schema(path: Path):
    assert load_serve_config(path).compositions or load_serve_config(path).state_dir
    jsonschema.validate(yaml.safe_load(path.read_text()), json.loads(SERVE_SCHEMA_FILE.read_text()))


def test_the_published_schema_is_what_spec_schema_prints(capsys: pytest.CaptureFixture[str]):
    assert main(["spec-schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(SCHEMA_FILE.read_text()) == composition_schema(), \
        "regenerate it: python -m mergeserve.spec.reference"


def test_the_published_serve_schema_is_what_spec_schema_serve_prints(capsys: pytest.CaptureFixture[str]):
    assert main(["spec-schema", "--serve"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(SERVE_SCHEMA_FILE.read_text()) == serve_schema(), \
        "regenerate it: python -m mergeserve.spec.reference"


def test_a_field_comment_is_its_description_in_the_schema():
    engine = serve_schema()["$defs"]["EngineConfig"]["properties"]
    assert engine["max_prefill_tokens"]["description"] == \
        "Prompt tokens prefilled per step; bounds how long one step can stall decodes."
    assert "description" not in engine["compile"]  # a field without a comment has none


def test_the_schema_catches_a_misspelt_field_before_the_server_does():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(moe(routr={"kind": "hidden"}), composition_schema())


def test_each_method_has_its_own_defaults_in_its_own_model():
    assert parse_composition(moe(method="ties")).merge == TiesMerge(lambda_=1.0, density=1.0)
    mergeme = parse_composition(moe(method="mergeme")).merge
    assert type(mergeme) is MergemeTies and (mergeme.lambda_, mergeme.density) == (1 / 3, 0.8)
    dare = parse_composition(moe(method="mergeme", merge={"method": "dare_ties", "seed": 3})).merge
    assert isinstance(dare, DareTiesMerge) and (dare.lambda_, dare.density, dare.seed) == (1 / 3, 0.8, 3)
    assert parse_composition(moe(method="btx")).merge is None


def test_each_router_family_has_its_own_model_and_defaults():
    assert parse_composition(moe()).router == HiddenRouterSpec(top_k=2, scale=4.0)
    mixture = parse_composition(moe(router={"kind": "perplexity"})).router
    assert isinstance(mixture, PerplexityRouterSpec) and (mixture.attention, mixture.inverse_temperature) == ("separate", 1.0)
    route = parse_composition({"name": "r", "method": "route", "router": {"kind": "keywords"},
                               "experts": [e | {"keywords": ["k"]} for e in TWO]}).router
    assert route == KeywordsRouterSpec(top_k=1)  # one whole model per request, by its own default


@pytest.mark.parametrize("change, message", [
    ({"backend": "openai", "url": "http://h/v1"}, "url: moved to upstream.url"),
    ({"timeout_s": 5}, "timeout_s: moved to upstream.timeout_s (backend openai) or vllm.timeout_s"),
    ({"router": {"kind": "task_vector", "scale": 2}}, "router.scale: moved to router.inverse_temperature"),
    ({"method": "dare_linear", "merge": {"normalize": True}}, "merge.normalize: merge.method=dare_linear does not take them (use ties, dare_ties)"),
    ({"method": "slerp", "merge": {"overrides": [{"match": "q", "density": 0.5}]}}, "['density'] are not parameters of merge.method=slerp"),
    ({"method": "ties", "merge": {"method": "linear"}}, "merge.method=linear contradicts method=ties"),
    ({"router": {"kind": "keywords"}}, "router.kind=keywords routes whole requests between whole models: it needs method=route"),
])
def test_a_field_in_the_wrong_place_is_told_where_it_belongs(change: dict, message: str):
    with pytest.raises(SpecError, match="spec") as err:
        parse_composition(moe(**change))
    assert message in str(err.value)


def test_a_spec_saved_by_the_previous_version_restores_in_todays_form():
    saved = {"name": "up", "backend": "openai", "url": "http://h:1/v1", "upstream_model": "m", "api_key_env": "K", "timeout_s": 9}
    upstream = parse_composition(upgrade_saved(saved)).upstream
    assert (upstream.url, upstream.model, upstream.api_key_env, upstream.timeout_s) == ("http://h:1/v1", "m", "K", 9)
    old_mixture = moe(router={"kind": "perplexity", "scale": 100.0, "attention": "dynamic"})
    assert parse_composition(upgrade_saved(old_mixture)).router.inverse_temperature == 100.0
    assert parse_composition(upgrade_saved(moe(backend="vllm", timeout_s=7))).vllm.timeout_s == 7


def test_an_override_sets_only_what_its_method_takes():
    spec = parse_composition(moe(method="ties", merge={"overrides": [{"match": "self_attn", "density": 0.3}]}))
    assert spec.merge.overrides == [MergeOverride(match="self_attn", density=0.3)]
