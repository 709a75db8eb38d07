"""`mergeserve train-router`: only the router rows learn, the loss falls, and the file they go to loads back."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mergeserve.calibration import file_rows, read_texts, token_rows
from mergeserve.cli import main, parser
from mergeserve.engine.model import Batch, Capture, Transformer
from mergeserve.experts import CheckpointError, ExpertPool
from mergeserve.learn.compose import build
from mergeserve.learn.token_router import RouterTrainConfig, RouterTrainer, train_rows, training_rows
from mergeserve.router.learned import load_rows, save_rows
from mergeserve.spec import load_composition, parse_composition
from mergeserve.zoo.splits import write_jsonl
from tiny import CORPUS, make_checkpoint, perturbed_copy

FAST = RouterTrainConfig(steps=8, batch_size=2, seq_len=32, lr=5e-2, warmup_steps=0)


def spec_dict(base: Path, experts: dict[str, Path], **router) -> dict:
    return {"name": "moe", "base": str(base), "router": {"kind": "random", "top_k": 2, **router},
            "experts": [{"name": n, "source": str(p)} for n, p in experts.items()]}


def compose(base: Path, experts: dict[str, Path], **router):
    return build(parse_composition(spec_dict(base, experts, **router)), ExpertPool())


def train(composed, cfg: RouterTrainConfig = FAST):
    return train_rows(RouterTrainer(composed, cfg.alpha), corpus_tokens(composed, cfg), cfg, progress=False)


def corpus_tokens(composed, cfg: RouterTrainConfig) -> torch.Tensor:
    return token_rows(CORPUS, composed.tokenizer, cfg.steps * cfg.batch_size, cfg.seq_len, cfg.seed)


@pytest.fixture(scope="module")
def moe(zoo):
    return compose(zoo["base"], {n: zoo[n] for n in ("code", "german", "math")})


@pytest.fixture(scope="module")
def good_and_bad(tmp_path_factory) -> dict[str, Path]:
    """A base taught CORPUS, one expert that is that base and two whose FFNs are wrecked by noise."""
    root = tmp_path_factory.mktemp("taught")
    base = make_checkpoint(root / "base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    x = token_rows(CORPUS, AutoTokenizer.from_pretrained(base), 8, 32, seed=0)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):  # to about 0.01 nats per token
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(base)
    bad = {f"bad{i}": perturbed_copy(base, root / f"bad{i}", seed=i, scale=0.3, only="mlp") for i in (1, 2)}
    return {"base": base, "good": base} | bad


def test_the_trained_rows_served_give_the_training_loss(moe, tmp_path):
    """Training runs the served forward: the engine with the trained rows scores a batch at the
    next-token loss the trainer reports for it."""
    trainer = RouterTrainer(moe, alpha=0.01)
    result = train_rows(trainer, corpus_tokens(moe, FAST), FAST, progress=False)
    batch = corpus_tokens(moe, FAST)[:2]
    with torch.no_grad():
        _, lm, _ = trainer.losses(batch)
    served = Transformer(replace_rows(moe, result.rows), max_len=128)
    logits = served.logits(served(Batch(batch, torch.arange(batch.shape[1]).expand_as(batch), None)))[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    assert abs(float(lm) - float(expected)) < 1e-5


def replace_rows(composed, rows):
    from dataclasses import replace as copy_with

    return copy_with(composed, layers=[copy_with(layer, router=r) for layer, r in zip(composed.layers, rows)])


def test_only_the_router_rows_change(moe):
    before = [t.clone() for t in moe.tensors()]
    trainer = RouterTrainer(moe, alpha=0.01)
    result = train_rows(trainer, corpus_tokens(moe, FAST), FAST, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, moe.tensors(), strict=True))  # the composition, bitwise
    assert trainer.parameters() == trainer.rows["ffn"] and len(trainer.parameters()) == len(moe.layers)
    assert all(not torch.equal(new, layer.router) for new, layer in zip(result.rows, moe.layers))


def test_only_the_router_rows_get_gradients(moe):
    trainer = RouterTrainer(moe, alpha=0.01)
    total, _, _ = trainer.losses(corpus_tokens(moe, FAST)[:2])
    total.backward()
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in trainer.parameters())
    assert all(t.grad is None for t in moe.tensors())


def test_routed_attention_trains_both_routers(zoo, adapters, tmp_path):
    composed = build(parse_composition(spec_dict(zoo["base"], adapters, attention="routed")), ExpertPool())
    result = train(composed)
    assert len(result.attention_rows) == len(composed.layers)
    assert all(not torch.equal(new, layer.attn_router) for new, layer in zip(result.attention_rows, composed.layers))
    path = save_rows(tmp_path / "both.safetensors", result.rows, composed.expert_names, {}, result.attention_rows)
    learned = build(parse_composition(spec_dict(zoo["base"], adapters, kind="learned", weights=str(path), attention="routed")), ExpertPool())
    assert all(torch.equal(layer.attn_router, r) for layer, r in zip(learned.layers, result.attention_rows))


def test_next_token_loss_falls_when_routing_matters(good_and_bad):
    composed = compose(good_and_bad["base"], {k: v for k, v in good_and_bad.items() if k != "base"})
    result = train(composed, replace(FAST, steps=40, batch_size=4))
    first, last = sum(result.lm_loss[:5]) / 5, sum(result.lm_loss[-10:]) / 10
    assert last < first - 0.7, result.lm_loss  # tokens move from the wrecked FFNs to the good one


def test_top_1_is_refused_because_its_router_gets_no_gradient(zoo):
    composed = compose(zoo["base"], {"code": zoo["code"], "math": zoo["math"]}, top_k=1)
    with pytest.raises(ValueError, match="top_k=1"):
        RouterTrainer(composed, alpha=0.01)


def test_load_balancing_loss_by_hand():
    # 4 tokens, 3 experts, top-2. Each token's top two: {0, 1}, {1, 2}, {2, 0}, {0, 1}.
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 2.0, 0.0]])
    f = torch.tensor([3, 3, 2]) / 4  # fraction of tokens dispatched to each expert
    p = torch.softmax(logits, dim=-1).mean(0)  # mean router probability per expert
    expected = 3 * (f * p).sum()
    assert torch.allclose(load_balancing_loss_func((logits,), num_experts=3, top_k=2), expected)
    # At perfect balance the loss is top_k (f sums to k, P to 1).
    assert math.isclose(float(load_balancing_loss_func((torch.zeros(6, 3),), 3, 2)), 2.0, rel_tol=1e-6)


def test_the_trainers_balance_term_is_the_switch_loss_over_every_layers_router(moe):
    """N * sum_i f_i P_i by hand, from the router inputs of the served forward, all layers pooled."""
    batch = corpus_tokens(moe, FAST)[:2]
    with torch.no_grad():
        _, _, aux = RouterTrainer(moe, alpha=0.01).losses(batch)
        captured = Capture(ffn=[])
        Transformer(moe, max_len=64)(Batch(batch, torch.arange(batch.shape[1]).expand_as(batch), None), capture=captured)
    logits = torch.cat([x @ layer.router.T for x, layer in zip(captured.ffn, moe.layers)])  # [L * tokens, E]
    probs = torch.softmax(logits, dim=-1)
    picked = torch.nn.functional.one_hot(probs.topk(2, dim=-1).indices, 3).float()  # [N, k, E]
    expected = 3 * (picked.mean(0) * probs.mean(0)).sum()
    assert float(aux) == pytest.approx(float(expected), rel=1e-5)


def test_alpha_weights_the_balance_term_in_the_total(moe):
    batch = corpus_tokens(moe, FAST)[:2]
    with torch.no_grad():
        plain, lm, aux = RouterTrainer(moe, alpha=0.0).losses(batch)
        weighted, _, aux_again = RouterTrainer(moe, alpha=0.01).losses(batch)
    assert torch.equal(plain, lm) and torch.equal(aux, aux_again) and aux > 0
    assert torch.allclose(weighted - plain, 0.01 * aux, rtol=1e-4)


def test_data_is_mixed_evenly_across_files(moe, tmp_path):
    code, german = CORPUS[:2], "Die Katze schläft im Haus."
    write_jsonl(tmp_path / "code.jsonl", [{"text": t} for t in code])
    (tmp_path / "german.txt").write_text(german)
    texts = [read_texts(tmp_path / "code.jsonl"), read_texts(tmp_path / "german.txt")]
    rows = file_rows(texts, moe.tokenizer, 5, 8, seed=0)  # [5, 8]
    # The files take turns, each packed on its own (texts in seeded order, EOS after each, repeated).
    assert torch.equal(rows[0::2], token_rows(code, moe.tokenizer, 3, 8, seed=0))
    assert torch.equal(rows[1::2], token_rows([german], moe.tokenizer, 2, 8, seed=0))


def test_mixed_rows_switch_domain_mid_sequence(moe):
    texts = [CORPUS[:2], ["Die Katze schläft im Haus."]]
    cfg = replace(FAST, mixed=True, steps=2, batch_size=2, seq_len=8)
    rows = training_rows(texts, moe.tokenizer, cfg)  # [4, 8]: four segments of 2 tokens each, the files in turn
    segments = file_rows(texts, moe.tokenizer, 16, 2, seed=0)
    assert torch.equal(rows, segments.reshape(4, 8))
    assert torch.equal(rows[0, 2:4], token_rows(texts[1], moe.tokenizer, 8, 2, seed=0)[0])  # the second segment is German
    assert torch.equal(training_rows(texts, moe.tokenizer, replace(cfg, mixed=False)), file_rows(texts, moe.tokenizer, 4, 8, seed=0))
    with pytest.raises(ValueError, match="multiple of 4"):
        replace(cfg, seq_len=10)


def test_the_anchor_holds_the_rows_near_their_training_free_start(good_and_bad):
    composed = compose(good_and_bad["base"], {k: v for k, v in good_and_bad.items() if k != "base"})
    start = [getattr(layer, "router").clone() for layer in composed.layers]

    def moved(anchor: float) -> float:
        cfg = replace(FAST, steps=20, batch_size=4, anchor=anchor)
        rows = train_rows(RouterTrainer(composed, cfg.alpha, anchor=anchor), corpus_tokens(composed, cfg), cfg, progress=False).rows
        return sum(((r - r0) ** 2).sum().item() for r, r0 in zip(rows, start)) ** 0.5

    assert moved(10.0) < 0.2 * moved(0.0)


def test_early_stopping_keeps_the_rows_of_the_lowest_validation_loss(moe):
    cfg = replace(FAST, steps=12, batch_size=4, eval_every=3)
    held = token_rows(list(reversed(CORPUS)), moe.tokenizer, 4, 32, seed=1)
    trainer = RouterTrainer(moe, cfg.alpha)
    result = train_rows(trainer, corpus_tokens(moe, cfg), cfg, progress=False, held=held)
    assert [step for step, _ in result.val_loss] == [0, 3, 6, 9, 12]  # before training, then every 3 steps
    best_step, best = min(result.val_loss, key=lambda v: v[1])
    assert result.best_step == best_step and 0 < best_step < 12, result.val_loss  # it rises again after step 3
    # The trainer and the result hold the rows measured best, not the last step's.
    assert trainer.next_token_loss(held, 4) == pytest.approx(best, rel=1e-5)
    assert all(torch.equal(r, t) for r, t in zip(result.rows, trainer.rows["ffn"]))


def test_validation_texts_that_training_only_hurts_keep_the_training_free_rows(good_and_bad):
    composed = compose(good_and_bad["base"], {k: v for k, v in good_and_bad.items() if k != "base"})
    cfg = replace(FAST, steps=6, batch_size=4, eval_every=3)
    noise = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(0))  # nothing like CORPUS
    result = train_rows(RouterTrainer(composed, cfg.alpha), corpus_tokens(composed, cfg), cfg, progress=False, held=noise)
    assert result.best_step == 0, result.val_loss
    assert all(torch.equal(r, layer.router) for r, layer in zip(result.rows, composed.layers))


# --- the router file -------------------------------------------------------------------------

def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_learned_spec_builds_with_the_trained_rows(moe, zoo, tmp_path):
    result = train(moe)
    save_rows(tmp_path / "routers" / "moe.safetensors", result.rows, moe.expert_names, {"steps": FAST.steps})
    # The spec lists the experts in another order: the rows follow their names.
    experts = {n: zoo[n] for n in ("math", "code", "german")}
    spec = write_spec(tmp_path / "learned.yaml", spec_dict(zoo["base"], experts, kind="learned", weights="routers/moe.safetensors"))
    learned = build(load_composition(spec), ExpertPool())
    order = [moe.expert_names.index(n) for n in experts]
    assert all(torch.equal(layer.router, rows[order]) for layer, rows in zip(learned.layers, result.rows))


def test_a_router_file_for_other_experts_is_refused(moe, zoo, tmp_path):
    path = save_rows(tmp_path / "r.safetensors", [layer.router for layer in moe.layers], moe.expert_names, {})
    two = parse_composition(spec_dict(zoo["base"], {"code": zoo["code"], "math": zoo["math"]}, kind="learned", weights=str(path)))
    with pytest.raises(CheckpointError, match=r"r\.safetensors: trained for 3 experts"):
        build(two, ExpertPool())


def test_a_router_file_of_another_width_is_refused(moe, tmp_path):
    wide = [torch.zeros(3, moe.config.hidden_size + 1) for _ in moe.layers]
    path = save_rows(tmp_path / "wide.safetensors", wide, moe.expert_names, {})
    with pytest.raises(CheckpointError, match=r"wide\.safetensors: layers\.0\.router has shape \[3, 65\]"):
        load_rows(moe, path)
    with pytest.raises(CheckpointError, match=r"missing\.safetensors"):
        load_rows(moe, tmp_path / "missing.safetensors")


# --- command line ----------------------------------------------------------------------------

def test_cli_trains_and_writes_a_router_file(zoo, tmp_path, capsys):
    spec = write_spec(tmp_path / "moe.yaml", spec_dict(zoo["base"], {n: zoo[n] for n in ("code", "german", "math")}))
    data = tmp_path / "data"
    write_jsonl(data / "code" / "train.jsonl", [{"text": t} for t in CORPUS[:2]])
    write_jsonl(data / "german" / "train.jsonl", [{"text": t} for t in CORPUS[2:4]])
    (tmp_path / "math.txt").write_text(CORPUS[4] + "\n" + CORPUS[5])
    out = tmp_path / "router.safetensors"
    argv = ["train-router", "--spec", str(spec), "--data", str(data), str(tmp_path / "math.txt"), "--out", str(out),
            "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--threads", "1"]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items() if k != "format"}
        assert sorted(f.keys()) == ["layers.0.router", "layers.1.router"]
    assert meta["expert_names"] == ["code", "german", "math"] and meta["steps"] == 3 and meta["hidden_size"] == 64
    assert len(meta["data"]) == 3 and meta["lm_loss_final"] > 0 and meta["val"] == [] and meta["best_step"] is None

    # With validation texts, the file records their curve and the step whose rows it holds.
    assert main([*argv, "--val", str(tmp_path / "math.txt"), "--eval-every", "1", "--val-rows", "2", "--anchor", "0.1", "--mixed"]) == 0
    with safe_open(str(out), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items() if k != "format"}
    assert [s for s, _ in meta["val_loss"]] == [0, 1, 2, 3] and meta["best_step"] in (0, 1, 2, 3)
    assert meta["anchor"] == 0.1 and meta["mixed"] is True


def train_router_cli(spec: Path, data: Path, out: Path) -> int:
    return main(["train-router", "--spec", str(spec), "--data", str(data), "--out", str(out), "--threads", "1"])


def test_cli_trains_the_router_of_a_qwen2_base(tmp_path):
    """Training runs the engine's own forward, so Qwen2's attention biases are no obstacle."""
    base = make_checkpoint(tmp_path / "qwen", "qwen2", seed=0)
    spec = write_spec(tmp_path / "q.yaml", spec_dict(base, {"a": base, "b": perturbed_copy(base, tmp_path / "b", seed=1)}))
    (tmp_path / "d.txt").write_text(" ".join(CORPUS))
    out = tmp_path / "r.safetensors"
    assert main(["train-router", "--spec", str(spec), "--data", str(tmp_path / "d.txt"), "--out", str(out),
                 "--steps", "2", "--batch-size", "1", "--seq-len", "16", "--threads", "1"]) == 0
    assert out.is_file()


def test_cli_refuses_bad_data_before_building_the_composition(tmp_path, capsys):
    write_jsonl(tmp_path / "notes.jsonl", [{"body": "no text field"}])
    spec = write_spec(tmp_path / "s.yaml", spec_dict(tmp_path / "nowhere", {"a": tmp_path / "a", "b": tmp_path / "b"}))
    assert train_router_cli(spec, tmp_path / "notes.jsonl", tmp_path / "r.safetensors") == 2
    assert f'{tmp_path / "notes.jsonl"}: every line must be a JSON object with a string "text" field' in capsys.readouterr().err


def test_cli_defaults_are_the_config_defaults(tmp_path):
    args = parser().parse_args(["train-router", "--spec", "s.yaml", "--data", "d.txt", "--out", "r.safetensors"])
    assert {k: getattr(args, k) for k in asdict(RouterTrainConfig())} == asdict(RouterTrainConfig())
