"""Weight formats: bf16 compositions (packed for oneDNN where it works) against fp32, and `auto`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mergeserve.engine.engine import Engine
from mergeserve.engine.sequence import SamplingParams
from mergeserve.experts import ExpertPool
from mergeserve.kernels import capability
from mergeserve.kernels.packed import WeightPacker, packing_works
from mergeserve.merge import build
from mergeserve.spec import EngineConfig, parse_composition

TEXTS = ("def add(a, b):\n    return a + b\n", "Die Katze schläft im Haus.", "What is 12 + 7?")


def test_a_packed_bf16_weight_computes_what_f_linear_does():
    packer = WeightPacker()
    if not packer.enabled:
        pytest.skip("oneDNN packing is not available on this machine")
    w = torch.randn(96, 64).bfloat16()
    x = torch.randn(2, 5, 64)  # fp32 input: cast to the weight's dtype
    packed = packer(w)
    assert packer(w) is packed and len(packer) == 1  # packed once, shared
    torch.testing.assert_close(packed(x), F.linear(x.bfloat16(), w), atol=1e-2, rtol=1e-2)
    fp32 = torch.randn(3, 3)
    assert packer(fp32) is fp32  # fp32 stays plain: oneDNN gains little there and rounds differently


def test_a_bf16_lora_moe_follows_its_fp32_twin(zoo, adapters):
    engines = {dt: Engine(build(parse_composition({
        "name": "moe", "base": str(zoo["base"]), "router": {"kind": "random", "top_k": 2}, "dtype": dt,
        "experts": [{"name": n, "source": str(p)} for n, p in adapters.items()],
    }), ExpertPool()), EngineConfig(max_num_seqs=4, max_model_len=128)) for dt in ("float32", "bfloat16")}
    prompts = [engines["float32"].tokenizer(t)["input_ids"] for t in TEXTS]
    assert engines["bfloat16"].composed.embed.dtype == torch.bfloat16
    assert bool(engines["bfloat16"].model.packed()) == packing_works()
    for ids in prompts:
        fp32, bf16 = (torch.log_softmax(e.logits(ids), -1) for e in engines.values())
        assert bf16.dtype == torch.float32
        assert (bf16 - fp32).abs().mean() < 0.05 * fp32.abs().mean()
        assert (bf16.argmax(-1) == fp32.argmax(-1)).float().mean() > 0.8
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert all(len(out) == 8 for out in engines["bfloat16"].generate(prompts, params))


def test_auto_picks_float32_without_bf16_instructions(monkeypatch):
    capability.fastest_dtype.cache_clear()
    monkeypatch.setattr(capability, "cpu_flags", lambda: {"avx2", "fma"})
    try:
        assert capability.resolve_dtype("auto") == torch.float32
    finally:
        capability.fastest_dtype.cache_clear()
    assert capability.resolve_dtype("bfloat16") == torch.bfloat16


def test_auto_measures_when_the_cpu_has_bf16(monkeypatch):
    capability.fastest_dtype.cache_clear()
    monkeypatch.setattr(capability, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(capability, "_linear_seconds", lambda dtype: 1.0 if dtype == torch.float32 else 0.5)
    try:
        assert capability.resolve_dtype("auto") == torch.bfloat16
    finally:
        capability.fastest_dtype.cache_clear()


@pytest.mark.parametrize("tokens", [1, 5])  # a decode step and a small prefill
def test_the_packed_lora_kernel_with_fused_tables_equals_the_plain_one(tokens: int):
    from mergeserve.composition import ExpertFFN, LowRank
    from mergeserve.kernels import LoraExperts, lora_moe_ffn

    packer = WeightPacker()
    if not packer.enabled:
        pytest.skip("oneDNN packing is not available on this machine")
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(*shape, generator=g).bfloat16() for shape in ((48, 32), (48, 32), (32, 48))]
    experts = [ExpertFFN(*(LowRank(w, torch.randn(r, w.shape[1], generator=g), torch.randn(w.shape[0], r, generator=g), 0.5)
                           for w in base)) for r in (2, 4, 3)]
    plain = LoraExperts.build(experts)
    fused = plain.packed(packer)
    assert fused.fused is not None
    x, ids = torch.randn(5, 32, generator=g), torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0]])
    weights = torch.rand(5, 2, generator=g)
    x, ids, weights = x[:tokens], ids[:tokens], weights[:tokens]
    expected = lora_moe_ffn(x, weights, ids, plain).float()
    torch.testing.assert_close(lora_moe_ffn(x, weights, ids, fused).float(), expected, atol=0.05 * expected.abs().max().item(), rtol=0)
