"""LoRA training of one domain expert over SmolLM2-135M-Instruct: a short explicit loop, resumable.

Every `save_every` steps the adapter, optimizer, schedule, step, RNG state and loss curve go to
build/zoo/<domain>/checkpoint; a rerun with the same settings continues from there. The data
order is fixed by the seed (rows are packed once, step i reads rows [i*B, (i+1)*B)), so a
resumed run trains on exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from mergeserve.experts import ExpertPool
from mergeserve.spec import resolve_source
from mergeserve.zoo import BASE_SOURCE, BUILD_DIR, DOMAINS, REPO, ZOO_DIR
from mergeserve.zoo.card import write_card
from mergeserve.zoo.data import SOURCES, load_split, write_splits
from mergeserve.zoo.heldout import heldout_loss
from mergeserve.zoo.splits import Example, heldout_path, pack, train_path

# peft looks for the base's config.json to check the vocabulary; a GGUF base has none (embeddings are not trained).
warnings.filterwarnings("ignore", message="Could not find a config file")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# 176 * 4 * 256 = 180k tokens, about 20 minutes at 150 tokens/s. Math gets 240 steps (246k tokens): its
# problems are short, and exact arithmetic needs more of them than loss alone. Code gets 320 steps (328k tokens,
# about 37 minutes): at 176 steps its held-out loss was still falling and 0.9 points short of -10%.
STEPS = {"math": 240, "german": 176, "code": 320}


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


def load_base() -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    checkpoint = ExpertPool().get(resolve_source(BASE_SOURCE, REPO))
    model = LlamaForCausalLM(checkpoint.config).float()
    model.load_state_dict(checkpoint.tensors)
    return model, checkpoint.tokenizer


def eval_set(domain: str, cfg: TrainConfig) -> list[Example]:
    return load_split(domain, "heldout")[: cfg.eval_examples]


def base_losses(model: PeftModel, tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig) -> dict[str, float]:
    """The base's held-out loss per domain, cached until the held-out files or eval settings change."""
    key = {"eval_examples": cfg.eval_examples, "seq_len": cfg.seq_len,
           "heldout": {d: hashlib.sha256(heldout_path(d).read_bytes()).hexdigest() for d in DOMAINS}}
    cache = BUILD_DIR / "base_losses.json"
    if cache.is_file() and (cached := json.loads(cache.read_text()))["key"] == key:
        return cached["losses"]
    with model.disable_adapter():
        losses = {d: heldout_loss(model, tokenizer, eval_set(d, cfg), cfg.seq_len) for d in DOMAINS}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "losses": losses}, indent=1))
    return losses


def save_checkpoint(folder: Path, model: PeftModel, optimizer: torch.optim.Optimizer, scheduler, state: dict) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state | {"adapter": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}, tmp / "state.pt")
    # Swap in the new checkpoint only once it is complete: a kill mid-save keeps the old one.
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


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


def train(cfg: TrainConfig, out: Path | None = None, ckpt_dir: Path | None = None, fresh: bool = False) -> Path:
    out = out or ZOO_DIR / cfg.domain
    ckpt_dir = ckpt_dir or BUILD_DIR / cfg.domain / "checkpoint"
    if fresh:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if not train_path(cfg.domain).is_file() or not heldout_path(cfg.domain).is_file():
        write_splits(cfg.domain)
    torch.set_num_threads(2)
    torch.manual_seed(cfg.seed)  # the LoRA A matrices' initialisation
    base, tokenizer = load_base()
    model = get_peft_model(base, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=TARGET_MODULES))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    state = {"config": asdict(cfg), "step": 0, "curve": [], "train_loss": [], "seconds": 0.0}
    if (saved := load_checkpoint(ckpt_dir, cfg)) is not None:
        set_peft_model_state_dict(model, saved.pop("adapter"))
        optimizer.load_state_dict(saved.pop("optimizer"))
        scheduler.load_state_dict(saved.pop("scheduler"))
        torch.set_rng_state(saved.pop("rng"))
        state = saved
        print(f"{cfg.domain}: resuming from {ckpt_dir} at step {state['step']}", flush=True)
    rows = pack([e["text"] for e in load_split(cfg.domain, "train")], tokenizer, cfg.steps * cfg.batch_size, cfg.seq_len, cfg.seed)
    heldout = eval_set(cfg.domain, cfg)
    if not state["curve"]:
        state["curve"].append([0, heldout_loss(model, tokenizer, heldout, cfg.seq_len)])
        print(f"{cfg.domain}: step 0 held-out loss {state['curve'][-1][1]:.4f}", flush=True)

    model.train()
    bar = tqdm(total=cfg.steps, initial=state["step"], desc=f"train {cfg.domain}", unit="step", mininterval=5)
    while state["step"] < cfg.steps:
        start = time.perf_counter()
        x = rows[state["step"] * cfg.batch_size:(state["step"] + 1) * cfg.batch_size]  # [B, T]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["seconds"] += time.perf_counter() - start
        state["train_loss"].append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{x.numel() / (time.perf_counter() - start):.0f}")
        bar.update()
        step = state["step"]
        if step % cfg.eval_every == 0 or step == cfg.steps:
            state["curve"].append([step, heldout_loss(model, tokenizer, heldout, cfg.seq_len)])
            tok_s = step * cfg.batch_size * cfg.seq_len / state["seconds"]
            bar.write(f"{cfg.domain}: step {step} held-out loss {state['curve'][-1][1]:.4f} "
                      f"(train loss {sum(state['train_loss'][-cfg.eval_every:]) / len(state['train_loss'][-cfg.eval_every:]):.4f}, "
                      f"{tok_s:.0f} tokens/s training)")
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(ckpt_dir, model, optimizer, scheduler, state)
    bar.close()

    # Score what is shipped: the adapter rounded to bf16.
    with torch.no_grad():
        for p in params:
            p.copy_(p.to(torch.bfloat16).float())
    expert = {d: heldout_loss(model, tokenizer, eval_set(d, cfg), cfg.seq_len) for d in DOMAINS}
    base_loss = base_losses(model, tokenizer, cfg)
    save_adapter(model, out)
    write_card(out, cfg, SOURCES[cfg.domain], state, base_loss, expert)
    print(f"{cfg.domain}: wrote {out}; held-out loss base {base_loss} expert {expert}", flush=True)
    return out
