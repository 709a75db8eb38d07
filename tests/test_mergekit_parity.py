"""The merge methods against mergekit's own implementations, on the same random tensors.

mergekit 0.1.5 is a test extra; these tests skip where it is not installed. Where the two
differ by design (DARE's rescale, SLERP's angle), the test pins the difference down.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mergeserve.merge.methods import METHODS
from mergeserve.spec import merge_params

gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
from mergekit.merge_methods.slerp import slerp as mergekit_slerp  # noqa: E402
from mergekit.sparsify import SparsificationMethod  # noqa: E402

g = torch.Generator().manual_seed(0)
BASE = 0.1 * torch.randn(16, 24, generator=g)
EXPERTS = [BASE + 0.05 * torch.randn(16, 24, generator=g) for _ in range(3)]
WEIGHTS = [0.5, 1.0, 2.0]


def mergekit(consensus: str | None, sparsify: SparsificationMethod | None, density: float, normalize: bool,
             lam: float, rescale: bool = False) -> torch.Tensor:
    """mergekit's generalized task arithmetic (the code behind its ties/dare/task_arithmetic methods)."""
    method = gta.GeneralizedTaskArithmeticMerge(
        gta.ConsensusMethod(consensus) if consensus else None, sparsify, normalize, rescale, "x", None, None)
    group = SimpleNamespace(base=SimpleNamespace(tensor=BASE),
                            non_base=[SimpleNamespace(tensor=e, id=i) for i, e in enumerate(EXPERTS)])
    params = {"density": dict.fromkeys(range(3), density), "weight": dict(enumerate(WEIGHTS)),
              "normalize": normalize, "lambda": lam, "int8_mask": False, "rescale": rescale}
    return method.merge_group(group, **params)


def ours(method: str, seed: int = 0, **fields) -> torch.Tensor:
    params = merge_params(method, **fields)
    return METHODS[method](BASE, EXPERTS, WEIGHTS, params, torch.Generator().manual_seed(seed))


def test_task_arithmetic_matches_mergekit():
    torch.testing.assert_close(ours("task_arithmetic", lambda_=0.7), mergekit(None, None, 1.0, False, 0.7), atol=1e-6, rtol=0)


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [False, True])
def test_ties_matches_mergekit_with_weights_in_both_forms(consensus, normalize):
    expected = mergekit(consensus, SparsificationMethod.magnitude, 0.4, normalize, 0.5)
    got = ours("ties", density=0.4, consensus=consensus, normalize=normalize, lambda_=0.5)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,consensus", [("dare_linear", None), ("dare_ties", "sum")])
def test_dare_without_rescale_draws_mergekits_masks(method, consensus):
    torch.manual_seed(5)  # mergekit draws from the global generator; ours from one seeded alike
    expected = mergekit(consensus, SparsificationMethod.random, 0.5, consensus is not None, 1.0)
    signs = {"normalize": True} if consensus is not None else {}  # dare_ties: mergekit's form
    got = ours(method, seed=5, density=0.5, rescale=False, **signs)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_dare_rescale_is_one_over_density_where_mergekit_keeps_the_l1_norm():
    """Same masks; ours scales kept entries by 1/p (the DARE paper, peft), mergekit 0.1.5 restores each task vector's L1 norm."""
    torch.manual_seed(5)
    theirs = mergekit(None, SparsificationMethod.random, 0.5, False, 1.0, rescale=True)
    mine = ours("dare_linear", seed=5, density=0.5, rescale=True)
    plain = ours("dare_linear", seed=5, density=0.5, rescale=False)
    torch.testing.assert_close(mine - BASE, 2 * (plain - BASE), atol=1e-6, rtol=0)
    assert not torch.allclose(mine, theirs, atol=1e-3)


def test_slerp_over_the_whole_tensor_matches_mergekits_slerp_of_one_row():
    """Ours takes one angle for the flattened tensor; mergekit 0.1.5 takes one per row (noted in slerp.py)."""
    v0, v1 = EXPERTS[0], EXPERTS[1]
    expected = mergekit_slerp(torch.tensor(0.3), v0.reshape(1, -1), v1.reshape(1, -1)).reshape(v0.shape)
    got = METHODS["slerp"](BASE, [v0, v1], WEIGHTS, merge_params("slerp", t=0.3), None)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
