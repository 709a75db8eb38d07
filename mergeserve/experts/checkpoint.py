"""A loaded checkpoint, and the checks every loader applies to it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from mergeserve.weights import LowRank, Weight, fuse_in_place, weight_tensors

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Config fields that must agree for two checkpoints to share one architecture.
ARCH_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


class FactoredTensors(Mapping[str, torch.Tensor]):
    """Hugging Face name -> tensor, where factored weights are materialised on each access.

    Code that wants a dense view of a LoRA expert (merges, export, task vectors) reads it
    like any checkpoint's tensors; the dense result is the caller's, never kept here.
    """

    def __init__(self, stored: dict[str, torch.Tensor], factored: dict[str, LowRank]):
        self.stored, self.factored = stored, factored

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.factored:
            return self.factored[key].dense()
        return self.stored[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.stored
        yield from (k for k in self.factored if k not in self.stored)

    def __len__(self) -> int:
        return len(self.stored.keys() | self.factored.keys())


@dataclass
class Checkpoint:
    source: str  # absolute path it was loaded from
    kind: str  # "hf" | "peft" | "gguf"
    config: PretrainedConfig
    stored: dict[str, torch.Tensor]  # Hugging Face names -> the tensors held (for an adapter: mostly the base's)
    tokenizer: PreTrainedTokenizerBase | None
    # LoRA adapters kept as factors: name -> base weight + B @ A; these names are not in `stored`.
    factored: dict[str, LowRank] = field(default_factory=dict)
    # An adapter's own record of the base it was trained on (PEFT's base_model_name_or_path).
    declared_base: str | None = None

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        """Every weight as a dense tensor (factored ones materialised on access)."""
        return FactoredTensors(self.stored, self.factored) if self.factored else self.stored

    def weight(self, key: str) -> Weight:
        """A projection as the engine should hold it: its factors when factored, else the tensor."""
        return self.factored[key] if key in self.factored else self.stored[key]

    def factored_over(self, base: Mapping[str, torch.Tensor], keys: list[str], name: str) -> list[Weight]:
        """The weights `keys`, each the base's own tensor or LoRA factors over it; a dense tensor
        of this checkpoint's own is refused, naming the expert (routed or per-request merged
        layers keep experts as deltas over the base)."""
        ws = []
        for key in keys:
            w = self.weight(key)
            own = w.base if isinstance(w, LowRank) else w
            if own.data_ptr() != base[key].data_ptr():
                raise CheckpointError(
                    f"expert {name!r} ({self.source}): router.attention=routed/dynamic needs LoRA experts over the base, "
                    f"kept as factors; its {key} is a dense tensor of its own (a full fine-tune, an adapter that "
                    "cannot stay factored, or a pool that merges adapters)"
                )
            ws.append(w)
        return ws

    def held(self) -> list[torch.Tensor]:
        """Every tensor this checkpoint keeps alive (shared base tensors included)."""
        return [*self.stored.values(), *(t for w in self.factored.values() for t in weight_tensors(w))]

    def nbytes(self, seen: set[int] | None = None) -> int:
        """Bytes of the storage this checkpoint holds, leaving out storages already in `seen`
        (which it extends): an adapter listed after its base counts only its own factors."""
        seen, total = set() if seen is None else seen, 0
        for t in self.held():
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
        return total


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def arch_signature(config: PretrainedConfig) -> dict[str, object]:
    sig = {f: getattr(config, f, None) for f in ARCH_FIELDS}
    sig["head_dim"] = head_dim(config)
    return sig


def check_same_arch(source: str, config: PretrainedConfig, base_source: str, base: PretrainedConfig) -> None:
    ours, theirs = arch_signature(config), arch_signature(base)
    diff = [f"{k}={ours[k]} vs {theirs[k]}" for k in ours if ours[k] != theirs[k]]
    if diff:
        raise CheckpointError(
            f"{source}: architecture differs from the base {base_source}: " + ", ".join(diff)
        )


def check_model_type(source: str, model_type: object) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def expected_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    d, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * head_dim(config), config.num_key_value_heads * head_dim(config)
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (v, d),
    }
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (i, d),
            p + "mlp.up_proj.weight": (i, d),
            p + "mlp.down_proj.weight": (d, i),
        }
    return shapes


def check_tensors(source: str, config: PretrainedConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor the engine needs is present with the shape the config implies."""
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{source}: missing tensors {missing[:3]}{more}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                f"the config implies {shape}"
            )


def fuse_projections(tensors: dict[str, torch.Tensor], config: PretrainedConfig) -> None:
    """Lay each layer's q/k/v and gate/up weights back to back in one buffer (in place), so the
    engine runs each group as one matmul over the pool's own memory, without a fused copy."""
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        for group in (["q", "k", "v"], ["gate", "up"]):
            keys = [p + (f"self_attn.{x}_proj.weight" if x in "qkv" else f"mlp.{x}_proj.weight") for x in group]
            for key, view in zip(keys, fuse_in_place([tensors[k] for k in keys])):
                tensors[key] = view


def in_dtype(checkpoint: Checkpoint, dtype: torch.dtype) -> Checkpoint:
    """The checkpoint with its floating-point tensors in `dtype`, q/k/v and gate/up kept back to back."""
    if all(t.dtype == dtype for t in checkpoint.stored.values()):
        return checkpoint
    tied = checkpoint.stored.get("lm_head.weight") is checkpoint.stored.get("model.embed_tokens.weight")
    checkpoint.stored = {k: t.to(dtype) if t.is_floating_point() else t for k, t in checkpoint.stored.items()}
    if tied:
        checkpoint.stored["lm_head.weight"] = checkpoint.stored["model.embed_tokens.weight"]
    fuse_projections(checkpoint.stored, checkpoint.config)
    return checkpoint


def refuse_pickles(folder: Path, weights: list[Path]) -> None:
    if weights:
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle weights found ({', '.join(pickles)}); mergeserve never unpickles "
            "checkpoints: convert them to safetensors"
        )
    raise CheckpointError(f"{folder}: no *.safetensors weights found")


def hf_module(checkpoint: Checkpoint) -> torch.nn.Module:
    """The checkpoint as a transformers model whose parameters are its own tensors (no copy)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(checkpoint.config, dtype=torch.float32)
    # assign=True makes the module's parameters *be* the checkpoint's tensors.
    model.load_state_dict(checkpoint.tensors, strict=False, assign=True)
    if checkpoint.config.tie_word_embeddings:
        model.tie_weights()
    # Buffers are not in the state dict: rebuild the rotary tables off the meta device.
    model.model.rotary_emb = type(model.model.rotary_emb)(checkpoint.config)
    return model
