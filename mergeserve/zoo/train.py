"""Training of one domain expert over SmolLM2-135M-Instruct, as a LoRA or a full fine-tune: a short
explicit loop, resumable.

Every `save_every` steps the adapter, optimizer, schedule, step, RNG state and loss curve go to
build/zoo/<domain>/checkpoint; a rerun with the same settings continues from there. The data
order is fixed by the seed (rows are packed once, step i reads rows [i*B, (i+1)*B)), so a
resumed run trains on exactly what an uninterrupted one would.

A run may have stages (`TrainConfig.then`): each starts a new AdamW and cosine schedule from the
weights the stage before left, rounded to bf16 as a stored adapter is, on the rows after that
stage's, so a two-stage run is byte for byte a run that continues from the first stage's adapter.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import warnings
from dataclasses import asdict
from itertools import accumulate
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from mergeserve.calibration import packed_rows
from mergeserve.experts import ExpertPool
from mergeserve.spec import resolve_source
from mergeserve.zoo import BASE_SOURCE, DOMAINS, build_dir, math_data, root, zoo_dir
from mergeserve.zoo.card import write_card
from mergeserve.zoo.config import Stage, TrainConfig
from mergeserve.zoo.data import SOURCES, load_split, write_splits
from mergeserve.zoo.heldout import heldout_loss
from mergeserve.zoo.reshape import prune_depth, to_qwen2
from mergeserve.zoo.splits import Example, heldout_path, train_path

# peft looks for the base's config.json to check the vocabulary; a GGUF base has none (embeddings are not trained).
warnings.filterwarnings("ignore", message="Could not find a config file")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# 176 * 4 * 256 = 180k tokens, about 20 minutes at 150 tokens/s. Math gets 360 steps (369k tokens, about
# 45 minutes): its problems are short, exact arithmetic needs more of them than loss alone, and since
# issue 26 half its problems are composed stories of many shapes and phrasings. Code gets 320 steps (328k
# tokens, about 37 minutes): at 176 steps its held-out loss was still falling and 0.9 points short of -10%.
LORA = {"math": TrainConfig("math", steps=360), "german": TrainConfig("german", steps=176), "code": TrainConfig("code", steps=320)}
# Full fine-tunes (every attention and FFN weight; embeddings and norms stay the base's) train at ~250 tokens/s
# on 2 cores (no LoRA detour), so 300 steps of 4 x 256 tokens take ~21 minutes, inside the 40-minute budget.
FULL_STEPS = {"math": 300, "german": 300, "code": 300}
FULL_LR = 1e-4  # large enough that the deltas stand well above bf16 rounding of the stored weights


def load_base() -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    checkpoint = ExpertPool().get(resolve_source(BASE_SOURCE, root()))
    model = LlamaForCausalLM(checkpoint.config).float()
    model.load_state_dict(checkpoint.tensors)
    return model, checkpoint.tokenizer


def reshaped(model: LlamaForCausalLM, cfg: TrainConfig) -> PreTrainedModel:
    """The base in the expert's shape: depth-pruned and/or converted (the base itself by default)."""
    if cfg.keep_layers:
        model = prune_depth(model, cfg.keep_layers)
    return to_qwen2(model) if cfg.arch == "qwen2" else model


def eval_set(domain: str, cfg: TrainConfig) -> list[Example]:
    return load_split(domain, "heldout")[: cfg.eval_examples]


def base_losses(tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig) -> dict[str, float]:
    """The base's held-out loss per domain, cached until the held-out files or eval settings change."""
    key = {"eval_examples": cfg.eval_examples, "seq_len": cfg.seq_len,
           "heldout": {d: hashlib.sha256(heldout_path(d).read_bytes()).hexdigest() for d in DOMAINS}}
    cache = build_dir() / "base_losses.json"
    if cache.is_file() and (cached := json.loads(cache.read_text()))["key"] == key:
        return cached["losses"]
    base, _ = load_base()
    losses = {d: heldout_loss(base, tokenizer, eval_set(d, cfg), cfg.seq_len) for d in DOMAINS}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "losses": losses}, indent=1))
    return losses


def save_checkpoint(folder: Path, model: torch.nn.Module, cfg: TrainConfig, optimizer: torch.optim.Optimizer, scheduler, state: dict) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state | {"adapter": trained_state(model, cfg), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}, tmp / "state.pt")
    # Swap in the new checkpoint only once it is complete: a kill mid-save keeps the old one.
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def trainable(base: LlamaForCausalLM, cfg: TrainConfig) -> torch.nn.Module:
    """The model that trains: a peft LoRA over the base, or the base with only its projections unfrozen."""
    if not cfg.full:
        return get_peft_model(base, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=TARGET_MODULES))
    for name, p in base.named_parameters():
        p.requires_grad_(name.rsplit(".", 2)[-2] in TARGET_MODULES)
    return base


def trained_state(model: torch.nn.Module, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    if not cfg.full:
        return get_peft_model_state_dict(model)
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 2)[-2] in TARGET_MODULES}


def load_trained_state(model: torch.nn.Module, cfg: TrainConfig, tensors: dict[str, torch.Tensor]) -> None:
    if cfg.full:
        model.load_state_dict(tensors, strict=False)
    else:
        set_peft_model_state_dict(model, tensors)


def load_checkpoint(folder: Path, cfg: TrainConfig) -> dict | None:
    if not (folder / "state.pt").is_file():
        return None
    state = torch.load(folder / "state.pt", weights_only=True)
    if state["config"] != asdict(cfg):
        sys.exit(f"{folder} was made with other settings ({state['config']}); rerun with --fresh to start over")
    return state


def save_adapter(model: PeftModel, folder: Path) -> None:
    """The adapter in bf16 (r=16 fp32 would be 19.5 MB; the loaders upcast to fp32)."""
    model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)
    weights = folder / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = BASE_SOURCE  # not this machine's path
    config["target_modules"] = sorted(config["target_modules"])  # peft writes a set: fix the order
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def save_full(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, folder: Path) -> dict[str, str]:
    """A Hugging Face checkpoint in bf16, and the sha256 of each of its files (the recipe's check)."""
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    model.float()
    tokenizer.save_pretrained(folder)
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


def labelled(example: Example, tokenizer: PreTrainedTokenizerBase, completion_only: bool) -> tuple[list[int], list[int]]:
    """(token ids with EOS, labels): with completion_only the question's tokens are no target (-100)."""
    enc = tokenizer(example["text"], add_special_tokens=False, return_offsets_mapping=True)
    ids = enc.input_ids + [tokenizer.eos_token_id]
    if not completion_only:
        return ids, list(ids)
    prompt_chars = len(example["text"].split("\n", 1)[0]) + 1  # the `Question: ...` line and its newline
    labels = [-100 if end <= prompt_chars else t for t, (_, end) in zip(enc.input_ids, enc.offset_mapping)]
    return ids, labels + [tokenizer.eos_token_id]


def with_drill(x: torch.Tensor, y: torch.Tensor, drill: tuple[torch.Tensor, torch.Tensor], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The drill rows in place of as many of the last rows of (x, y) [rows, T], all rows in seeded random order."""
    xd, yd = drill
    x, y = torch.cat([x[:len(x) - len(xd)], xd]), torch.cat([y[:len(y) - len(yd)], yd])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order], y[order]


def training_data(cfg: TrainConfig) -> list[Example]:
    """The train split, and for math the `wide` problems of math_wide after it."""
    data = load_split(cfg.domain, "train")
    return data + math_data.wide(load_split("math", "heldout"), cfg.wide) if cfg.wide else data


def stage_rows(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each stage's (ids, labels), [steps * B, T] each: the packed training data in order, a stage's
    drill share in place of its last rows and then shuffled (the seed fixes every order)."""
    data, rows, start = training_data(cfg), [], 0
    x, y = packed_rows(len(data), lambda i: labelled(data[i], tokenizer, cfg.completion_only),
                       cfg.total_steps * cfg.batch_size, cfg.seq_len, cfg.seed)
    for stage in cfg.stages:
        n = stage.steps * cfg.batch_size
        xs, ys = x[start:start + n], y[start:start + n]
        if stage.drill:
            drill = math_data.drill(load_split("math", "heldout"))
            practice = packed_rows(len(drill), lambda i: labelled(drill[i], tokenizer, cfg.completion_only),
                                   round(stage.drill * n), cfg.seq_len, cfg.seed)
            xs, ys = with_drill(xs, ys, practice, cfg.seed)
        rows.append((xs, ys))
        start += n
    return rows


def optimizer_for(params: list[torch.Tensor], cfg: TrainConfig, stage: Stage) -> tuple[torch.optim.Optimizer, object]:
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.0)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, stage.steps)


def round_to_bf16(params: list[torch.Tensor]) -> None:
    """The weights as stored (bf16), in place: what a stage after the first starts from, and what is scored."""
    with torch.no_grad():
        for p in params:
            p.copy_(p.to(torch.bfloat16).float())


def train_step(model: torch.nn.Module, params: list[torch.Tensor], optimizer: torch.optim.Optimizer, scheduler,
               x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One optimizer step on rows x [B, T] (labels [B, T], -100 where a token is no target); the loss."""
    loss = model(input_ids=x, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def default_paths(cfg: TrainConfig) -> tuple[Path, Path]:
    """(the output folder, the checkpoint folder). Full fine-tunes (270 MB) are built into build/, not committed."""
    if cfg.full:
        return build_dir() / "full" / cfg.tag, build_dir() / "full" / f"{cfg.tag}-checkpoint"
    return zoo_dir() / cfg.domain, build_dir() / cfg.domain / "checkpoint"


def log_and_save(state: dict, cfg: TrainConfig, stage_end: int, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 heldout: list[Example], optimizer: torch.optim.Optimizer, scheduler, ckpt_dir: Path, bar: tqdm) -> None:
    """After a step: the held-out loss every eval_every steps and at a stage's end, a checkpoint every save_every."""
    step = state["step"]
    if step % cfg.eval_every == 0 or step == stage_end:
        state["curve"].append([step, heldout_loss(model, tokenizer, heldout, cfg.seq_len)])
        recent = state["train_loss"][-cfg.eval_every:]
        bar.write(f"{cfg.domain}: step {step} held-out loss {state['curve'][-1][1]:.4f} (train loss {sum(recent) / len(recent):.4f}, "
                  f"{step * cfg.batch_size * cfg.seq_len / state['seconds']:.0f} tokens/s training)")
    if step % cfg.save_every == 0 or step == stage_end:
        save_checkpoint(ckpt_dir, model, cfg, optimizer, scheduler, state)


def train(cfg: TrainConfig, out: Path | None = None, ckpt_dir: Path | None = None, fresh: bool = False) -> Path:
    default_out, default_ckpt = default_paths(cfg)
    out, ckpt_dir = out or default_out, ckpt_dir or default_ckpt
    if fresh:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if not train_path(cfg.domain).is_file() or not heldout_path(cfg.domain).is_file():
        write_splits(cfg.domain)
    torch.set_num_threads(2)
    torch.manual_seed(cfg.seed)  # the LoRA A matrices' initialisation
    torch.use_deterministic_algorithms(True)  # the recipe promises the same bytes on a rerun
    base, tokenizer = load_base()
    model = trainable(reshaped(base, cfg), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    state = {"config": asdict(cfg), "step": 0, "curve": [], "train_loss": [], "seconds": 0.0}
    saved = load_checkpoint(ckpt_dir, cfg)
    if saved is not None:
        load_trained_state(model, cfg, saved.pop("adapter"))
        torch.set_rng_state(saved.pop("rng"))
        state = {k: v for k, v in saved.items() if k not in ("optimizer", "scheduler")}
        print(f"{cfg.domain}: resuming from {ckpt_dir} at step {state['step']}", flush=True)
    heldout = eval_set(cfg.domain, cfg)
    if not state["curve"]:
        state["curve"].append([0, heldout_loss(model, tokenizer, heldout, cfg.seq_len)])
        print(f"{cfg.domain}: step 0 held-out loss {state['curve'][-1][1]:.4f}", flush=True)

    model.train()
    bar = tqdm(total=cfg.total_steps, initial=state["step"], desc=f"train {cfg.domain}", unit="step", mininterval=5)
    ends = accumulate(stage.steps for stage in cfg.stages)
    for index, (stage, (xs, ys), last) in enumerate(zip(cfg.stages, stage_rows(cfg, tokenizer), ends)):
        first = last - stage.steps
        if state["step"] >= last:
            continue
        optimizer, scheduler = optimizer_for(params, cfg, stage)
        if state["step"] > first:  # resumed inside this stage
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        elif index:
            round_to_bf16(params)  # as if restarted from the stored adapter of the stage before
        while state["step"] < last:
            begin, i = time.perf_counter(), state["step"] - first
            x, y = xs[i * cfg.batch_size:(i + 1) * cfg.batch_size], ys[i * cfg.batch_size:(i + 1) * cfg.batch_size]  # [B, T]
            loss = train_step(model, params, optimizer, scheduler, x, y)
            state["step"] += 1
            state["seconds"] += time.perf_counter() - begin
            state["train_loss"].append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{x.numel() / (time.perf_counter() - begin):.0f}")
            bar.update()
            log_and_save(state, cfg, last, model, tokenizer, heldout, optimizer, scheduler, ckpt_dir, bar)
    bar.close()

    # Score what is shipped: the adapter (or, for a full fine-tune, every weight) rounded to bf16.
    round_to_bf16(params if not cfg.full else list(model.parameters()))
    expert = {d: heldout_loss(model, tokenizer, eval_set(d, cfg), cfg.seq_len) for d in DOMAINS}
    base_loss = base_losses(tokenizer, cfg)
    if cfg.full:
        hashes = save_full(model, tokenizer, out)
        write_card(zoo_dir() / "full" / cfg.tag, cfg, SOURCES[cfg.domain], state, base_loss, expert, hashes)
    else:
        save_adapter(model, out)
        write_card(out, cfg, SOURCES[cfg.domain], state, base_loss, expert)
    print(f"{cfg.domain}: wrote {out}; held-out loss base {base_loss} expert {expert}", flush=True)
    return out
