"""`method: hetero`, MergeME's heterogeneous merge: whole models of different families and widths
read one averaged embedding and write through one head, each through projectors fitted in closed form."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from live import Gateway, built, live_gateway
from tiny import make_checkpoint, perturbed_copy

from mergeserve.cli import main
from mergeserve.engine.executor import Executor
from mergeserve.engine.layers import Batch
from mergeserve.engine.model import Transformer
from mergeserve.experts import ExpertPool
from mergeserve.learn.compose import build, build_members
from mergeserve.merge.hetero import input_projector, output_projector, share
from mergeserve.server import Registry
from mergeserve.server.auth import Auth
from mergeserve.server.builder import Builder
from mergeserve.spec import EngineConfig, parse_composition
from mergeserve.zoo.splits import write_jsonl

CODE, GERMAN, MATH = "def add(a, b):\n    return a + b\n", "Die Katze schläft im Haus.", "What is 12 + 7? 12 + 7 = 19."
PROMPTS = {"coder": [CODE, "import os\nprint(os.getcwd())\n"], "german": [GERMAN, "Der Hund läuft schnell."],
           "math": [MATH, "Tom has 5 apples and buys 3 more."]}


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> dict[str, Path]:
    """Three whole models of different families, widths and depths, over one vocabulary."""
    root = tmp_path_factory.mktemp("members")
    return {
        "coder": make_checkpoint(root / "coder", "llama", seed=1, layers=2, tie=True),
        "german": make_checkpoint(root / "german", "mistral", seed=2, layers=3, hidden_size=96, intermediate_size=128, tie=True),
        "math": make_checkpoint(root / "math", "qwen2", seed=3, layers=1, hidden_size=32, intermediate_size=64, tie=True),
    }


def hetero_spec(members: dict[str, Path], name: str = "hetero", **router) -> dict:
    return {"name": name, "method": "hetero", "router": router or {"kind": "centroid"},
            "experts": [{"name": n, "source": str(p), "prompts": PROMPTS.get(n, [CODE, GERMAN])} for n, p in members.items()]}


def member_logits(composed, text: str) -> torch.Tensor:
    """[T, V]: the model's next-token logits over `text`, as the engine computes them."""
    model = Transformer(composed, max_len=64)
    ids = composed.tokenizer(text, add_special_tokens=False)["input_ids"]
    return model.logits(model(Batch.right_padded([ids]))[0])


def test_the_shared_embedding_is_the_padded_average_and_the_projectors_are_least_squares(members):
    pool = ExpertPool()
    alone = build_members(parse_composition(hetero_spec(members) | {"method": "route"}), pool)
    shared = build_members(parse_composition(hetero_spec(members)), pool)
    width = 96  # the widest member's
    mean = torch.stack([torch.nn.functional.pad(m.embed, (0, width - m.embed.shape[1])) for m in alone]).mean(0)
    for own, m in zip(alone, shared):
        assert m.embed is shared[0].embed and m.lm_head is m.embed and torch.allclose(m.embed, mean)
        assert m.embed_proj.shape == (width, own.embed.shape[1]) and m.head_proj.shape == (own.embed.shape[1], width)
        # Least squares: the residual is orthogonal to what the projector can reach (normal equations).
        e = m.embed.double()
        assert (e.T @ (e @ m.embed_proj.double() - own.embed.double())).abs().max() < 1e-6
        # The head's fit is the best any states can get: own logits projected onto the shared head's span.
        residual = e @ m.head_proj.double().T - own.lm_head.double()  # [V, D]
        assert (e.T @ residual).abs().max() < 1e-6


def test_members_that_share_one_embedding_serve_exactly_what_they_serve_alone(tmp_path):
    """Fine-tunes of one base (their embeddings the base's): the average is that embedding,
    both projectors are the identity, and each member's logits are its own."""
    base = make_checkpoint(tmp_path / "base", "llama", seed=0, layers=2)
    tuned = {"a": base, "b": perturbed_copy(base, tmp_path / "b", seed=1, only="mlp")}
    spec = hetero_spec(tuned, name="one-base")
    pool = ExpertPool()
    alone = build_members(parse_composition(spec | {"method": "route"}), pool)
    shared = build_members(parse_composition(spec), pool)
    for own, m in zip(alone, shared):
        assert torch.allclose(m.embed_proj, torch.eye(64), atol=1e-5) and torch.allclose(m.head_proj, torch.eye(64), atol=1e-4)
        assert torch.allclose(member_logits(m, MATH), member_logits(own, MATH), atol=1e-4)


def test_the_projectors_solve_their_least_squares_problems_in_closed_form():
    torch.manual_seed(0)
    shared, own = torch.randn(50, 8), torch.randn(50, 5)
    p = input_projector(shared, own)
    assert torch.allclose(p, torch.linalg.pinv(shared) @ own, atol=1e-5)
    states, head = torch.randn(3, 5), torch.randn(50, 5)  # fewer states than dimensions
    q = output_projector(head, shared)
    # For any states, no Q brings the logits through the shared head closer to the member's own:
    # the fitted residual is below a least-squares fit on these very states.
    fitted = (states @ q @ shared.T - states @ head.T).norm()
    on_states = torch.linalg.lstsq(states, states @ head.T @ torch.linalg.pinv(shared.T)).solution
    assert fitted <= (states @ on_states @ shared.T - states @ head.T).norm() + 1e-4


def test_members_of_other_vocabularies_are_refused_by_name(members, tmp_path):
    other = make_checkpoint(tmp_path / "other", "llama", seed=4, tokenizer_vocab=300)
    spec = hetero_spec({"coder": members["coder"], "german": other})
    with pytest.raises(ValueError, match="members 'hetero.coder' and 'hetero.german' have different vocabularies"):
        build_members(parse_composition(spec), ExpertPool())


@pytest.fixture()
def server(members) -> Iterator[Gateway]:
    registry, executor = Registry(), Executor()
    builder = Builder(registry, ExpertPool(), executor, EngineConfig(max_num_seqs=4, max_model_len=128))
    admin = {"Authorization": "Bearer admin-key"}
    with live_gateway(registry, executor, Auth(admin_key="admin-key"), builder, headers=admin, timeout=60) as gateway:
        yield gateway


def test_a_hetero_composition_serves_through_the_openai_client_with_a_learned_router(server, members, tmp_path):
    """train-router labels texts by the member scoring them best and fits a logistic model on their
    mean shared embedding (MergeME's router); the served composition routes by it."""
    write_jsonl(tmp_path / "calib.jsonl", [{"text": t} for ps in PROMPTS.values() for t in ps])
    spec = hetero_spec(members, kind="learned", weights=str(tmp_path / "router.safetensors"))
    (tmp_path / "hetero.yaml").write_text(yaml.safe_dump(spec))
    assert main(["train-router", "--spec", str(tmp_path / "hetero.yaml"), "--data", str(tmp_path / "calib.jsonl"),
                 "--out", str(tmp_path / "router.safetensors"), "--threads", "1"]) == 0
    built(server.builder, parse_composition(spec))
    raw = server.client.chat.completions.with_raw_response.create(
        model="hetero", messages=[{"role": "user", "content": GERMAN}], max_tokens=4, temperature=0)
    assert raw.headers["x-mergeserve-member"] in members and raw.parse().usage.completion_tokens == 4
    shown = server.http.get("/admin/compositions/hetero").json()
    assert shown["backend"]["kind"] == "hetero"


def test_a_fitted_output_projector_beats_zero_padding_the_narrow_member(members):
    """The naive way into a wider head, padding the member's states with zeros, loses its own
    logits; the fitted projector keeps them to a smaller residual, on texts it never saw."""
    pool = ExpertPool()
    spec = parse_composition(hetero_spec(members))
    own = [build(spec.member(e), pool) for e in spec.experts]
    shared, fits = share(own)
    narrow, fitted = own[2], shared[2]  # math: 32 wide under a 96-wide head
    model = Transformer(fitted, max_len=64)
    ids = fitted.tokenizer("Ein ganz anderer Text, 3 + 4 = 7.", add_special_tokens=False)["input_ids"]
    h = model(Batch.right_padded([ids]))[0]  # [T, 32]
    exact = h @ narrow.lm_head.T
    padding = torch.nn.functional.pad(h, (0, 96 - 32)) @ fitted.lm_head.T
    assert (model.logits(h) - exact).norm() < (padding - exact).norm()  # least squares: never worse, here by a tenth
    assert all(0 <= f.head < 1 and 0 <= f.embedding < 1 for f in fits)
