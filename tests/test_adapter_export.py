"""Compositions that are one LoRA over their base, written as a PEFT adapter over the base exported
alone (what vLLM loads at run time): transformers with peft, given those two folders, answers as
mergeserve's own engine does; anything else is refused, naming why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from mergeserve.engine.engine import Engine
from mergeserve.engine.sequence import SamplingParams
from mergeserve.experts import ExpertPool
from mergeserve.export.adapter import NotOneAdapter, adapter_factors, export_adapter, export_base
from mergeserve.learn.compose import build
from mergeserve.server.builder import may_be_one_adapter
from mergeserve.spec import EngineConfig, parse_composition
from mergeserve.weights import MergedLowRank

PROMPT = "What is 12 + 7?"


def spec(name: str, base: Path, adapters: dict[str, Path], **fields):
    experts = [{"name": n, "source": str(p), **({"weight": w} if (w := fields.pop(f"weight_{n}", None)) else {})}
               for n, p in adapters.items()]
    return parse_composition({"name": name, "base": str(base), "experts": experts, **fields})


def one_lora_specs(zoo, adapters) -> list:
    """A single adapter; a linear merge (weights normalised); a task-arithmetic sum of three adapters
    of different ranks, rsLoRA and rank patterns among them (lambda times each weight)."""
    base = zoo["base"]
    return [
        spec("single", base, {"math": adapters["math"]}),
        spec("linear", base, {"math": adapters["math"], "german": adapters["german"]}, method="linear", weight_math=3.0),
        spec("task-sum", base, adapters, method="task_arithmetic", merge={"method": "task_arithmetic", "lambda": 0.7},
             weight_code=0.5),
    ]


def greedy_with_logprobs(engine: Engine, prompt: list[int], n: int = 12) -> tuple[list[int], list[float]]:
    engine.add_request("r", prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0))
    tokens, lps = [], []
    while engine.has_work():
        for o in engine.step():
            tokens += o.new_token_ids
            lps += [lp.logprob for lp in o.logprobs]
    return tokens, lps


@pytest.mark.parametrize("which", [0, 1, 2], ids=["single", "linear", "task_arithmetic"])
def test_peft_over_the_exported_base_answers_as_the_composition(zoo, adapters, tmp_path, which):
    s = one_lora_specs(zoo, adapters)[which]
    assert may_be_one_adapter(s)
    composed = build(s, ExpertPool())
    export_base(composed, tmp_path / "base")
    export_adapter(composed, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"]  # scales folded into B

    engine = Engine(composed, EngineConfig(max_num_seqs=2, max_model_len=128))
    prompt = engine.tokenizer(PROMPT)["input_ids"]
    tokens, lps = greedy_with_logprobs(engine, prompt)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32),
                                      tmp_path / "adapter").eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    assert tokens == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(torch.tensor(lps), expected, atol=1e-4, rtol=0)


def test_a_merge_of_adapters_is_their_factors_side_by_side(zoo, adapters):
    composed = build(one_lora_specs(zoo, adapters)[2], ExpertPool())
    q = composed.layers[0].attn.q_proj
    assert isinstance(q, MergedLowRank)  # task arithmetic over adapters stays low-rank: no dense copy
    factors = adapter_factors(composed)
    # math r=4, code r=8 (down_proj 2), german r=6: the largest rank sum, every module padded to it
    a, b = factors["base_model.model.model.layers.0.self_attn.q_proj"]
    assert a.shape[0] == b.shape[1] == 18
    torch.testing.assert_close(q.base + b @ a, q.dense().float(), atol=1e-6, rtol=0)


def test_what_is_not_one_lora_is_refused_naming_why(zoo, adapters, tmp_path):
    base = zoo["base"]
    cases = {
        "route tokens over experts": spec("moe", base, adapters, router={"kind": "random", "top_k": 2}),
        "attention is routed": spec("routed", base, adapters, router={"kind": "random", "top_k": 2, "attention": "routed"}),
        "holds no adapter factors": spec("dense", base, {"code": zoo["code"]}),  # a full fine-tune
        "holds no adapter factors: a dense": spec("ties", base, adapters, method="ties"),  # merged densely
    }
    for why, s in cases.items():
        with pytest.raises(NotOneAdapter, match=why):
            export_adapter(build(s, ExpertPool()), tmp_path / s.name)
    assert not may_be_one_adapter(cases["route tokens over experts"]) and not may_be_one_adapter(cases["holds no adapter factors: a dense"])
    with pytest.raises(ValueError, match="rank 18 .* more than max_lora_rank=16"):
        export_adapter(build(one_lora_specs(zoo, adapters)[2], ExpertPool()), tmp_path / "big", max_rank=16)


def test_vllm_refuses_a_merge_past_max_lora_rank_before_starting_anything(zoo, adapters, tmp_path):
    from mergeserve.server.backends.vllm_adapters import AdapterEngines
    from mergeserve.spec import VLLMLoRA, VLLMProfile

    s = one_lora_specs(zoo, adapters)[2]  # rank 4 + 8 + 6
    engines = AdapterEngines(tmp_path, VLLMLoRA(max_lora_rank=16))
    with pytest.raises(ValueError, match=r"rank 18 .* more than max_lora_rank=16 \(the serve config's vllm_lora\)"):
        engines.serve(s, build(s, ExpertPool()), VLLMProfile(), "task-sum@1")
    assert not any((tmp_path / "adapters").glob("*"))  # refused before anything was written or started
