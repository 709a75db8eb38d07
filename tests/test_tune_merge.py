"""`mergeserve tune-merge`: merge coefficients learned from unlabeled text, and specs that use them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from tiny import CORPUS

from mergeserve.calibration import token_rows
from mergeserve.cli import main
from mergeserve.experts import CheckpointError, ExpertPool
from mergeserve.learn.compose import build
from mergeserve.learn.tune import TuneConfig, layer_importance, merging_spec, tau_norms, train_coefficients, train_important
from mergeserve.merge import coefficients, fisher
from mergeserve.spec import SpecError, load_composition, parse_composition
from mergeserve.zoo.splits import write_jsonl

FAST = TuneConfig(steps=40, batch_size=2, seq_len=32, lr=0.05, reg=0.0)


def spec_dict(base: Path, experts: dict[str, Path], **merge) -> dict:
    return {"name": "merged", "base": str(base), "method": "task_arithmetic", "merge": merge,
            "experts": [{"name": n, "source": str(p)} for n, p in experts.items()]}


@pytest.mark.parametrize("shape", [(2,), (2, 2)], ids=["per-layer", "per-module"])
def test_two_copies_of_one_expert_learn_coefficients_that_sum_to_one(zoo, adapters, shape):
    """The known best mix: with tau_a = tau_b, the merge is base + (c_a + c_b) tau, and matching
    either expert on its text needs c_a + c_b = 1 in every layer (and module). Training starts at 0.3 + 0.3."""
    spec = parse_composition(spec_dict(zoo["base"], {"a": adapters["math"], "b": adapters["math"]}, **{"lambda": 0.3}))
    composed = build(merging_spec(spec), ExpertPool())
    tokens = token_rows(CORPUS, composed.tokenizer, FAST.steps * FAST.batch_size, FAST.seq_len, seed=0)
    init = torch.full((len(composed.layers), *shape), 0.3)
    result = train_coefficients(composed, [tokens, tokens], init, FAST, progress=False)
    torch.testing.assert_close(result.coefficients.sum(-1), torch.ones(len(composed.layers), *shape[:-1]), atol=0.05, rtol=0)
    assert result.loss[-1] < result.loss[0] / 10


def test_layer_importance_weighs_each_coefficient_by_its_task_vector():
    c = torch.tensor([[1.0, 0.0], [0.5, -0.5], [0.0, 2.0]])  # [L, E]
    norms = torch.tensor([[[1.0, 9.0], [1.0, 9.0]], [[2.0, 2.0], [0.0, 0.0]], [[5.0, 1.0], [5.0, 1.0]]])  # [L, 2, E]
    # sum over experts and modules of |c| |tau|: 1 + 1 = 2; 0.5 * 2 + 0.5 * 2 = 2; 2 * 1 + 2 * 1 = 4 (zero c: no weight)
    torch.testing.assert_close(layer_importance(c, norms), torch.tensor([2.0, 2.0, 4.0]) / 8)


def test_task_vector_norms_per_layer_and_module_match_the_dense_deltas(zoo, adapters):
    spec = parse_composition(spec_dict(zoo["base"], {"math": adapters["math"], "code": adapters["code"]}))
    pool = ExpertPool()
    norms = tau_norms(spec, pool, num_layers=2)  # [L, 2, E]
    base = pool.get(str(zoo["base"]))
    expert = pool.get_expert(str(adapters["code"]), str(zoo["base"]))
    keys = [k for k in base.tensors if k.startswith("model.layers.1.mlp.")]
    by_hand = sum((expert.tensors[k] - base.tensors[k]).double().pow(2).sum() for k in keys).sqrt()
    torch.testing.assert_close(norms[1, 1, 1].double(), by_hand / sum(base.tensors[k].numel() for k in keys), rtol=1e-4, atol=0)


def test_important_granularity_splits_only_the_most_important_layers(zoo, adapters):
    """Expert Merging++: the layer with the largest |c| |tau| gets attention and FFN coefficients of its own;
    the other keeps one for both. The known best mix (two copies of one expert) still sums to one."""
    spec = parse_composition(spec_dict(zoo["base"], {"a": adapters["math"], "b": adapters["math"]}, **{"lambda": 0.3}))
    composed = build(merging_spec(spec), ExpertPool())
    tokens = token_rows(CORPUS, composed.tokenizer, FAST.steps * FAST.batch_size, FAST.seq_len, seed=0)
    norms = tau_norms(spec, ExpertPool(), len(composed.layers))
    init = torch.full((len(composed.layers), 2), 0.3)
    result = train_important(composed, [tokens, tokens], init, norms, FAST, progress=False)
    assert result.coefficients.shape == (2, 2, 2) and len(result.fine_layers) == 1  # fine_fraction 0.25 of 2 layers: one
    coarse = 1 - result.fine_layers[0]
    torch.testing.assert_close(result.coefficients[coarse, 0], result.coefficients[coarse, 1])
    torch.testing.assert_close(result.coefficients.sum(-1), torch.ones(2, 2), atol=0.05, rtol=0)


def test_a_spec_with_coefficients_merges_each_layer_with_its_row(zoo, adapters, tmp_path):
    experts = {"math": adapters["math"], "code": adapters["code"]}
    table = torch.tensor([[0.2, 0.9], [0.7, -0.1]])  # [L, E]
    coefficients.save(tmp_path / "c.safetensors", table, ["code", "math"][::-1], {})  # any column order: names decide
    spec = spec_dict(zoo["base"], experts, coefficients=str(tmp_path / "c.safetensors"), **{"lambda": 0.5})
    merged = build(parse_composition(spec), ExpertPool())  # the coefficients are lambda * weight: lambda is not applied again
    pool = ExpertPool()
    base = pool.get(str(zoo["base"]))
    for n in range(2):
        key = f"model.layers.{n}.self_attn.q_proj.weight"
        taus = [pool.get_expert(str(p), str(zoo["base"])).tensors[key] - base.tensors[key] for p in experts.values()]
        expected = base.tensors[key] + table[n, 0] * taus[0] + table[n, 1] * taus[1]
        torch.testing.assert_close(merged.layers[n].attn.q_proj, expected, atol=1e-5, rtol=0)


def test_module_coefficients_merge_attention_and_ffn_with_their_own_rows(zoo, adapters, tmp_path):
    experts = {"math": adapters["math"], "code": adapters["code"]}
    table = torch.tensor([[[0.2, 0.9], [0.5, 0.5]], [[0.7, -0.1], [1.0, 0.0]]])  # [L, 2, E]
    coefficients.save(tmp_path / "c.safetensors", table, list(experts), {})
    merged = build(parse_composition(spec_dict(zoo["base"], experts, coefficients=str(tmp_path / "c.safetensors"))), ExpertPool())
    pool = ExpertPool()
    base = pool.get(str(zoo["base"]))
    for key, module, got in (("model.layers.1.self_attn.q_proj.weight", 0, merged.layers[1].attn.q_proj),
                             ("model.layers.1.mlp.up_proj.weight", 1, merged.layers[1].experts[0].up_proj)):
        taus = [pool.get_expert(str(p), str(zoo["base"])).tensors[key] - base.tensors[key] for p in experts.values()]
        expected = base.tensors[key] + table[1, module, 0] * taus[0] + table[1, module, 1] * taus[1]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_coefficients_file_for_other_experts_or_methods_is_refused(zoo, adapters, tmp_path):
    coefficients.save(tmp_path / "c.safetensors", torch.ones(2, 2), ["math", "german"], {})
    spec = spec_dict(zoo["base"], {"math": adapters["math"], "code": adapters["code"]}, coefficients=str(tmp_path / "c.safetensors"))
    with pytest.raises(CheckpointError, match=r"c\.safetensors: coefficients for the experts \['math', 'german'\]"):
        build(parse_composition(spec), ExpertPool())
    with pytest.raises(SpecError, match="merge.method=linear does not take them"):
        parse_composition(spec | {"method": "linear"})


def test_cli_tunes_a_merge_from_each_experts_text(zoo, adapters, tmp_path, capsys):
    spec = tmp_path / "merge.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(zoo["base"], {"math": adapters["math"], "code": adapters["code"]})))
    write_jsonl(tmp_path / "data" / "math" / "train.jsonl", [{"text": t} for t in CORPUS[4:6]])
    write_jsonl(tmp_path / "data" / "code" / "train.jsonl", [{"text": t} for t in CORPUS[:2]])
    out = tmp_path / "coefficients.safetensors"
    argv = ["tune-merge", "--spec", str(spec), "--data", str(tmp_path / "data"), "--out", str(out),
            "--steps", "2", "--batch-size", "1", "--seq-len", "16", "--threads", "1", "--granularity", "important"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "attention and FFN apart in the most important layers: [" in printed
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["expert_names"]) == ["math", "code"] and f.get_tensor("coefficients").shape == (2, 2, 2)
    tuned = tmp_path / "tuned.yaml"
    tuned.write_text(yaml.safe_dump(spec_dict(zoo["base"], {"math": adapters["math"], "code": adapters["code"]}, coefficients=out.name)))
    assert build(load_composition(tuned), ExpertPool()).num_experts == 1


def test_cli_refuses_an_expert_without_text(zoo, adapters, tmp_path, capsys):
    spec = tmp_path / "merge.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(zoo["base"], {"math": adapters["math"], "code": adapters["code"]})))
    write_jsonl(tmp_path / "data" / "math" / "train.jsonl", [{"text": CORPUS[4]}])
    assert main(["tune-merge", "--spec", str(spec), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "c.st")]) == 2
    assert "no calibration text for the experts ['code']" in capsys.readouterr().err


# --- Fisher merging --------------------------------------------------------------------------


def test_fisher_merge_by_hand():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, 5.0])
    fa, fb = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 2.0, 0.0])
    merged = fisher.merge(torch.zeros(3), [a, b], [1.0, 3.0], [fa, fb])
    # entry 0: (1*1*1 + 3*1*3) / (1 + 3) = 2.5; entry 1: only b's Fisher counts: 0; entry 2: no Fisher: the weighted mean 4.5
    torch.testing.assert_close(merged, torch.tensor([2.5, 0.0, 4.5]))


def test_cli_caches_fishers_and_a_fisher_spec_merges_with_them(zoo, adapters, tmp_path):
    experts = {"math": adapters["math"], "code": adapters["code"]}
    spec = tmp_path / "merge.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(zoo["base"], experts)))
    write_jsonl(tmp_path / "data" / "math" / "train.jsonl", [{"text": t} for t in CORPUS[4:6]])
    write_jsonl(tmp_path / "data" / "code" / "train.jsonl", [{"text": t} for t in CORPUS[:2]])
    argv = ["fisher", "--spec", str(spec), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "fisher"),
            "--samples", "2", "--seq-len", "16", "--threads", "1"]
    assert main(argv) == 0
    fishers = {n: load_file(str(tmp_path / "fisher" / f"{n}.safetensors")) for n in experts}
    key = "model.layers.1.mlp.up_proj.weight"
    assert fishers["math"][key].shape == (96, 64) and fishers["math"][key].gt(0).any()

    d = spec_dict(zoo["base"], experts) | {"method": "fisher", "merge": {"fisher": str(tmp_path / "fisher")}}
    merged = build(parse_composition(d), ExpertPool())
    pool = ExpertPool()
    thetas = [pool.get_expert(str(p), str(zoo["base"])).tensors[key] for p in experts.values()]
    expected = fisher.merge(thetas[0], thetas, [1.0, 1.0], [fishers[n][key] for n in experts])
    torch.testing.assert_close(merged.layers[1].experts[0].up_proj, expected)
    swapped = spec_dict(zoo["base"], {"math": adapters["german"], "code": adapters["code"]}) | {"method": "fisher", "merge": d["merge"]}
    with pytest.raises(CheckpointError, match=r"math\.safetensors: computed for .*math, the spec's 'math' is .*german"):
        build(parse_composition(swapped), ExpertPool())
