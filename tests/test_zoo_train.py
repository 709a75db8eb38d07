"""The zoo trainer on a tiny Llama: what trains, the rows each stage reads and what the loss sees, and a
full fine-tune the pool serves."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from mergeserve.calibration import token_rows
from mergeserve.experts import ExpertPool
from mergeserve.zoo import ROOT_ENV, math_data
from mergeserve.zoo.card import CURVE_NOTE, rescore_card, write_card
from mergeserve.zoo.config import Stage, TrainConfig
from mergeserve.zoo.data import load_split
from mergeserve.zoo.reshape import kept_layers, prune_depth, to_qwen2
from mergeserve.zoo.splits import heldout_path, train_path, write_jsonl
from mergeserve.zoo.train import TARGET_MODULES, labelled, save_full, stage_rows, train_step, trainable, trained_state


def test_a_full_fine_tune_trains_every_projection_and_nothing_else(zoo):
    model = trainable(LlamaForCausalLM.from_pretrained(zoo["base"]), TrainConfig("math", full=True))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.rsplit(".", 2)[-2] in TARGET_MODULES for n in trained)
    assert not any("embed" in n or "norm" in n for n in trained)
    assert set(trained_state(model, TrainConfig("math", full=True))) == {n for n in model.state_dict() if n in trained}


def test_a_full_fine_tune_is_saved_byte_for_byte_the_same_and_served_as_an_expert(zoo, tmp_path: Path):
    model = LlamaForCausalLM.from_pretrained(zoo["base"])
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.25)
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    first, second = save_full(model, tokenizer, tmp_path / "a"), save_full(model, tokenizer, tmp_path / "b")
    assert first == second and "model.safetensors" in first
    expert = ExpertPool().get_expert(str(tmp_path / "a"), str(zoo["base"]))
    key = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(expert.tensors[key].float(), model.state_dict()[key].to(torch.bfloat16).float())


def test_depth_pruning_keeps_the_first_layers_and_the_last(zoo, tmp_path: Path):
    from tiny import make_checkpoint

    assert kept_layers(30, 20) == [*range(19), 29]
    model = LlamaForCausalLM.from_pretrained(make_checkpoint(tmp_path / "deep", "llama", seed=4, layers=4))
    pruned = prune_depth(model, 2)
    assert pruned.config.num_hidden_layers == 2 and len(pruned.model.layers) == 2
    for new, old in enumerate([0, 3]):
        torch.testing.assert_close(pruned.model.layers[new].mlp.up_proj.weight, model.model.layers[old].mlp.up_proj.weight)
    torch.testing.assert_close(pruned.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_a_llama_converted_to_qwen2_computes_the_same_logits_and_gains_trainable_biases(zoo):
    model = LlamaForCausalLM.from_pretrained(zoo["base"]).eval()
    qwen = to_qwen2(model).eval()
    assert qwen.config.model_type == "qwen2" and not qwen.model.layers[0].self_attn.q_proj.bias.any()
    ids = torch.tensor([[1, 5, 9, 33, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(qwen(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    trained = {n for n, p in trainable(qwen, TrainConfig("code", full=True)).named_parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.q_proj.bias" in trained


def test_rescoring_a_card_rewrites_its_table_and_verdict_and_flags_a_stale_curve(tmp_path: Path):
    cfg = TrainConfig("math", steps=2)
    state = {"curve": [[0, 2.0], [2, 1.0]], "seconds": 1.0}
    write_card(tmp_path, cfg, "a generator", state, {"math": 2.0, "german": 4.0, "code": 2.0},
               {"math": 1.0, "german": 4.5, "code": 2.5})
    card = tmp_path / "README.md"
    assert not rescore_card(card, "math", {"math": 2.0, "german": 4.0, "code": 2.0}, {"math": 1.0, "german": 4.5, "code": 2.5})

    # The math split changed: the base and the expert score otherwise, and the expert now misses its target.
    assert rescore_card(card, "math", {"math": 2.1, "german": 4.0, "code": 2.0}, {"math": 2.0, "german": 4.5, "code": 2.5})
    text = card.read_text()
    assert "| math | 2.1000 | 2.0000 | -4.8% |" in text and "| math | 2.0000 |" not in text.split("## Held-out loss during")[0]
    assert "**Result**: 4.8% lower loss than the base on math" in text and ": FAIL." in text
    assert CURVE_NOTE in text and "| 2 | 1.0000 |" in text  # the curve keeps its numbers, with the note
    assert text.count("## ") == 3  # nothing else in the card moved


def test_rescoring_another_domains_row_leaves_the_training_curve_unflagged(tmp_path: Path):
    cfg = TrainConfig("german", steps=2)
    write_card(tmp_path, cfg, "a handbook", {"curve": [[0, 4.0]], "seconds": 1.0},
               {"math": 2.0, "german": 4.0, "code": 2.0}, {"math": 2.2, "german": 3.0, "code": 2.1})
    assert rescore_card(tmp_path / "README.md", "german", {"math": 2.1, "german": 4.0, "code": 2.0},
                        {"math": 2.4, "german": 3.0, "code": 2.1})
    assert CURVE_NOTE not in (tmp_path / "README.md").read_text()


def test_a_training_step_on_the_completion_alone_lowers_its_loss(zoo):
    torch.manual_seed(0)
    model = trainable(LlamaForCausalLM.from_pretrained(zoo["base"]), TrainConfig("math", full=True))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    x = torch.randint(0, model.config.vocab_size, (2, 16))  # [B, T]
    completion = torch.full_like(x, -100)  # -100: not a target
    completion[:, 8:] = x[:, 8:]  # the second half of each row is the answer
    first = train_step(model, params, optimizer, scheduler, x, completion)
    assert train_step(model, params, optimizer, scheduler, x, completion) < first


def test_completion_only_labels_make_the_worked_steps_the_only_targets(zoo):
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    problem = math_data.problems(1, 1)[0]
    ids, labels = labelled(problem, tokenizer, completion_only=True)
    assert labelled(problem, tokenizer, completion_only=False) == (ids, ids)
    targets = [t for t in labels if t != -100]
    assert targets[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(targets[:-1]) == problem["text"].split("\n", 1)[1]  # the steps and the answer, no question


def test_a_later_stage_reads_the_rows_after_the_first_with_its_share_of_drill(zoo, tmp_path: Path, monkeypatch):
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    heldout_path("math").parent.mkdir(parents=True)
    shutil.copy(Path(__file__).parent.parent / "examples/zoo/data/math/heldout.jsonl", heldout_path("math"))
    write_jsonl(train_path("math"), math_data.problems(1, 100))
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    one = TrainConfig("math", steps=6, batch_size=2, seq_len=48, completion_only=True, wide=40)
    two = replace(one, steps=4, then=(Stage(2, 3e-4, drill=0.5),))
    assert two.total_steps == one.total_steps == 6

    [(x, y)] = stage_rows(one, tokenizer)  # [12, 48] each
    [(plain, plain_labels)] = stage_rows(replace(one, completion_only=False, wide=0), tokenizer)
    texts = [e["text"] for e in load_split("math", "train")]
    assert torch.equal(plain, token_rows(texts, tokenizer, 12, 48, 0)) and torch.equal(plain_labels, plain)  # as before stages
    (first, _), (second, second_labels) = stage_rows(two, tokenizer)
    assert torch.equal(first, x[:8])  # the first stage is the single stage's first 4 steps
    after, drilled = {tuple(r) for r in x[8:10].tolist()}, [r for r in second.tolist() if tuple(r) not in {tuple(r) for r in x.tolist()}]
    assert after <= {tuple(r) for r in second.tolist()} and len(second) == 4 and len(drilled) == 2
    questions = {e["question"] for e in math_data.drill(load_split("math", "heldout"))}
    assert any(q in tokenizer.decode(row) for row in drilled for q in questions)  # packed drill problems
    assert (second_labels == -100).any()  # the questions are no target


def test_a_staged_run_s_card_counts_every_stage_and_says_what_the_loss_sees(tmp_path: Path):
    cfg = TrainConfig("math", steps=4, completion_only=True, wide=40, then=(Stage(2, 3e-4, drill=0.2),))
    write_card(tmp_path, cfg, "a generator", {"curve": [[0, 2.0], [6, 1.5]], "seconds": 1.0},
               {"math": 2.0, "german": 4.0, "code": 2.0}, {"math": 1.5, "german": 4.5, "code": 2.5})
    text = (tmp_path / "README.md").read_text()
    assert "6,144 tokens: 6 steps" in text and "then 2 more steps" in text and "lr 0.0003, 20% of its rows math_drill" in text
    assert "the first 40 problems of math_wide" in text and "loss on the worked steps, the answer and EOS only" in text
