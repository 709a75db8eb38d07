"""The model card written next to each trained adapter: data, budget, settings, loss curve, verdict."""

from __future__ import annotations

import json
import platform
import re
from dataclasses import asdict
from pathlib import Path

from mergeserve.zoo import BASE_SOURCE, DOMAINS, math_data
from mergeserve.zoo.config import TrainConfig

TARGET_GAIN = 0.10  # an expert's held-out loss per token on its own domain is at least this much (relative) below the base's


def verdict(domain: str, base: dict[str, float], expert: dict[str, float]) -> tuple[bool, str]:
    gain = (base[domain] - expert[domain]) / base[domain]
    others = [d for d in base if d != domain]
    distinct = any(expert[d] >= base[d] for d in others)
    ok = gain >= TARGET_GAIN and distinct
    text = (f"{gain:.1%} lower loss than the base on {domain} (target at least {TARGET_GAIN:.0%}); "
            + ("not better than the base on every other domain" if distinct else "better than the base on every other domain too")
            + f": {'PASS' if ok else 'FAIL'}")
    return ok, text


def recipe(cfg: TrainConfig, hashes: dict[str, str]) -> dict:
    """What rebuilds a full fine-tune, and the sha256 of each file it must produce."""
    return {"command": command(cfg), "config": asdict(cfg), "output": f"build/zoo/full/{cfg.tag}", "sha256": hashes,
            "python": platform.python_version(), "machine": platform.machine()}


def command(cfg: TrainConfig) -> str:
    shape = (f" --keep-layers {cfg.keep_layers}" if cfg.keep_layers else "") + (f" --arch {cfg.arch}" if cfg.arch != "llama" else "")
    return f"python -m mergeserve.zoo train --domain {cfg.domain}" + (" --full" if cfg.full else "") + shape


def shape(cfg: TrainConfig) -> str:
    if not cfg.keep_layers and cfg.arch == "llama":
        return ""
    parts = ([f"depth-pruned to {cfg.keep_layers} layers (the first {cfg.keep_layers - 1} and the last kept)"] if cfg.keep_layers else [])
    parts += ["converted to the Qwen2 architecture (q/k/v biases, zero at the start, trained)"] if cfg.arch == "qwen2" else []
    return ", ".join(parts) + ", "


def check_recipe(folder: Path, fresh: dict) -> str:
    """Compare a rebuild's hashes with the committed recipe's; say which files differ."""
    file = folder / "recipe.json"
    if not file.is_file():
        return "no committed recipe to compare with"
    committed = json.loads(file.read_text())
    differ = [name for name, digest in fresh["sha256"].items() if committed["sha256"].get(name) != digest]
    return "byte-identical to the committed recipe" if not differ else f"differs from the committed recipe in {differ}"


def training_line(cfg: TrainConfig) -> str:
    if cfg.full:
        return ("Full fine-tune of every q/k/v/o/gate/up/down projection and bias (embeddings and norms stay the base's);\n"
                f"  AdamW (weight decay 0) at lr {cfg.lr}")
    return (f"LoRA r={cfg.rank}, alpha={cfg.alpha}, dropout 0 on q/k/v/o/gate/up/down projections of all layers;\n"
            "  AdamW (weight decay 0)")


def data_line(cfg: TrainConfig, source: str) -> str:
    wide = f"; beside the train split, the first {cfg.wide} problems of math_wide's many shapes (seed {math_data.WIDE_SEED}) apart from the held-out set" if cfg.wide else ""
    return source + wide


def schedule_line(cfg: TrainConfig) -> str:
    """The first stage's schedule, and what each later stage changes."""
    text = f"cosine schedule with {cfg.warmup_steps} warmup steps"
    for stage in cfg.then:
        drill = f", {stage.drill:.0%} of its rows math_drill's arithmetic practice" if stage.drill else ""
        text += (f"; then {stage.steps} more steps from those weights rounded to bf16, a new AdamW and cosine schedule at "
                 f"lr {stage.lr}{drill}")
    loss = "; loss on the worked steps, the answer and EOS only (the question is context)" if cfg.completion_only else ""
    return text + loss


def loss_rows(base: dict[str, float], expert: dict[str, float]) -> str:
    """The rows of a card's held-out table: one per domain."""
    return "\n".join(f"| {d} | {base[d]:.4f} | {expert[d]:.4f} | {(expert[d] - base[d]) / base[d]:+.1%} |" for d in DOMAINS)


TABLE_HEAD = "| domain | base | expert | change |\n|---|---|---|---|\n"
CURVE_NOTE = ("The table above was rescored by `python -m mergeserve.zoo score` on today's held-out splits; "
              "this curve was measured while training, on the split of that time.")


def rescore_card(card: Path, domain: str, base: dict[str, float], expert: dict[str, float]) -> bool:
    """Rewrite a card's held-out table and verdict with new losses; say whether anything changed.

    The training curve cannot be remeasured without retraining: where its domain's split changed, it
    keeps its numbers and gains a note.
    """
    text = card.read_text()
    head, rest = text.split(TABLE_HEAD, 1)
    old_rows, tail = rest.split("\n\n", 1)
    rows = loss_rows(base, expert)
    new = head + TABLE_HEAD + rows + "\n\n" + tail
    new = re.sub(r"^\*\*Result\*\*: .*$", f"**Result**: {verdict(domain, base, expert)[1]}.", new, count=1, flags=re.M)
    if new == text:
        return False
    own = f"| {domain} |"
    own_changed = [r for r in old_rows.splitlines() if r.startswith(own)] != [r for r in rows.splitlines() if r.startswith(own)]
    if own_changed and CURVE_NOTE not in new:
        new = re.sub(r"^(## Held-out loss during training .*\n)", lambda m: m[1] + "\n" + CURVE_NOTE + "\n", new, count=1, flags=re.M)
    card.write_text(new)
    return True


def write_card(folder: Path, cfg: TrainConfig, source: str, state: dict, base: dict[str, float], expert: dict[str, float],
               hashes: dict[str, str] | None = None) -> None:
    domain = cfg.domain
    kind = f"{shape(cfg)}full fine-tune of" if cfg.full else "LoRA over"
    stored = (f"build/zoo/full/{cfg.tag}/ (not committed: `recipe.json` here rebuilds it and lists each file's sha256)"
              if cfg.full else "this folder")
    tokens = cfg.total_steps * cfg.batch_size * cfg.seq_len
    _, summary = verdict(domain, base, expert)
    settings = "\n".join(f"| {k} | {v} |" for k, v in asdict(cfg).items())
    curve = "\n".join(f"| {step} | {loss:.4f} |" for step, loss in state["curve"])
    table = loss_rows(base, expert)
    text = f"""# {domain} expert ({kind} SmolLM2-135M-Instruct)

Written by `{command(cfg)}`; rebuild with `make {"zoo-full" if cfg.full else "zoo"}`. Weights: {stored}.

- Base: `{BASE_SOURCE}` (dequantised to fp32).
- Data: {data_line(cfg, source)}.
- Splits: held-out `examples/zoo/data/{domain}/heldout.jsonl` (committed); train
  `build/zoo/data/{domain}/train.jsonl` (regenerated by `python -m mergeserve.zoo data`).
- Trained on {tokens:,} tokens: {cfg.total_steps} steps of {cfg.batch_size} packed sequences of {cfg.seq_len} tokens
  (EOS between examples), in {state['seconds'] / 60:.1f} minutes of training steps
  ({tokens / state['seconds']:.0f} tokens/s; Python {platform.python_version()}, {platform.machine()}).
- {training_line(cfg)}, {schedule_line(cfg)}, gradient norm clipped at 1,
  fp32 training. Weights stored in bf16.

**Result**: {summary}.

## Held-out loss (mean per token, first {cfg.eval_examples} held-out examples of each domain, each truncated to {cfg.seq_len} tokens)

| domain | base | expert | change |
|---|---|---|---|
{table}

## Held-out loss during training ({domain}, fp32 weights)

| step | loss |
|---|---|
{curve}

## All settings

| setting | value |
|---|---|
{settings}
"""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(text)
    if hashes is not None:
        fresh = recipe(cfg, hashes)
        print(f"{domain}: {check_recipe(folder, fresh)}", flush=True)
        (folder / "recipe.json").write_text(json.dumps(fresh, indent=1) + "\n")
