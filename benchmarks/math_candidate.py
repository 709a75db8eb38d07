"""Train a candidate math expert (not the zoo's) on wider data, and say what changed.

The zoo's math expert learns the worked steps of its own templates and the wording of their
questions alike (every token of a packed row is a target). This candidate tries two things the
issue-26 target asks about: many more problem shapes (math_wide's, beside the zoo's templates and
stories), and, with `--completion-only`, a loss on the worked steps and the answer only, so that
the adapter spends nothing on predicting how questions are phrased.

    python benchmarks/math_candidate.py --wide 12000 --steps 700 --completion-only --out build/zoo/math_cand
    python benchmarks/math_candidate.py --wide 12000 --steps 350 --lr 3e-4 --completion-only --drill 0.2 \
      --init build/zoo/math_cand/adapter --skip-steps 700 --out build/zoo/math_cand3
    mergeserve eval --spec <a math spec whose source is OUT/adapter> --domains math --sets heldout other --math 50 --mixed 1

The adapter goes to OUT/adapter, the loss curve and settings to OUT/train.json. `--init` starts
from an earlier run's adapter and `--skip-steps N` trains on the packed rows after that run's N
steps (a new schedule, not a resumed one); `--drill S` puts math_drill's arithmetic practice in
a share S of the rows. An experiment, not the zoo's recipe (zoo/train.py is).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from mergeserve.zoo import math_data
from mergeserve.zoo.config import Stage, TrainConfig
from mergeserve.zoo.data import load_split
from mergeserve.zoo.heldout import heldout_loss
from mergeserve.zoo.train import eval_set, load_base, optimizer_for, save_adapter, stage_rows, train_step, trainable


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wide", type=int, default=12000, help="math_wide problems added to the zoo's math training split")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--drill", type=float, default=0.0, help="this share of the rows is math_drill's arithmetic practice")
    p.add_argument("--completion-only", action="store_true", help="no loss on the question's tokens")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--init", type=Path, help="start from this adapter folder (an earlier run's OUT/adapter)")
    p.add_argument("--skip-steps", type=int, default=0, help="continue the data order after this many steps of an earlier run")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()

    cfg = TrainConfig("math", steps=a.steps, rank=a.rank, alpha=2 * a.rank, lr=a.lr, eval_every=a.eval_every,
                      completion_only=a.completion_only, wide=a.wide)
    torch.set_num_threads(2)
    torch.manual_seed(cfg.seed)
    base, tokenizer = load_base()
    model = trainable(base, cfg)
    if a.init is not None:
        set_peft_model_state_dict(model, {k: v.float() for k, v in load_file(a.init / "adapter_model.safetensors").items()})
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer, scheduler = optimizer_for(params, cfg, cfg.stages[0])

    # The earlier run's steps as a first stage: this run reads the rows after them, as zoo/train.py's second stage would.
    x_all, y_all = stage_rows(replace(cfg, steps=a.skip_steps, then=(Stage(a.steps, a.lr, a.drill),)), tokenizer)[-1]
    examples = len(load_split("math", "train")) + a.wide  # training_data(cfg): the split and `wide` math_wide problems
    held = eval_set("math", cfg)
    curve, train_loss, seconds = [[0, heldout_loss(model, tokenizer, held, cfg.seq_len)]], [], 0.0
    print(f"{examples} examples; step 0 held-out loss {curve[-1][1]:.4f}", flush=True)
    model.train()
    for step in range(1, cfg.steps + 1):
        start = time.perf_counter()
        x, y = x_all[(step - 1) * cfg.batch_size:step * cfg.batch_size], y_all[(step - 1) * cfg.batch_size:step * cfg.batch_size]
        loss = train_step(model, params, optimizer, scheduler, x, y)
        seconds += time.perf_counter() - start
        train_loss.append(loss.item())
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve.append([step, heldout_loss(model, tokenizer, held, cfg.seq_len)])
            print(f"step {step}: held-out loss {curve[-1][1]:.4f}, train loss {sum(train_loss[-cfg.eval_every:]) / len(train_loss[-cfg.eval_every:]):.4f}, "
                  f"{step * cfg.batch_size * cfg.seq_len / seconds:.0f} tokens/s", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    save_adapter(model, a.out / "adapter")
    (a.out / "train.json").write_text(json.dumps({
        "config": asdict(cfg), "init": str(a.init) if a.init else None, "skip_steps": a.skip_steps, "wide": a.wide, "wide_seed": math_data.WIDE_SEED, "drill": a.drill, "drill_seed": math_data.DRILL_SEED, "completion_only": a.completion_only,
        "examples": examples, "seconds": seconds, "curve": curve, "train_loss": train_loss}, indent=1) + "\n")
    print(f"wrote {a.out}", flush=True)


if __name__ == "__main__":
    main()
