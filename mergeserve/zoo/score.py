"""Rescore the built experts' cards on today's held-out splits, without retraining them.

A held-out split that changes (say, to drop problems that share their arithmetic with training) makes
every card's table stale. Retraining would take an hour per expert; scoring the shipped weights again
takes a minute. Experts whose weights are not here (a full fine-tune not yet built) are skipped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

from mergeserve.zoo import DOMAINS, build_dir, root, zoo_dir
from mergeserve.zoo.card import rescore_card
from mergeserve.zoo.config import TrainConfig
from mergeserve.zoo.heldout import heldout_loss
from mergeserve.zoo.train import base_losses, eval_set, load_base


def built_experts() -> list[tuple[str, Path, Path]]:
    """(domain, card folder, weights folder) of every expert whose weights are here."""
    zoo, build = zoo_dir(), build_dir()
    lora = [(d, zoo / d, zoo / d) for d in DOMAINS if (zoo / d / "adapter_model.safetensors").is_file()]
    full = [(card.name.split("-")[0], card, build / "full" / card.name) for card in sorted((zoo / "full").iterdir())
            if (build / "full" / card.name / "model.safetensors").is_file()]
    return lora + full


def load_expert(card: Path, weights: Path) -> PreTrainedModel:
    """The shipped weights (bf16 on disk) in fp32, as training scored them."""
    if (weights / "adapter_model.safetensors").is_file():
        base, _ = load_base()
        return PeftModel.from_pretrained(base, weights).float()
    return AutoModelForCausalLM.from_pretrained(weights, torch_dtype=torch.float32)


def score(domain: str, card: Path, weights: Path) -> dict[str, float]:
    cfg = TrainConfig(domain)
    _, tokenizer = load_base()
    model = load_expert(card, weights)
    expert = {d: heldout_loss(model, tokenizer, eval_set(d, cfg), cfg.seq_len) for d in DOMAINS}
    changed = rescore_card(card / "README.md", domain, base_losses(tokenizer, cfg), expert)
    print(f"{card.relative_to(root())}: {'rescored' if changed else 'unchanged'} {expert}", flush=True)
    return expert


def score_all() -> None:
    for domain, card, weights in built_experts():
        score(domain, card, weights)
