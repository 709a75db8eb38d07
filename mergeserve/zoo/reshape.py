"""New shapes of the zoo's base, for experts of other sizes and architectures (the
heterogeneous zoo): a depth-pruned Llama, and the same weights as a Qwen2 model.

- `prune_depth`: drop a contiguous block of deep layers and keep the last one, as Gromov et
  al. ("The Unreasonable Ineffectiveness of the Deeper Layers") find least harmful; a short
  fine-tune then heals the cut.
- `to_qwen2`: Qwen2 is Llama with biases on q/k/v; with those biases at zero the converted
  model computes exactly what the Llama did, and fine-tuning then trains them too.
"""

from __future__ import annotations

import copy

import torch
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def kept_layers(n_layers: int, keep: int) -> list[int]:
    """The layers a depth pruning to `keep` keeps: the first keep - 1 and the last."""
    if not 1 <= keep < n_layers:
        raise ValueError(f"keep {keep} of {n_layers} layers: give 1 to {n_layers - 1}")
    return [*range(keep - 1), n_layers - 1]


def prune_depth(model: LlamaForCausalLM, keep: int) -> LlamaForCausalLM:
    config = copy.deepcopy(model.config)
    kept = kept_layers(config.num_hidden_layers, keep)
    config.num_hidden_layers = keep
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    pruned = LlamaForCausalLM(config)
    renamed = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.layers."):
            _, _, index, rest = key.split(".", 3)
            if int(index) not in kept:
                continue
            key = f"model.layers.{kept.index(int(index))}.{rest}"
        renamed[key] = value
    pruned.load_state_dict(renamed)
    return pruned


def to_qwen2(model: LlamaForCausalLM) -> Qwen2ForCausalLM:
    c = model.config
    config = Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters, tie_word_embeddings=c.tie_word_embeddings,
        hidden_act=c.hidden_act, use_sliding_window=False,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
    )
    qwen = Qwen2ForCausalLM(config)
    missing, unexpected = qwen.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for k in missing):
        raise ValueError(f"Llama -> Qwen2: unexpected {unexpected}, missing {missing}")
    with torch.no_grad():
        for key in missing:
            qwen.get_parameter(key).zero_()
    return qwen
