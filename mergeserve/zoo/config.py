"""What one zoo expert's training is set by: read by the training loop and by its model card."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    domain: str
    steps: int = 176
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 1e-3
    warmup_steps: int = 10
    rank: int = 16
    alpha: int = 32
    eval_every: int = 25
    save_every: int = 25
    eval_examples: int = 48  # the first held-out examples, each truncated to seq_len tokens
    seed: int = 0
    full: bool = False  # train every attention and FFN weight instead of a LoRA
    # Other shapes of the base (full fine-tunes only; zoo/reshape.py): keep this many layers (0: all),
    # and the architecture to train it as (qwen2: the same weights with q/k/v biases, trained too).
    keep_layers: int = 0
    arch: str = "llama"

    @property
    def tag(self) -> str:
        """The expert's name in build/zoo/full and examples/zoo/full: its domain and shape."""
        return self.domain + ("-pruned" if self.keep_layers else "") + ("-qwen2" if self.arch == "qwen2" else "")
