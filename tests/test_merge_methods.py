"""Task-vector merge methods: parity with peft's merge_utils, hand-computed TIES forms,
DARE's randomness, SLERP's geometry, per-tensor overrides and the shared-storage fast path."""

from __future__ import annotations

import math

import pytest
import torch
from peft.utils import merge_utils as peft

from mergeserve.merge.methods import METHODS, dare_linear, dare_ties, merge_tensor, params_for, slerp, ties
from mergeserve.spec import MERGE_MODELS, merge_params


def checkpoint(n_experts: int = 3, shape: tuple[int, ...] = (16, 24), seed: int = 0):
    """A base tensor and `n_experts` fine-tunes of it (deltas an order below the weights)."""
    g = torch.Generator().manual_seed(seed)
    base = 0.1 * torch.randn(shape, generator=g)
    experts = [base + 0.05 * torch.randn(shape, generator=g) for _ in range(n_experts)]
    return base, experts


def task_vectors(base: torch.Tensor, experts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [e - base for e in experts]


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def test_registry_has_every_method_a_spec_can_name():
    """METHODS and the spec's merge models list the same names (fisher merges by its own builder)."""
    assert set(METHODS) == set(MERGE_MODELS) - {"fisher"}


def test_linear_is_the_weighted_mean_of_the_experts():
    """linear: weights normalised, base unused."""
    base, (a, b) = checkpoint(2)
    merged = merge_tensor("w", base, [a, b], [1.0, 3.0], merge_params("linear"))
    assert_close(merged, 0.25 * a + 0.75 * b)


def test_task_arithmetic_matches_peft():
    """base + lambda * sum w_i tau_i; with lambda 1, minus base, it is peft's task_arithmetic."""
    base, experts = checkpoint()
    weights = [0.5, 1.0, 2.0]
    merged = merge_tensor("w", base, experts, weights, merge_params("task_arithmetic"))
    assert_close(merged - base, peft.task_arithmetic(task_vectors(base, experts), torch.tensor(weights)))

    scaled = merge_tensor("w", base, experts, weights, merge_params("task_arithmetic", lambda_=0.3))
    assert_close(scaled - base, 0.3 * (merged - base))


def test_magnitude_trim_matches_peft():
    """ties.trim keeps the same top-|tau| entries as peft's magnitude pruning (and magnitude_prune)."""
    base, experts = checkpoint()
    taus = task_vectors(base, experts)
    for tau in taus:
        trimmed = ties.trim(tau, 0.3)
        assert torch.equal(trimmed, peft.prune(tau, 0.3, method="magnitude"))
        assert (trimmed != 0).sum() == int(0.3 * tau.numel())
    weights = [0.5, 1.0, 2.0]
    summed = sum(w * ties.trim(tau, 0.3) for w, tau in zip(weights, taus))
    assert_close(summed, peft.magnitude_prune(taus, torch.tensor(weights), 0.3))


@pytest.mark.parametrize("consensus, peft_sign", [("sum", "total"), ("count", "frequency")])
def test_ties_matches_peft(consensus, peft_sign):
    """With all weights 1 and normalize, the TIES merge is peft's ties (which divides by count)."""
    base, experts = checkpoint()
    params = merge_params("ties", density=0.4, normalize=True, consensus=consensus)
    merged = merge_tensor("w", base, experts, [1.0] * 3, params)
    expected = peft.ties(task_vectors(base, experts), torch.ones(3), 0.4, majority_sign_method=peft_sign)
    assert_close(merged - base, expected)


# Three task vectors of four entries and their weights, for hand computation (density 1: no trim).
#   weighted:  [ 1, -1, -0.5, -0.1]   [ 2, 2, -2, -0.2]   [-3, 2, 0.5, 3]
#   entry 0 sums to 0: the tie goes to +.  entry 3: the mass says +, the count says -.
HAND_TAUS = [[1.0, -1.0, -0.5, -0.1], [1.0, 1.0, -1.0, -0.1], [-3.0, 2.0, 0.5, 3.0]]
HAND_WEIGHTS = [1.0, 2.0, 1.0]


@pytest.mark.parametrize("consensus, normalize, expected", [
    ("sum", False, [3.0, 4.0, -2.5, 3.0]),                # TIES/MergeME: sum of the agreeing
    ("sum", True, [3 / 3, 4 / 3, -2.5 / 3, 3.0 / 1]),     # mergekit: over the agreeing weights
    ("count", False, [3.0, 4.0, -2.5, -0.3]),
    ("count", True, [3 / 3, 4 / 3, -2.5 / 3, -0.3 / 3]),
])
def test_ties_summed_and_normalised_forms_by_hand(consensus, normalize, expected):
    """The disjoint merge of weighted task vectors, then base + lambda * merged."""
    base = torch.ones(4)
    experts = [base + torch.tensor(tau) for tau in HAND_TAUS]
    params = merge_params("ties", lambda_=0.5, consensus=consensus, normalize=normalize)
    merged = merge_tensor("w", base, experts, HAND_WEIGHTS, params)
    assert_close(merged, base + 0.5 * torch.tensor(expected))


@pytest.mark.parametrize("method, peft_merge, weights", [
    ("dare_linear", peft.dare_linear, [0.5, 1.0, 2.0]),
    ("dare_ties", peft.dare_ties, [1.0, 1.0, 1.0]),
])
def test_dare_matches_peft_with_the_same_random_stream(method, peft_merge, weights):
    """Seeding peft's global RNG and our generator alike draws the same masks, in expert order."""
    base, experts = checkpoint()
    params = merge_params(method, density=0.5, **({"normalize": True} if method == "dare_ties" else {}))  # sign election only
    torch.manual_seed(1234)
    expected = peft_merge(task_vectors(base, experts), torch.tensor(weights), 0.5)
    merged = METHODS[method](base, experts, weights, params, torch.Generator().manual_seed(1234))
    assert_close(merged - base, expected)


@pytest.mark.parametrize("rescale, mean", [(True, 1.0), (False, 0.3)])
def test_dare_keeps_density_at_random_and_rescale_preserves_the_mean(rescale, mean):
    """Over 200k entries about 30% survive; rescaled by 1/density their mean stays the delta's."""
    base = torch.zeros(200_000)
    params = merge_params("dare_linear", density=0.3, rescale=rescale)
    merged = merge_tensor("w", base, [base + 1.0], [1.0], params)
    assert (merged != 0).float().mean().item() == pytest.approx(0.3, abs=0.005)
    assert merged.mean().item() == pytest.approx(mean, rel=0.02)


def test_dare_is_deterministic_per_tensor_name_whatever_the_order():
    """Masks depend on (seed, tensor name): same across calls and orders, different across names and seeds."""
    base, experts = checkpoint()
    params = merge_params("dare_ties", density=0.5, seed=7)

    def merge(name: str, p=params) -> torch.Tensor:
        return merge_tensor(name, base, experts, [1.0] * 3, p)

    q_first, k_after = merge("q_proj"), merge("k_proj")
    k_first, q_after = merge("k_proj"), merge("q_proj")
    assert torch.equal(q_first, q_after) and torch.equal(k_first, k_after)
    assert not torch.equal(q_first, k_first)
    assert not torch.equal(q_first, merge("q_proj", params.model_copy(update={"seed": 8})))


def test_dare_ties_with_full_density_is_ties():
    """density 1 drops nothing: dare_ties is then ties without trimming."""
    base, experts = checkpoint()
    params = merge_params("dare_ties", density=1.0, normalize=True)
    expected = ties.merge(base, experts, [1.0, 2.0, 0.5], params, torch.Generator())
    assert_close(dare_ties.merge(base, experts, [1.0, 2.0, 0.5], params, torch.Generator()), expected)
    assert_close(dare_linear.merge(base, experts, [1.0] * 3, params, torch.Generator()),
                 merge_tensor("w", base, experts, [1.0] * 3, merge_params("task_arithmetic")))


def test_slerp_ends_are_the_experts():
    """t=0 gives experts[0], t=1 experts[1]; the base is unused."""
    base, (a, b) = checkpoint(2)
    for t, expected in [(0.0, a), (1.0, b)]:
        assert_close(merge_tensor("w", base, [a, b], [1.0, 1.0], merge_params("slerp", t=t)), expected)


def test_slerp_halfway_between_orthogonal_unit_vectors_stays_on_the_sphere():
    """t=0.5 of e0 and e1: norm 1, 45 degrees from each (a linear mean would have norm 0.71)."""
    e0, e1 = torch.eye(2)
    mid = merge_tensor("w", torch.zeros(2), [e0, e1], [1.0, 1.0], merge_params("slerp", t=0.5))
    assert mid.norm().item() == pytest.approx(1.0)
    assert slerp.cosine(mid, e0) == pytest.approx(math.cos(math.pi / 4))
    assert slerp.cosine(mid, e1) == pytest.approx(math.cos(math.pi / 4))


def test_slerp_of_colinear_tensors_falls_back_to_lerp():
    """Parallel directions (sin theta ~ 0) interpolate linearly instead of dividing by zero."""
    a = torch.randn(8, generator=torch.Generator().manual_seed(0))
    mid = merge_tensor("w", torch.zeros(8), [a, 2 * a], [1.0, 1.0], merge_params("slerp", t=0.25))
    assert_close(mid, 1.25 * a)


def test_override_applies_to_matching_tensor_names_only():
    """`{match: self_attn, density: 0.3}` trims attention to 30%; a norm keeps the default 80%."""
    params = merge_params(**{
        "method": "ties", "density": 0.8,
        "overrides": [{"match": "self_attn", "density": 0.3}, {"match": "q_proj", "lambda": 2.0}],
    })
    q, norm = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"
    assert params_for(q, params).density == 0.3 and params_for(q, params).lambda_ == 1.0  # first match wins
    assert params_for(norm, params) is params

    base, (expert,) = checkpoint(1, shape=(10, 10))
    def changed(name: str) -> int:
        return (merge_tensor(name, base, [expert], [1.0], params) != base).sum().item()

    assert (changed(q), changed(norm)) == (30, 80)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_tensors_every_expert_shares_with_the_base_are_returned_uncopied(method):
    """LoRA experts share embeddings with the base: the merge is the base tensor object itself."""
    base = torch.randn(4, 4)
    merged = merge_tensor("model.embed_tokens.weight", base, [base, base], [1.0, 2.0], merge_params(method))
    assert merged is base


def test_consensus_keeps_what_at_least_two_tall_masks_keep():
    """Consensus / TALL masks by hand, on three one-entry-per-case task vectors."""
    base = torch.zeros(4)
    taus = torch.tensor([
        [1.0, 1.0, 0.0, 0.01],  # entry 0: all agree; entry 1: two of three; entry 2: only task 3 (selfish)
        [1.0, 1.0, 0.0, 0.0],
        [1.0, 0.0, 5.0, 0.0],  # entry 3: a tiny value no task needs much: masked out (catastrophic for consensus)
    ])
    merged = merge_tensor("w", base, list(taus), [1.0] * 3, merge_params("consensus", tall_lambda=0.6, consensus_k=2))
    # tau_MTL = [3, 2, 5, 0.01]; |tau_i| >= 0.6 |tau_MTL - tau_i| per task:
    # entry 0: 1 >= 1.2? no for all -> 0 masks; entry 1: tasks 1, 2: 1 >= 0.6 yes, task 3: 0 >= 1.2 no -> 2 masks
    # entry 2: task 3 only (5 >= 0) plus tasks 1, 2 (0 >= 3 no) -> 1 mask; entry 3: task 1 (0.01 >= 0), tasks 2, 3 (0 >= 0.006 no) -> 1
    assert_close(merged, torch.tensor([0.0, 2.0, 0.0, 0.0]))
    # Wider masks (a smaller lambda_t) let the all-agree entry through too.
    wide = merge_tensor("w", base, list(taus), [1.0] * 3, merge_params("consensus", tall_lambda=0.4, consensus_k=2))
    assert_close(wide, torch.tensor([3.0, 2.0, 0.0, 0.0]))
