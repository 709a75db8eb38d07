"""Training-free routers (`hidden`, `centroid`, `arrow`): each expert's own domain goes to that expert."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeserve.engine.model import Batch, Capture, Transformer
from mergeserve.experts import ExpertPool
from mergeserve.export import export_mixtral
from mergeserve.kernels import router_logits, top_k_experts
from mergeserve.learn.compose import build
from mergeserve.spec import parse_composition

DOMAINS = {
    "code": ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"],
    "german": ["Der Hund läuft schnell über die Straße.", "Die Katze schläft im Haus."],
    "math": ["What is 12 + 7? 12 + 7 = 19.", "Tom has 5 apples and buys 3 more, so he has 8."],
}


def domain_composition(zoo, kind: str, scale: float = 4.0):
    return build(parse_composition({
        "name": kind, "base": str(zoo["base"]), "router": {"kind": kind, "top_k": 1, "scale": scale},
        "experts": [{"name": n, "source": str(zoo[n]), "prompts": p} for n, p in DOMAINS.items()],
    }), ExpertPool())


@pytest.mark.parametrize("kind", ["hidden", "centroid"])
def test_router_sends_each_domain_to_its_expert(zoo, kind):
    composed = domain_composition(zoo, kind)
    model = Transformer(composed, max_len=128)
    for expert, prompts in enumerate(DOMAINS.values()):
        for prompt in prompts:
            ids = composed.tokenizer(prompt)["input_ids"]
            model.expert_load.zero_()
            model(Batch(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), None))
            load = model.expert_load  # [layers, experts], top-1 routing
            # The majority of the prompt's tokens pick its own expert, in every layer.
            assert (load.argmax(dim=1) == expert).all(), (prompt, load)


def test_random_router_is_seeded(zoo):
    def rows(seed):
        spec = parse_composition({
            "name": "r", "base": str(zoo["base"]), "router": {"kind": "random", "seed": seed},
            "experts": [{"name": n, "source": str(zoo[n])} for n in DOMAINS],
        })
        return build(spec, ExpertPool()).layers[0].router
    assert torch.equal(rows(1), rows(1)) and not torch.equal(rows(1), rows(2))


def test_centroid_logits_are_scale_times_cosine(zoo):
    composed = domain_composition(zoo, "centroid", scale=10.0)
    model = Transformer(composed, max_len=128)
    captured = Capture(ffn=[])
    ids = [composed.tokenizer(p)["input_ids"] for prompts in DOMAINS.values() for p in prompts]
    model(Batch.right_padded(ids), capture=captured)
    for layer, x in zip(composed.layers, captured.ffn):  # x [tokens, D]: what the router sees
        norms = layer.router.norm(dim=-1)  # [E]
        assert torch.allclose(norms, norms[0])  # one scale for all experts: no expert is favoured
        # Row norm is scale / (typical router-input norm), so |logit| <= scale for a typical token.
        assert abs(float(x.norm(dim=-1).mean() * norms[0]) - 10.0) < 1.0


def rank_one_expert(base: Path, dst: Path, directions: list[torch.Tensor], up_only: bool = False) -> Path:
    """`base` with gate/up deltas u v^T in every layer, v = directions[layer]: a merged rank-1 LoRA."""
    shutil.copytree(base, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    g = torch.Generator().manual_seed(len(directions) + up_only)
    for n, v in enumerate(directions):
        for proj in ["up"] if up_only else ["gate", "up"]:
            key = f"model.layers.{n}.mlp.{proj}_proj.weight"
            u = 0.05 * torch.randn(tensors[key].shape[0], 1, generator=g)
            tensors[key] = tensors[key] + u * v  # [I, D] + [I, 1] * [D]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def arrow_zoo(zoo, tmp_path_factory) -> tuple[dict[str, Path], torch.Tensor]:
    """Two rank-1 experts of the tiny base and the base itself; directions [2, L, D], unit."""
    root = tmp_path_factory.mktemp("arrow")
    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(2, 2, 64, generator=g), dim=-1)  # [experts, layers, D]
    experts = {
        "gate_up": rank_one_expert(zoo["base"], root / "gate_up", list(directions[0])),
        "up": rank_one_expert(zoo["base"], root / "up", list(directions[1]), up_only=True),
        "base": zoo["base"],
    }
    return experts, directions


def arrow_composition(zoo, experts: dict[str, Path], scale: float = 4.0):
    return build(parse_composition({
        "name": "arrow", "base": str(zoo["base"]), "router": {"kind": "arrow", "top_k": 1, "scale": scale},
        "experts": [{"name": n, "source": str(p)} for n, p in experts.items()],
    }), ExpertPool())


def test_arrow_prototypes_are_the_deltas_directions(zoo, arrow_zoo):
    experts, directions = arrow_zoo
    composed = arrow_composition(zoo, experts, scale=4.0)
    assert composed.router_subspace == 1
    for n, layer in enumerate(composed.layers):
        rows = layer.router / 4.0  # [E, D]: prototypes, unit up to sign
        for i in range(2):
            assert torch.allclose(rows[i].abs(), directions[i, n].abs(), atol=1e-5)  # ±v_i
            assert abs(float(rows[i] @ directions[i, n])) == pytest.approx(1.0, abs=1e-5)
        assert not rows[2].any()  # the base as an expert: no delta, no prototype


def test_arrow_routes_a_token_along_its_experts_direction(zoo, arrow_zoo):
    experts, directions = arrow_zoo
    composed = arrow_composition(zoo, experts)
    for n, layer in enumerate(composed.layers):
        # Router inputs of norm 8 (~sqrt(D)) along each direction, either sign: |x · v| ignores it.
        x = 8.0 * torch.stack([directions[0, n], -directions[0, n], directions[1, n], -directions[1, n]])
        _, ids = top_k_experts(x, layer.router, top_k=1, subspace=composed.router_subspace)
        assert ids[:, 0].tolist() == [0, 0, 1, 1]


def test_engine_routes_by_absolute_logits(zoo, arrow_zoo):
    experts, _ = arrow_zoo
    composed = arrow_composition(zoo, experts)
    model = Transformer(composed, max_len=128)
    captured = Capture(ffn=[])
    model(Batch.right_padded([composed.tokenizer(p)["input_ids"] for p in DOMAINS["code"]]), capture=captured)
    for n, (layer, x) in enumerate(zip(composed.layers, captured.ffn)):
        scores = (x @ layer.router.T).abs()  # [tokens, E]
        assert torch.equal(model.expert_load[n], torch.bincount(scores.argmax(-1), minlength=3))


def test_arrow_composition_does_not_export_to_mixtral(zoo, arrow_zoo, tmp_path):
    composed = arrow_composition(zoo, arrow_zoo[0])
    with pytest.raises(ValueError, match="Mixtral's gate is linear"):
        export_mixtral(composed, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()


def test_smile_logits_are_the_norm_of_the_projection_on_each_deltas_top_singular_vectors(zoo, adapters):
    """SMILE by hand: an SVD of each expert's dense [Δgate; Δup] gives the same logits as the
    rows built from the LoRA factors."""
    pool = ExpertPool()
    composed = build(parse_composition({
        "name": "smile", "base": str(zoo["base"]), "router": {"kind": "smile", "subspace": 2, "scale": 1.0},
        "experts": [{"name": n, "source": str(p)} for n, p in adapters.items()],
    }), pool)
    assert composed.router_subspace == 2 and composed.layers[0].router.shape == (3 * 2, composed.config.hidden_size)
    base = pool.get(str(zoo["base"]))
    x = torch.randn(5, composed.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for n, layer in enumerate(composed.layers):
        logits = router_logits(x, layer.router, composed.router_subspace)  # [5, E]
        for e, path in enumerate(adapters.values()):
            expert = pool.get_expert(str(path), str(zoo["base"]))
            key = f"model.layers.{n}.mlp.{{}}_proj.weight"
            delta = torch.cat([expert.tensors[key.format(p)] - base.tensors[key.format(p)] for p in ("gate", "up")]).double()
            v = torch.linalg.svd(delta).Vh[:2]  # [2, D]
            torch.testing.assert_close(logits[:, e], (x.double() @ v.T).norm(dim=-1).float(), atol=1e-4, rtol=1e-4)
