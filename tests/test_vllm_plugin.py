"""mergeserve's vLLM plugin without vLLM: its registration module imports alone, and the checkpoint
export/lora_moe.py writes, run through the plugin's MLP math (vllm_plugin/lora_moe.py), is the
composition's MoE, on one rank and split over two tensor-parallel ranks. tests/test_vllm_backend.py
serves it in real vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mergeserve.experts import ExpertPool
from mergeserve.export.lora_moe import NotLoraMoE, export_lora_moe
from mergeserve.learn.compose import build
from mergeserve.spec import parse_composition
from mergeserve.vllm_plugin import ARCHITECTURE
from mergeserve.vllm_plugin.lora_moe import FACTORS, expert_terms, route, shard
from mergeserve.weights import dense


def moe_spec(zoo, adapters, **router):
    return parse_composition({
        "name": "moe", "base": str(zoo["base"]), "router": {"kind": "random", "top_k": 2, **router},
        "experts": [{"name": n, "source": str(p)} for n, p in adapters.items()],
    })


def test_the_registration_module_imports_without_vllm() -> None:
    code = ("import sys, mergeserve.vllm_plugin, mergeserve.vllm_plugin.lora_moe; "
            "assert 'vllm' not in sys.modules; print(mergeserve.vllm_plugin.ARCHITECTURE)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == ARCHITECTURE


def reference_moe(x: torch.Tensor, layer, top_k: int) -> torch.Tensor:
    """The composition's MoE FFN from its definition: each token's top-k experts, dense, weighted."""
    top, ids = torch.topk(x @ layer.router.float().t(), top_k, dim=-1)
    w = torch.softmax(top, dim=-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(top_k):
            e = layer.experts[int(ids[t, k])]
            h = F.silu(x[t] @ dense(e.gate_proj).float().t()) * (x[t] @ dense(e.up_proj).float().t())
            out[t] += w[t, k] * (h @ dense(e.down_proj).float().t())
    return out


def plugin_mlp(x: torch.Tensor, tensors: dict, i: int, top_k: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """One tensor-parallel rank's partial MLP output, as the plugin's LoraMoeMLP computes it from the
    checkpoint: gate/up split by rows and down by columns as vLLM's parallel linears split them."""
    p = f"model.layers.{i}.mlp."
    f = {n: shard(tensors[p + n], dim, rank, world) for n, (_, dim) in FACTORS.items()}
    gate_w, up_w = (shard(tensors[p + f"{n}_proj.weight"], 0, rank, world) for n in ("gate", "up"))
    down_w = shard(tensors[p + "down_proj.weight"], 1, rank, world)
    h, down = expert_terms(x, x @ gate_w.t(), x @ up_w.t(), route(x, f["router"], top_k), f)
    return h @ down_w.t() + down


def test_the_exported_moe_through_the_plugins_math_is_the_compositions(zoo, adapters, tmp_path: Path) -> None:
    composed = build(moe_spec(zoo, adapters), ExpertPool())
    export_lora_moe(composed, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE] and config["num_local_experts"] == 3
    assert config["num_experts_per_tok"] == 2 and config["moe_lora_rank"] == 8  # the largest adapter rank
    tensors = load_file(tmp_path / "model.safetensors")
    assert not any("experts" in name for name in tensors)  # no dense expert copies
    torch.manual_seed(0)
    x = torch.randn(7, composed.config.hidden_size)
    for i, layer in enumerate(composed.layers):
        want = reference_moe(x, layer, composed.top_k)
        torch.testing.assert_close(plugin_mlp(x, tensors, i, composed.top_k), want, atol=1e-5, rtol=1e-4)
        split = sum(plugin_mlp(x, tensors, i, composed.top_k, rank, 2) for rank in range(2))  # the all-reduce
        torch.testing.assert_close(split, want, atol=1e-5, rtol=1e-4)
        q = tensors[f"model.layers.{i}.self_attn.q_proj.weight"]  # BTX's averaged attention, materialised
        torch.testing.assert_close(q, dense(layer.attn.q_proj).float(), atol=1e-6, rtol=0)


def test_what_the_plugin_cannot_run_is_refused_naming_why(zoo, adapters, tmp_path: Path) -> None:
    cases = {
        "attention is routed": moe_spec(zoo, adapters, attention="routed"),
        "subspaces": moe_spec(zoo, adapters, kind="arrow"),
        "dense experts": moe_spec(zoo, {n: zoo[n] for n in ("code", "math")}),
    }
    for why, spec in cases.items():
        with pytest.raises(NotLoraMoE, match=why):
            export_lora_moe(build(spec, ExpertPool()), tmp_path / why.replace(" ", "-"))
