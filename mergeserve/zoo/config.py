"""What one zoo expert's training is set by: read by the training loop and by its model card."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """A later stage of a run: a new AdamW and cosine schedule, from the weights the stage before left
    (rounded to bf16, as an adapter is stored), on the packed rows after that stage's."""

    steps: int
    lr: float
    drill: float = 0.0  # this share of the stage's rows is math_drill's arithmetic practice (math)


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
    # What the loss sees and the data beside the train split (math): with completion_only, the worked
    # steps, the answer and EOS only (the question is context); `wide` math_wide problems.
    completion_only: bool = False
    wide: int = 0
    then: tuple[Stage, ...] = ()  # stages after the first (which is `steps` at `lr`)

    @property
    def stages(self) -> tuple[Stage, ...]:
        return (Stage(self.steps, self.lr), *self.then)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def tag(self) -> str:
        """The expert's name in build/zoo/full and examples/zoo/full: its domain and shape."""
        return self.domain + ("-pruned" if self.keep_layers else "") + ("-qwen2" if self.arch == "qwen2" else "")
