"""PEFT LoRA adapter folders, kept as their factors over the shared base.

Each adapted projection becomes a LowRank: the base's own tensor plus A [r, in],
B [out, r] (in the file's dtype) and the scaling (alpha / r, or alpha / sqrt(r) for
rsLoRA; per-module rank and alpha patterns). Ranks may differ between modules and adapters.
Adapters using what a plain B·A cannot express (DoRA, LoRA biases, `modules_to_save`,
trainable tokens, embedding LoRA) are merged into dense weights by peft itself, and a
log line says why.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import replace
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mergeserve.weights import LowRank
from mergeserve.experts.checkpoint import Checkpoint, CheckpointError, hf_module, refuse_pickles

log = logging.getLogger(__name__)

# Adapter keys look like base_model.model.<module>.lora_A.weight (peft drops the adapter name).
FACTOR_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_peft_folder(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def load_peft_adapter(folder: Path, base: Checkpoint, merge: bool = False) -> Checkpoint:
    """`merge`: materialise every adapter as dense weights (the dense path) instead of factors."""
    refuse_pickles(folder, sorted(folder.glob("adapter_model.safetensors")))
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{folder}/adapter_config.json: peft_type {config.get('peft_type')!r}, only LORA is supported")
    why = None if merge else unfactorable(config)
    declared = config.get("base_model_name_or_path")
    if merge or why:
        if why:
            log.info("%s: merged into dense weights, not kept as factors: %s", folder, why)
        return replace(merged_adapter(folder, base), declared_base=declared)
    try:
        raw = load_file(str(folder / "adapter_model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{folder}/adapter_model.safetensors: not a readable safetensors file: {e}") from e
    factored, extra = factors(folder, raw, config, base)
    if extra:
        log.info("%s: merged into dense weights, not kept as factors: it holds %s", folder, extra[0])
        return replace(merged_adapter(folder, base), declared_base=declared)
    stored = {k: t for k, t in base.stored.items() if k not in factored}
    return Checkpoint(str(folder), "peft", base.config, stored, base.tokenizer, factored, declared)


def names_base(declared: str, base: Checkpoint) -> bool:
    """Whether an adapter's base_model_name_or_path names `base`: the same path (`pkg://`
    resolved), the same final name (a hub id such as org/SmolLM2-135M-Instruct against a local
    copy of that folder), or the name the base's own config records."""
    from mergeserve.spec import SpecError, resolve_source

    try:
        resolved = resolve_source(declared, Path("/")) if declared.startswith(("pkg://", "/")) else declared
    except SpecError:  # a pkg:// whose package is not installed here
        resolved = declared
    ours = Path(base.source)
    return resolved == str(ours) or Path(declared).name in (ours.name, ours.stem) or declared == getattr(base.config, "_name_or_path", None)


def unfactorable(config: dict) -> str | None:
    """Why this adapter cannot stay B·A over the base, or None."""
    if config.get("use_dora"):
        return "DoRA rescales each weight's columns by a learned magnitude"
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        return "it trains biases"
    if config.get("modules_to_save"):
        return f"modules_to_save {config['modules_to_save']} are whole replaced modules"
    if config.get("trainable_token_indices"):
        return "it trains token embeddings"
    if config.get("fan_in_fan_out"):
        return "fan_in_fan_out layers"
    if config.get("layer_replication"):
        return "layer_replication changes the layer stack"
    return None


def factors(folder: Path, raw: dict[str, torch.Tensor], config: dict, base: Checkpoint) -> tuple[dict[str, LowRank], list[str]]:
    """The adapter's LowRank weights by Hugging Face name, and any keys that are not plain projection factors."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    extra = []
    for key, t in raw.items():
        m = FACTOR_KEY.match(key)
        if m is None or m["module"].rsplit(".", 1)[-1] not in PROJECTIONS:
            extra.append(key)
            continue
        pairs.setdefault(m["module"], {})[m["which"]] = t
    out = {}
    for module, ab in pairs.items():
        name = module + ".weight"
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{folder}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        if name not in base.stored:
            raise CheckpointError(f"{folder}: adapts {module}, which the base {base.source} does not have")
        w, a, b = base.stored[name], ab["A"], ab["B"]  # the factors keep the file's dtype
        r = a.shape[0]
        if a.shape != (r, w.shape[1]) or b.shape != (w.shape[0], r):
            raise CheckpointError(
                f"{folder}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"which do not fit the base weight {tuple(w.shape)}"
            )
        # B is kept as the transpose of a contiguous [r, out]: a base engine slices many adapters'
        # B by rows (kernels/entry_lora.py), and contiguous rows copy at twice the speed of columns.
        out[name] = LowRank(w, a.contiguous(), b.t().contiguous().t(), scaling(config, module, r))
    return out, extra


def scaling(config: dict, module: str, r: int) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA), alpha from alpha_pattern where a pattern matches (as peft)."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def merged_adapter(folder: Path, base: Checkpoint) -> Checkpoint:
    """The adapter merged into dense weights by peft; untouched tensors stay the base's own."""
    try:
        model = PeftModel.from_pretrained(hf_module(base), str(folder))
        # The layers peft wraps hold the pool's own base tensors (hf_module shares them), and peft
        # (0.22 on) merges into them in place even with safe_merge: give each a copy first.
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                layer = module.get_base_layer()
                layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        merged = model.merge_and_unload(safe_merge=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: adapter does not fit the base {base.source}: {e}") from e
    tensors = {k: v.detach() for k, v in merged.state_dict().items()}
    if base.config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    # Share storage with the base wherever the adapter left a tensor unchanged.
    for key, t in tensors.items():
        if key in base.stored and t.data_ptr() != base.stored[key].data_ptr() and torch.equal(t, base.stored[key]):
            tensors[key] = base.stored[key]
    return Checkpoint(str(folder), "peft", base.config, tensors, base.tokenizer)


def save_factors(folder: Path, weights: dict[str, LowRank], base_source: str) -> Path:
    """Write LoRA factors as a PEFT adapter folder that peft and this loader read back.

    Every module gets one rank r (smaller ones zero-padded) and lora_alpha = r, so the
    scaling is 1: each LowRank's own scale is folded into B.
    """
    r = max(w.rank for w in weights.values())
    tensors = {}
    for name, w in weights.items():
        module = name.removesuffix(".weight")
        a, b = w.a.float(), w.scaled_b(torch.float32)
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.nn.functional.pad(a, (0, 0, 0, r - w.rank)).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.nn.functional.pad(b, (0, r - w.rank)).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for n in weights})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": targets, "lora_dropout": 0.0,
              "bias": "none", "base_model_name_or_path": base_source, "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
