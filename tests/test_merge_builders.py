"""Dense merges and the MergeME MoE built from specs, checked tensor by tensor against peft's merge utilities."""

from __future__ import annotations

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, prune, ties
from transformers import AutoModelForCausalLM

from mergeserve.engine.engine import Engine
from mergeserve.engine.sequence import SamplingParams
from mergeserve.experts import ExpertPool
from mergeserve.export import export_dense
from mergeserve.learn.compose import build
from mergeserve.spec import parse_composition

Q = "model.layers.1.self_attn.q_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"
NAMES = ("code", "german", "math")


def spec(zoo, **fields):
    experts = [{"name": n, "source": str(zoo[n]), "prompts": [f"{n} text"]} for n in NAMES]
    return parse_composition({"name": "m", "base": str(zoo["base"]), "experts": experts, **fields})


def task_vectors(pool: ExpertPool, zoo, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The base's tensor and the experts' task vectors for it, stacked [E, ...]."""
    base = pool.get(str(zoo["base"])).tensors[key]
    return base, torch.stack([pool.get(str(zoo[n])).tensors[key] - base for n in NAMES])


def test_a_dense_ties_spec_is_one_model_merged_like_peft_ties(zoo):
    pool = ExpertPool()
    composed = build(spec(zoo, method="ties", merge={"density": 0.5, "normalize": True, "lambda": 0.7}), pool)
    assert composed.num_experts == 1 and all(layer.router is None for layer in composed.layers)
    for key, got in ((Q, composed.layers[1].attn.q_proj), (UP, composed.layers[1].experts[0].up_proj)):
        base, taus = task_vectors(pool, zoo, key)
        expected = base + 0.7 * ties(taus, torch.ones(3), density=0.5, majority_sign_method="total")
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_a_dense_merge_serves_through_the_engine(zoo, tmp_path):
    """The engine's greedy tokens are transformers' on the merged weights, exported."""
    composed = build(spec(zoo, method="dare_ties", merge={"density": 0.7, "seed": 3}), ExpertPool())
    ids = composed.tokenizer("hello").input_ids
    out = Engine(composed).generate([ids], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    exported = export_dense(composed, tmp_path / "dare_ties")
    reference = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reference(torch.tensor([ids + out])).logits[0]
    assert out == logits[len(ids) - 1:-1].argmax(-1).tolist()


def test_mergeme_keeps_the_pools_ffns_and_ties_merges_the_shared_layers(zoo):
    pool = ExpertPool()
    composed = build(spec(zoo, method="mergeme"), pool)  # paper defaults: TIES, lambda 1/3, keep 0.8
    for e, name in enumerate(NAMES):
        assert composed.layers[1].experts[e].up_proj.data_ptr() == pool.get(str(zoo[name])).tensors[UP].data_ptr()
    base, taus = task_vectors(pool, zoo, Q)
    trimmed = torch.stack([prune(t, 0.8, "magnitude") for t in taus])
    agree = calculate_majority_sign_mask(trimmed, "total")
    summed = (trimmed * agree).sum(0)  # the TIES/MergeME form: no division by the agreeing count
    torch.testing.assert_close(composed.layers[1].attn.q_proj, base + summed / 3, atol=1e-6, rtol=0)
    assert all(layer.router is not None for layer in composed.layers)


def test_mergeme_with_dare_and_overrides_is_reproducible(zoo):
    fields = {"method": "mergeme", "merge": {"method": "dare_ties", "density": 0.6, "seed": 1,
                                             "overrides": [{"match": "self_attn", "density": 0.3}]}}
    first, second = build(spec(zoo, **fields), ExpertPool()), build(spec(zoo, **fields), ExpertPool())
    torch.testing.assert_close(first.layers[1].attn.q_proj, second.layers[1].attn.q_proj, atol=0, rtol=0)
    base, taus = task_vectors(ExpertPool(), zoo, Q)
    changed = (first.layers[1].attn.q_proj != base).float().mean().item()
    assert 0.5 < changed < 0.8  # each expert keeps ~30% of its entries: 1 - 0.7^3 of them move


def test_the_base_can_join_mergeme_as_a_generalist_expert(zoo):
    experts = [{"name": n, "source": str(zoo[n]), "prompts": [f"{n} text"]} for n in (*NAMES, "base")]
    composed = build(parse_composition({"name": "g", "base": str(zoo["base"]), "method": "mergeme", "experts": experts}), ExpertPool())
    assert composed.expert_names == [*NAMES, "base"] and composed.num_experts == 4
    # The base's task vector is zero: the shared layers are those of the three domain experts alone.
    without = build(spec(zoo, method="mergeme"), ExpertPool())
    torch.testing.assert_close(composed.layers[0].attn.k_proj, without.layers[0].attn.k_proj, atol=1e-6, rtol=0)
