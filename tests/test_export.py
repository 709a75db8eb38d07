"""Export a composition as a Hugging Face checkpoint and load it back with transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, MixtralForCausalLM

from mergeserve.experts import ExpertPool
from mergeserve.export import export_composition, export_mixtral
from mergeserve.learn.compose import build
from mergeserve.spec import parse_composition
from tiny import make_checkpoint, perturbed_copy

IDS = [1, 17, 42, 99, 7, 250, 3, 64, 128, 5]


def compose(base: Path, experts: dict[str, Path], top_k: int = 2):
    spec = parse_composition({
        "name": "exported",
        "base": str(base),
        "experts": [{"name": name, "source": str(src)} for name, src in experts.items()],
        "router": {"kind": "random", "top_k": top_k},
    })
    return build(spec, ExpertPool())


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]  # [T, V]


def test_experts_that_copy_the_base_export_to_the_base(zoo, tmp_path):
    composed = compose(zoo["base"], {"a": zoo["base"], "b": zoo["base"], "c": zoo["base"]})
    out = export_mixtral(composed, tmp_path / "moe")

    exported = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(zoo["base"], dtype=torch.float32)
    assert exported.config.num_local_experts == 3 and exported.config.num_experts_per_tok == 2
    assert (logits(exported, IDS) - logits(base, IDS)).abs().max() < 1e-4
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_export_matches_the_engine(zoo, tmp_path):
    from mergeserve.engine.engine import Engine
    from mergeserve.engine.sequence import SamplingParams

    composed = compose(zoo["base"], {"code": zoo["code"], "german": zoo["german"], "math": zoo["math"]})
    engine = Engine(composed)
    exported = MixtralForCausalLM.from_pretrained(export_mixtral(composed, tmp_path / "moe"), dtype=torch.float32)

    assert (logits(exported, IDS) - engine.logits(IDS)).abs().max() < 1e-4

    ours = engine.generate([IDS], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    # No eos on the model's own generation config: all 32 tokens, eos not masked, as ignore_eos does.
    # (An eos_token_id=None argument would be overridden by the model's default.)
    exported.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = exported.generate(torch.tensor([IDS]), do_sample=False, max_new_tokens=32, pad_token_id=0)
    theirs = out[0, len(IDS):].tolist()
    assert ours == theirs


def test_one_expert_composition_exports_as_its_base_architecture(zoo, tmp_path):
    composed = compose(zoo["base"], {"only": zoo["base"]}, top_k=1)
    with pytest.raises(ValueError, match="dense"):
        export_mixtral(composed, tmp_path / "moe")

    out = export_composition(composed, tmp_path / "dense")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(zoo["base"], dtype=torch.float32)
    assert type(exported) is LlamaForCausalLM
    assert (logits(exported, IDS) - logits(base, IDS)).abs().max() < 1e-4


def test_qwen2_composition_is_refused(tmp_path):
    base = make_checkpoint(tmp_path / "qwen", "qwen2", seed=0)
    expert = perturbed_copy(base, tmp_path / "qwen-code", seed=1)
    composed = compose(base, {"base": base, "code": expert})
    with pytest.raises(ValueError, match="attention biases"):
        export_mixtral(composed, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()
