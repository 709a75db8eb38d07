"""mergeserve's token-routed LoRA-expert MoE as a vLLM model (export/lora_moe.py writes its checkpoints).

vLLM's Llama with one change: each layer's MLP is the LoRA-expert MoE of lora_moe.py. Attention,
norms, rotary embedding, the KV cache, scheduling, compilation and tensor parallelism are vLLM's
own; BTX's averaged attention arrives materialised in the checkpoint's q/k/v/o weights.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import (get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_reduce)
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.utils import set_weight_attrs

from mergeserve.vllm_plugin.lora_moe import FACTORS, expert_terms, route, shard


class LoraMoeMLP(nn.Module):
    def __init__(self, config, prefix: str = "") -> None:
        super().__init__()
        self.tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        d, i, e, r = config.hidden_size, config.intermediate_size, config.num_local_experts, config.moe_lora_rank
        if i % self.tp:
            raise ValueError(f"intermediate_size {i} does not split over {self.tp} tensor-parallel ranks")
        self.top_k = config.num_experts_per_tok
        self.gate_up_proj = MergedColumnParallelLinear(d, [i, i], bias=False, prefix=f"{prefix}.gate_up_proj")
        # Not reduced here: the experts' down terms join the partial sums before the one all-reduce.
        self.down_proj = RowParallelLinear(i, d, bias=False, reduce_results=False, prefix=f"{prefix}.down_proj")
        shapes = {"router": (e, d), "gate_a": (e, r, d), "gate_b": (e, i, r), "up_a": (e, r, d), "up_b": (e, i, r),
                  "down_a": (e, r, i), "down_b": (e, d, r)}
        for name, shape in shapes.items():
            dim = FACTORS[name][1]
            local = list(shape)
            if dim is not None:
                local[dim] //= self.tp
            dtype = torch.float32 if name == "router" else None  # routing in fp32, as mergeserve's engine
            param = nn.Parameter(torch.empty(local, dtype=dtype), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": partial(_load_shard, dim=dim, rank=rank, world=self.tp)})
            self.register_parameter(name, param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = route(x, self.router, self.top_k)  # [T, E]
        gu, _ = self.gate_up_proj(x)
        g, u = gu.chunk(2, dim=-1)
        h, down = expert_terms(x, g, u, gate, {n: getattr(self, n) for n in FACTORS if n != "router"})
        out, _ = self.down_proj(h)
        out = out + down
        return tensor_model_parallel_all_reduce(out) if self.tp > 1 else out


def _load_shard(param: torch.Tensor, loaded: torch.Tensor, dim: int | None, rank: int, world: int) -> None:
    part = shard(loaded, dim, rank, world)
    if part.shape != param.shape:
        raise ValueError(f"a LoRA-MoE factor of shape {tuple(loaded.shape)} does not fit its parameter {tuple(param.shape)}")
    param.data.copy_(part)


class LoraMoeDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None, **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config, **kwargs)
        self.mlp = LoraMoeMLP(config or vllm_config.model_config.hf_config, prefix=f"{prefix}.mlp")


class LoraMoeForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=LoraMoeDecoderLayer)
