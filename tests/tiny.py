"""Tiny real checkpoints for tests: a byte-level BPE tokenizer and random Llama/Mistral/Qwen2 models.

Everything is built offline in milliseconds and saved the way Hugging Face saves it,
so the code under test loads them through its ordinary paths. Below them, the composition
specs and engines the tests build over such checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mergeserve.engine.engine import Engine
from mergeserve.experts import ExpertPool
from mergeserve.learn.compose import build
from mergeserve.spec import CompositionSpec, EngineConfig, parse_composition

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
    "Der Hund läuft schnell über die Straße.", "Die Katze schläft im Haus.",
    "What is 12 + 7? 12 + 7 = 19.", "Tom has 5 apples and buys 3 more, so he has 8.",
    "The quick brown fox jumps over the lazy dog.", "Hello, how are you today?",
] * 4

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
}


def make_tokenizer(folder: Path, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(folder)
    return fast


def make_checkpoint(
    folder: Path, family: str = "llama", seed: int = 0, tokenizer_from: Path | None = None,
    layers: int = 2, tie: bool = False, init_std: float = 0.1, tokenizer_vocab: int = 400, **config_fields: object,
) -> Path:
    """A random model of `family` saved as safetensors (plus tokenizer files) under `folder`;
    `config_fields` override the family's config (sliding windows, widths, say)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder, tokenizer_vocab) if tokenizer_from is None else PreTrainedTokenizerFast.from_pretrained(tokenizer_from)
    tokenizer.save_pretrained(folder)
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": tie, "initializer_range": init_std, "rms_norm_eps": 1e-6,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, **extra, **config_fields,
    })
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # norms start at 1: perturb them so averaging them is visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def perturbed_copy(src: Path, dst: Path, seed: int, scale: float = 0.05, only: str = "") -> Path:
    """A fine-tune stand-in: `src` with noise added to the tensors whose names contain `only`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    tensors = load_file(str(weights))
    g = torch.Generator().manual_seed(seed)
    for k, t in tensors.items():
        if only in k:
            tensors[k] = t + scale * torch.randn(t.shape, generator=g, dtype=t.dtype)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return dst


FFN_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", *FFN_PROJECTIONS]


def make_adapter(base: Path, out: Path, seed: int, targets: list[str], r: int = 4, **extra) -> Path:
    """A trained-looking PEFT LoRA adapter over `base`: random A and B (peft leaves B at zero
    or small), saved as peft saves it. `extra`: more LoraConfig fields (use_rslora, patterns, DoRA)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **extra)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(out)
    return out


def composition(name: str, base: Path | str, experts: dict[str, Path | str], **fields: object) -> dict:
    """A composition spec as a YAML file holds it: `experts` maps each expert's name to its
    checkpoint; `fields` (router, method, merge, dtype, ...) are added as given."""
    return {"name": name, "base": str(base), "experts": [{"name": n, "source": str(p)} for n, p in experts.items()], **fields}


def dense_spec(path: Path | str, name: str = "dense", expert: str = "only") -> CompositionSpec:
    """One checkpoint served alone: a composition whose only expert is its own base."""
    return parse_composition(composition(name, path, {expert: path}))


def engine_for(
    spec: CompositionSpec, config: EngineConfig | None = None, pool: ExpertPool | None = None, **fields: object,
) -> Engine:
    """An engine serving `spec`, built from `pool` (a fresh one by default) and configured by
    `config`, or else by EngineConfig's `fields`."""
    return Engine(build(spec, ExpertPool() if pool is None else pool), EngineConfig(**fields) if config is None else config)
