"""ExpertPool: load once, share tensors, refuse what cannot be trusted or does not fit."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from mergeserve.engine.engine import Engine
from mergeserve.experts import CheckpointError, ExpertPool
from mergeserve.learn.compose import build
from mergeserve.spec import load_serve_config, parse_composition
from tiny import make_checkpoint


def moe_spec(zoo, name: str):
    return parse_composition({
        "name": name, "base": str(zoo["base"]), "router": {"kind": "random"},
        "experts": [{"name": n, "source": str(zoo[n])} for n in ("code", "german", "math")],
    })


def test_a_source_is_loaded_once_and_compositions_share_expert_weights(zoo):
    pool = ExpertPool()
    first, second = build(moe_spec(zoo, "one"), pool), build(moe_spec(zoo, "two"), pool)
    assert len(pool.sources()) == 4  # base + three experts, each once
    for n, (a, b) in enumerate(zip(first.layers, second.layers)):
        for ea, eb, name in zip(a.experts, b.experts, ("code", "german", "math")):
            owned = pool.get(str(zoo[name])).tensors
            assert ea.gate_proj.data_ptr() == eb.gate_proj.data_ptr()
            assert ea.down_proj.data_ptr() == owned[f"model.layers.{n}.mlp.down_proj.weight"].data_ptr()


def test_one_checkpoint_reached_by_two_paths_is_loaded_once(zoo, tmp_path):
    """A symlinked folder (a venv linked into a worktree) and its real path name one checkpoint."""
    link = tmp_path / "linked"
    link.symlink_to(zoo["base"], target_is_directory=True)
    pool = ExpertPool()
    assert pool.get(str(link)) is pool.get(str(zoo["base"])) is pool.get(str(link))


def lora_adapter(base_path, out, seed: int):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


def test_peft_adapter_expert_matches_peft_and_shares_untouched_tensors(zoo, tmp_path):
    adapter = lora_adapter(zoo["base"], tmp_path / "lora", seed=1)
    pool = ExpertPool()
    expert = pool.get(str(adapter), base=str(zoo["base"]))
    base = pool.get(str(zoo["base"]))
    assert expert.kind == "peft"
    key = "model.layers.0.self_attn.k_proj.weight"  # not adapted: the base's own tensor
    assert expert.tensors[key].data_ptr() == base.tensors[key].data_ptr()
    key = "model.layers.0.self_attn.q_proj.weight"  # adapted: new tensor, base untouched
    assert expert.tensors[key].data_ptr() != base.tensors[key].data_ptr()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["base"], dtype=torch.float32), adapter)
    torch.testing.assert_close(base.tensors[key], reference.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight)

    spec = parse_composition({"name": "lora", "base": str(zoo["base"]), "experts": [{"name": "x", "source": str(adapter)}]})
    engine = Engine(build(spec, pool))
    ids = engine.tokenizer("Hello, how are you?")["input_ids"]
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(engine.logits(ids), expected, atol=1e-4, rtol=0)


def test_adapters_merged_into_dense_weights_leave_the_shared_base_as_it_was(zoo, tmp_path):
    pool = ExpertPool(lora="merged")
    base = pool.get(str(zoo["base"]))
    before = {k: t.clone() for k, t in base.tensors.items()}
    first, second = (lora_adapter(zoo["base"], tmp_path / f"lora{i}", seed=i) for i in (1, 2))
    pool.get(str(first), base=str(zoo["base"]))
    merged = pool.get(str(second), base=str(zoo["base"]))
    for key, t in before.items():
        assert torch.equal(base.tensors[key], t), f"{key}: merging an adapter wrote into the base"
    # The second adapter merged onto the base itself, not onto the base plus the first.
    factored = ExpertPool().get(str(second), base=str(zoo["base"]))
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged.tensors[key], factored.tensors[key], atol=1e-6, rtol=0)


def test_refuses_pickle_checkpoints(zoo, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(zoo["base"], folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickled.*pytorch_model\.bin.*never unpickles"):
        ExpertPool().get(str(folder))


def test_refuses_mismatched_shapes(zoo, tmp_path):
    folder = tmp_path / "wrong"
    shutil.copytree(zoo["base"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"wrong: tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \(96, 64\)"):
        ExpertPool().get(str(folder))


def test_refuses_an_expert_of_another_architecture(zoo, tmp_path):
    qwen = make_checkpoint(tmp_path / "qwen", "qwen2", tokenizer_from=zoo["base"])
    spec = parse_composition({
        "name": "mixed", "base": str(zoo["base"]), "router": {"kind": "random"},
        "experts": [{"name": "a", "source": str(zoo["code"])}, {"name": "b", "source": str(qwen)}],
    })
    with pytest.raises(CheckpointError, match=r"qwen: architecture differs from the base .*model_type=qwen2 vs llama"):
        build(spec, ExpertPool())


def test_refuses_missing_and_non_safetensors_sources(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        ExpertPool().get(str(tmp_path / "nowhere"))
    (tmp_path / "model.pt").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="must be .gguf"):
        ExpertPool().get(str(tmp_path / "model.pt"))


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_another_composition_over_the_same_experts_costs_no_expert_memory(tmp_path):
    # Bigger than the tiny zoo so that FFN weights dominate what a composition could copy.
    base = make_checkpoint(tmp_path / "base", "llama", layers=8)
    spec = parse_composition({
        "name": "a", "base": str(base), "router": {"kind": "random"},
        "experts": [{"name": n, "source": str(base)} for n in ("x", "y", "z", "w")],
    })
    pool = ExpertPool()
    keep = [build(spec, pool)]
    before = rss_bytes()
    keep += [build(spec.model_copy(update={"name": f"c{i}"}), pool) for i in range(20)]
    ffn_bytes = sum(e.gate_proj.nbytes * 3 for layer in keep[0].layers for e in layer.experts)
    # Twenty copies of the experts would add 20 * ffn_bytes; the routers alone are tiny.
    assert rss_bytes() - before < 2 * ffn_bytes


def test_sources_must_lie_under_the_configured_roots(zoo, tmp_path):
    """No source outside the roots: not by path, not by `..`, not through a symlinked folder or file."""
    root = tmp_path / "models"
    inside = {name: shutil.copytree(path, root / name) for name, path in zoo.items()}
    pool = ExpertPool(roots=[root])
    build(moe_spec(inside, "inside"), pool)  # every checkpoint lies under the root

    outside = shutil.copytree(zoo["code"], tmp_path / "outside")
    with pytest.raises(CheckpointError, match="outside the allowed source roots"):
        pool.get(str(outside))
    with pytest.raises(CheckpointError, match="outside the allowed source roots"):
        pool.get(str(root / "code" / ".." / ".." / "outside"))

    linked_folder = root / "linked-folder"
    linked_folder.symlink_to(outside, target_is_directory=True)
    with pytest.raises(CheckpointError, match="linked-folder: resolves to"):
        pool.get(str(linked_folder))

    smuggled = shutil.copytree(inside["math"], root / "smuggled")
    weights = next(smuggled.glob("*.safetensors"))
    weights.unlink()
    weights.symlink_to(next(outside.glob("*.safetensors")))
    with pytest.raises(CheckpointError, match=f"{weights.name} \\(inside .*smuggled\\)"):
        pool.get(str(smuggled))


def test_a_serve_config_names_its_source_roots_relative_to_itself(tmp_path):
    (tmp_path / "moe.yaml").write_text("name: m\nbase: models/base\nexperts: [{name: a, source: models/a}]\n"
                                       "router: {kind: random}\n")
    (tmp_path / "serve.yaml").write_text("compositions: [moe.yaml]\nsource_roots: [models, 'pkg://pytest/']\n")
    config = load_serve_config(tmp_path / "serve.yaml")
    assert config.source_roots[0] == str(tmp_path / "models")
    assert config.source_roots[1] == str(Path(pytest.__file__).parent)


def test_a_checkpoint_truncated_on_disk_is_refused_by_name(zoo, tmp_path):
    """Between two builds the file is cut short: the pool that loaded it refuses to hand out what
    no longer matches the disk, and a fresh load names the broken file. Nothing half-loaded is used."""
    source = tmp_path / "expert"
    shutil.copytree(zoo["code"], source)
    spec = parse_composition({"name": "x", "base": str(zoo["base"]), "experts": [{"name": "code", "source": str(source)}]})
    pool = ExpertPool()
    build(spec, pool)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"expert: changed on disk since it was loaded \(model\.safetensors\)"):
        build(spec, pool)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        build(spec, ExpertPool())


def test_a_symlink_swapped_while_loading_is_refused(zoo, tmp_path, monkeypatch):
    """Checked, then swapped to point outside the roots before the loader opens it (injected
    at the moment of loading): what was loaded is not what was checked, so it is refused."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    shutil.copytree(zoo["code"], outside)
    shutil.copytree(zoo["code"], allowed / "real")
    link = allowed / "expert"
    link.symlink_to(allowed / "real")
    pool = ExpertPool(roots=[allowed, zoo["base"].parent])
    load = ExpertPool._load

    def swap_then_load(self, path, base, dtype):
        if path == (allowed / "real").resolve():
            shutil.rmtree(allowed / "real")
            (allowed / "real").symlink_to(outside)  # the checked folder now leads outside the roots
        return load(self, path, base, dtype)

    monkeypatch.setattr(ExpertPool, "_load", swap_then_load)
    with pytest.raises(CheckpointError, match="outside the allowed source roots|changed on disk while it was loading"):
        pool.get(str(link))
    assert not pool.sources()
