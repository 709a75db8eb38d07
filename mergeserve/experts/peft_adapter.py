"""PEFT LoRA adapter folders, merged into dense weights over their base by peft itself.

Tensors the adapter does not touch stay the base's tensors (same storage), so an
adapter expert costs only the projections it changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel

from mergeserve.experts.checkpoint import Checkpoint, CheckpointError, hf_module, refuse_pickles


def is_peft_folder(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def load_peft_adapter(folder: Path, base: Checkpoint) -> Checkpoint:
    refuse_pickles(folder, sorted(folder.glob("adapter_model.safetensors")))
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    if adapter_config.get("peft_type") != "LORA":
        raise CheckpointError(f"{folder}/adapter_config.json: peft_type {adapter_config.get('peft_type')!r}, only LORA is supported")
    try:
        model = PeftModel.from_pretrained(hf_module(base), str(folder))
        # safe_merge writes merged weights into new tensors instead of the shared base ones.
        merged = model.merge_and_unload(safe_merge=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: adapter does not fit the base {base.source}: {e}") from e
    tensors = {k: v.detach() for k, v in merged.state_dict().items()}
    if base.config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    # Share storage with the base wherever the adapter left a tensor unchanged.
    for key, t in tensors.items():
        if key in base.tensors and t.data_ptr() != base.tensors[key].data_ptr() and torch.equal(t, base.tensors[key]):
            tensors[key] = base.tensors[key]
    return Checkpoint(str(folder), "peft", base.config, tensors, base.tokenizer)
