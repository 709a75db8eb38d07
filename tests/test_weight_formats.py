"""Weight formats: bf16 compositions (packed for oneDNN where it works) and int8 ones against fp32, and `auto`.

Bounds follow bf16's rounding: it keeps 8 significant bits, so rounding to nearest moves a
value by at most U = 2^-8 of itself (EPS = 2^-7 is the gap above 1.0).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import ALL_PROJECTIONS, make_adapter, make_checkpoint

from mergeserve.composition import ComposedModel

from mergeserve.weights import ExpertFFN, LowRank

from mergeserve.engine.engine import Engine
from mergeserve.engine.layers import Batch, rms_norm
from mergeserve.engine.model import Capture, Transformer
from mergeserve.engine.sequence import SamplingParams
from mergeserve.experts import ExpertPool
from mergeserve.kernels import LoraExperts, capability, lora_moe_ffn, top_k_experts
from mergeserve.kernels.int8 import Int8, Int8Packer, int8_works
from mergeserve.kernels.packed import WeightPacker, packing_works
from mergeserve.learn.compose import build
from mergeserve.spec import ServeConfig, SpecError, parse_composition

EPS = torch.finfo(torch.bfloat16).eps  # 2^-7
U = EPS / 2  # bf16's unit roundoff
FP32_U = torch.finfo(torch.float32).eps / 2  # 2^-24

# One layer of the bf16 LoRA MoE against the same layer in fp32, both fed the fp32 model's
# stream: the error of the layer's update (stream after minus stream before), relative to that
# update. About a dozen bf16 roundings lie on its path (activations cast to bf16; q/k/v, o,
# gate/up, their LoRA deltas and down rounded on output; the adds, silu, product and routing-
# weighted sum in the LoRA kernel; the weights themselves), each a relative error of at most U
# with a random sign: they add in quadrature to about sqrt(12) * U / sqrt(3) = 2U = EPS, and
# 1.0-2.3 EPS is measured (six seeds, plain and packed). 4 EPS leaves ~2x that for other CPUs'
# summation orders; a wrong layer shows as 6.0-6.5 EPS (its down projection 10 % off) and 155 EPS
# (two experts swapped).
LAYER_BOUND = 4 * EPS
MAX_ROUTE_FLIPS = 0.02  # tokens whose top-k experts bf16 changes (near-ties of the router): left out of a layer's error


@pytest.fixture(scope="module")
def deep_lora(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A 4-layer tiny Llama and three LoRA adapters over it (ranks 4, 8 with rsLoRA, 6 without o/k/down)."""
    root = tmp_path_factory.mktemp("deep")
    base = make_checkpoint(root / "base", "llama", seed=0, layers=4)
    return base, {
        "math": make_adapter(base, root / "math", 1, ALL_PROJECTIONS, r=4),
        "code": make_adapter(base, root / "code", 2, ALL_PROJECTIONS, r=8, use_rslora=True, rank_pattern={"down_proj": 2}),
        "german": make_adapter(base, root / "german", 3, ["q_proj", "v_proj", "gate_proj", "up_proj"], r=6),
    }


def lora_moe(deep_lora, dtype: str, pack: WeightPacker | None = None, perturb=None) -> Transformer:
    """The LoRA experts as a top-2 MoE's forward (`pack`: a WeightPacker, None runs the weights as
    they are); `perturb(composed)` edits the composition before the forward packs it."""
    base, adapters = deep_lora
    composed = build(parse_composition({
        "name": "moe", "base": str(base), "router": {"kind": "random", "top_k": 2}, "dtype": dtype,
        "experts": [{"name": n, "source": str(p)} for n, p in adapters.items()],
    }), ExpertPool())
    if perturb is not None:
        perturb(composed)
    return Transformer(composed, 128, pack)


def random_batch(vocab: int, rows: int = 4, length: int = 128) -> Batch:
    """rows x length random tokens (512 positions), whole sequences without a cache."""
    tokens = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    return Batch(tokens, torch.arange(length).expand_as(tokens), None)


@torch.inference_mode()
def next_token_logprobs(*models: Transformer, batch: Batch) -> list[torch.Tensor]:
    """Each model's next-token log-probabilities [B, T, V] with the batch's rows on fixed experts
    (two each): precision alone, without the router's near-ties, which flip a token's experts."""
    alpha = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.6, 0.4], [0.7, 0.0, 0.3], [0.2, 0.8, 0.0]])[: len(batch.tokens)]
    fixed = Batch(batch.tokens, batch.positions, None, alpha=alpha)
    return [torch.log_softmax(m.logits(m(fixed)), -1) for m in models]


def run_layer(model: Transformer, i: int, x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer i alone on the stream x [B, T, D] as Transformer.forward runs it: the stream after
    it, and its router's input [B * T, D]."""
    run, eps = model.run_layers[i], model.args.eps
    cos, sin = model.cos[batch.positions].unsqueeze(1), model.sin[batch.positions].unsqueeze(1)
    x = x + model.attend(i, run, rms_norm(x, run.input_norm, eps), cos, sin, batch.mask(model.args.windows[i]), batch, None)
    normed = rms_norm(x, run.post_attn_norm, eps)
    return x + model._ffn(i, run, normed, batch, None), normed.reshape(-1, normed.shape[-1])


@torch.inference_mode()
def layer_errors(ref: Transformer, run: Transformer, batch: Batch) -> tuple[list[float], list[int]]:
    """Each layer of `run` and of `ref` on `ref`'s stream before it: the relative error of the
    layer's update over the tokens both route alike, and how many tokens they route apart."""
    capture = Capture(layers=[])
    ref(batch, capture=capture)
    streams = [F.embedding(batch.tokens, ref.composed.embed).float(), *capture.layers]  # [L + 1] x [B, T, D]
    errors, flips = [], []
    for i in range(len(ref.run_layers)):
        x = streams[i]
        (want, want_in), (got, got_in) = (run_layer(m, i, x, batch) for m in (ref, run))
        torch.testing.assert_close(want, streams[i + 1], rtol=0, atol=1e-6)  # run_layer is the forward's own layer
        router = ref.run_layers[i].layer.router
        same = (top_k_experts(want_in, router, ref.top_k)[1].sort(-1).values == top_k_experts(got_in, router, ref.top_k)[1].sort(-1).values).all(-1)
        same = same.view(x.shape[:2])
        errors.append(((got - want)[same].norm() / (want - x)[same].norm()).item())
        flips.append(int((~same).sum()))
    return errors, flips


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_every_layer_of_a_bf16_lora_moe_stays_within_bf16_rounding_of_fp32(deep_lora, packed: bool):
    if packed and not packing_works():
        pytest.skip("oneDNN packing is not available on this machine (the plain bf16 path is checked)")
    fp32, bf16 = lora_moe(deep_lora, "float32"), lora_moe(deep_lora, "bfloat16", WeightPacker() if packed else None)
    assert bf16.composed.embed.dtype == torch.bfloat16 and bool(bf16.packed()) == packed
    batch = random_batch(len(fp32.composed.tokenizer))
    errors, flips = layer_errors(fp32, bf16, batch)
    assert max(errors) <= LAYER_BOUND, [f"{e / EPS:.2f} EPS" for e in errors]
    assert max(flips) <= MAX_ROUTE_FLIPS * batch.tokens.numel(), flips

    p, q = next_token_logprobs(fp32, bf16, batch=batch)
    # r = 8 EPS: the final stream's relative error carries every layer's (4.1 EPS measured after
    # 4 layers); twice that bounds the mean KL (0.2-0.7 of it over five seeds; the largest single
    # position varies too much with the seed to bound). A layer 10 % off stays under it: the
    # per-layer bound is what catches that.
    assert_next_tokens_close(p, q, r=8 * EPS, min_clear=256)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert all(len(out) == 8 for out in Engine(bf16.composed).generate([[5, 6, 7]], params))


def assert_next_tokens_close(p: torch.Tensor, q: torch.Tensor, r: float, min_clear: int) -> None:
    """Next-token log-probabilities q [B, T, V] against fp32's p, for a final stream of relative
    error r: the mean KL within its bound, and the same token wherever fp32's is clearly ahead."""
    kl = (p.exp() * (p - q)).sum(-1)  # [B, T]
    # KL(p || q) ~ Var_p(dz) / 2 for small logit changes dz, and dz ~ r * sigma: sigma the logits' spread.
    sigma = (p - p.mean(-1, keepdim=True)).std(-1).mean()
    assert kl.mean() <= (r * sigma) ** 2 / 2, (kl.mean(), (r * sigma) ** 2 / 2)
    # The random model's next-token distributions are nearly flat (median top-2 gap 0.19 nats), so
    # ~5 % of positions are near-ties that any rounding flips. Where fp32's lead is more than twice
    # what logit changes of r * sigma can close (sqrt(2) r sigma), the same token wins.
    top2 = p.topk(2, -1).values
    clear = top2[..., 0] - top2[..., 1] > 2 * 2**0.5 * r * sigma
    agree = p.argmax(-1) == q.argmax(-1)
    assert clear.sum() >= min_clear and agree[clear].float().mean() >= 0.98, (int(clear.sum()), agree[clear].float().mean())


def down_off_by_10_percent(composed: ComposedModel) -> None:
    composed.layers[2].experts[0].down_proj.base.mul_(1.1)  # the base down projection the experts share


def experts_swapped(composed: ComposedModel) -> None:
    experts = composed.layers[2].experts
    experts[0], experts[1] = experts[1], experts[0]


@pytest.mark.parametrize("perturb", [down_off_by_10_percent, experts_swapped])
def test_a_wrong_layer_is_caught_at_that_layer(deep_lora, perturb):
    fp32, bf16 = lora_moe(deep_lora, "float32"), lora_moe(deep_lora, "bfloat16", perturb=perturb)
    errors, _ = layer_errors(fp32, bf16, random_batch(len(fp32.composed.tokenizer)))
    assert [e > LAYER_BOUND for e in errors] == [False, False, True, False], [f"{e / EPS:.2f} EPS" for e in errors]


def test_a_packed_bf16_weight_computes_what_f_linear_does_to_bf16_rounding():
    packer = WeightPacker()
    if not packer.enabled:
        pytest.skip("oneDNN packing is not available on this machine")
    g, k = torch.Generator().manual_seed(0), 576
    w = torch.randn(96, k, generator=g).bfloat16()
    x = torch.randn(2, 5, k, generator=g)  # fp32 input: cast to the weight's dtype
    packed = packer(w)
    assert packer(w) is packed and len(packer) == 1  # packed once, shared
    # Against fp32 on the same bf16-rounded inputs, a bf16 matmul accumulating in fp32 is off only
    # by its fp32 sum (at most K * FP32_U of sum |x_i w_i|, Higham's gamma_K) and the rounding of
    # the result to bf16 (at most U of it): a bound per element, with no slack. (Against the
    # unrounded fp32 x it would be ~EPS * sqrt(K) * |x| |w|, the inputs' rounding, and say little.)
    xr, wr = x.bfloat16().float(), w.float()
    want = xr @ wr.T
    bound = U * want.abs() + (1 + U) * k * FP32_U * (xr.abs() @ wr.abs().T)
    for got in (packed(x), F.linear(x.bfloat16(), w)):
        assert got.dtype == torch.bfloat16 and bool(((got.float() - want).abs() <= bound).all())
    fp32 = torch.randn(3, 3)
    assert packer(fp32) is fp32  # fp32 stays plain: oneDNN gains little there and rounds differently


@pytest.mark.parametrize("tokens", [1, 5])  # a decode step and a small prefill
def test_the_lora_kernel_plain_and_with_fused_packed_tables_stays_within_bf16_rounding_of_fp32(tokens: int):
    packer = WeightPacker()
    if not packer.enabled:
        pytest.skip("oneDNN packing is not available on this machine")
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(*shape, generator=g).bfloat16() for shape in ((96, 64), (96, 64), (64, 96))]
    experts = [ExpertFFN(*(LowRank(w, torch.randn(r, w.shape[1], generator=g), torch.randn(w.shape[0], r, generator=g), 0.5)
                           for w in base)) for r in (2, 4, 3)]
    plain = LoraExperts.build(experts)
    fused = plain.packed(packer)
    assert fused.fused is not None
    x, ids = torch.randn(5, 64, generator=g), torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0]])
    weights = torch.rand(5, 2, generator=g)
    x, ids, weights = x[:tokens], ids[:tokens], weights[:tokens]
    # The reference: the kernel in fp32 over the same bf16 tables and bf16-rounded inputs, so only
    # the bf16 kernels' own roundings differ: about eight in sequence (gate/up and their deltas,
    # the adds, silu, the product, the weighted sum, down and its delta), each at most U of its
    # value with a random sign, adding in quadrature to ~1.6 U of the output (1.0-1.7 U measured
    # over seeds). 4 U = 2 EPS bounds the whole output's relative error (the old bound, 5 % of its
    # largest value, was 13 U); single elements near zero carry the same absolute error, so the
    # bound is on the norm.
    tables = ("gate_up", "down", "a_in", "b_gate", "b_up", "a_down", "b_down")
    reference = LoraExperts(**{**vars(plain), **{n: getattr(plain, n).float() for n in tables}})
    want = lora_moe_ffn(x.bfloat16().float(), weights.bfloat16().float(), ids, reference)
    for lx in (plain, fused):
        got = lora_moe_ffn(x, weights, ids, lx)
        assert got.dtype == torch.bfloat16
        assert (got.float() - want).norm() <= 4 * U * want.norm()


needs_int8 = pytest.mark.skipif(not int8_works(), reason="torch's _weight_int8pack_mm does not run here")


def test_int8_is_a_dtype_of_the_spec_and_of_the_serve_config():
    experts = [{"name": "a", "source": "a"}]
    assert parse_composition({"name": "c", "base": "b", "experts": experts, "dtype": "int8"}).dtype == "int8"
    assert ServeConfig(dtype="int8", state_dir="state").dtype == "int8"
    with pytest.raises(SpecError, match="'auto', 'float32', 'bfloat16' or 'int8'"):
        parse_composition({"name": "c", "base": "b", "experts": experts, "dtype": "int4"})
    assert capability.resolve_dtype("int8") == torch.bfloat16  # held in bf16, run as int8


@needs_int8
def test_an_int8_weight_is_its_rows_in_127_steps_of_their_largest_value():
    g, k = torch.Generator().manual_seed(0), 576
    w = torch.randn(96, k, generator=g).bfloat16()
    q = Int8.of(w)
    step = q.scales.float()[:, None]  # [out, 1]
    assert q.weight.dtype == torch.int8 and int(q.weight.abs().max()) == 127
    # Rounding to the nearest step moves a value by at most half a step (the step is rounded to
    # bf16, so a row's largest value may land 127.5 steps out and be clamped: still half a step).
    assert bool(((q.weight.float() * step - w.float()).abs() <= step / 2 * (1 + EPS)).all())
    # The matmul computes what fp32 does over the dequantised weight and bf16-rounded inputs, to its
    # fp32 sum and the result's rounding to bf16 (as for a packed bf16 weight above).
    x = torch.randn(2, 5, k, generator=g)
    xr, wr = x.bfloat16().float(), q.weight.float() * step
    want = xr @ wr.T
    bound = U * want.abs() + (1 + U) * k * FP32_U * (xr.abs() @ wr.abs().T)
    got = q(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 5, 96)
    assert bool(((got.float() - want).abs() <= bound).all())


@needs_int8
def test_int8_copies_are_shared_between_int8_engines_and_kept_apart_from_bf16_packs():
    packer = WeightPacker()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g).bfloat16()
    q = Int8Packer(packer)(w)
    assert isinstance(q, Int8) and Int8Packer(packer)(w) is q  # another int8 engine over the same tensor
    bf16 = packer(w)
    assert not isinstance(bf16, Int8) and (bf16 is w) != packer.enabled  # a bf16 engine's own pack
    narrow = torch.randn(96, 40, generator=g).bfloat16()  # a width the int8 kernel does not take
    assert not isinstance(Int8Packer(packer)(narrow), Int8)
    factors = torch.randn(8, 64, generator=g).bfloat16()
    assert Int8Packer(packer).factors(factors).dtype == torch.float32  # LoRA factors run in fp32, unquantised


# The int8 step is a row's largest value over 127: for rows of 64-96 Gaussian values (largest
# ~2.5-2.9 sigma) a uniform error of ~0.66 % of sigma per weight, about 3x bf16's rounding of it,
# while the activations' and outputs' bf16 roundings stay. Each layer's error is 0.95-2.0x bf16's
# (five seeds; 1.1-3.9 EPS), and the final stream's grows from 3.5-5.7 EPS to 5.6-7.4 EPS.
INT8_OVER_BF16 = 2.5  # a layer's error, int8's over bf16's
INT8_R = 12 * EPS  # bounds the final stream's relative error, as 8 EPS does bf16's


@needs_int8
def test_an_int8_lora_moe_stays_within_a_few_times_bf16s_error_of_fp32(deep_lora):
    fp32, bf16 = lora_moe(deep_lora, "float32"), lora_moe(deep_lora, "bfloat16", WeightPacker())
    engine = Engine(lora_moe(deep_lora, "int8").composed)  # the engine packs: it runs the weights as int8
    int8 = engine.runner.model
    assert int8.composed.int8 and int8.composed.embed.dtype == torch.bfloat16
    # q/k/v, o, gate/up and down of 4 layers and the lm_head; the fused LoRA tables are not built.
    assert len(int8.packed()) == 17 and all(isinstance(p, Int8) for p in int8.packed())
    batch = random_batch(len(fp32.composed.tokenizer))
    (bf16_errors, _), (errors, flips) = layer_errors(fp32, bf16, batch), layer_errors(fp32, int8, batch)
    assert all(e <= INT8_OVER_BF16 * b for e, b in zip(errors, bf16_errors)), [f"{e / b:.2f}" for e, b in zip(errors, bf16_errors)]
    assert max(flips) <= MAX_ROUTE_FLIPS * batch.tokens.numel(), flips

    p, q = next_token_logprobs(fp32, int8, batch=batch)
    assert_next_tokens_close(p, q, r=INT8_R, min_clear=128)  # bounded as for bf16, with int8's stream error
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert all(len(out) == 8 for out in engine.generate([[5, 6, 7]], params))


def test_auto_never_picks_bf16_without_bf16_instructions_and_measures_the_rest(monkeypatch):
    measured = []

    def seconds(fmt: str, rows: int = 8) -> float:
        measured.append(fmt)
        return {"float32": 1.0, "bfloat16": 0.1, "int8": 2.0}[fmt]

    capability.fastest_format.cache_clear()
    monkeypatch.setattr(capability, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(capability, "_linear_seconds", seconds)
    try:
        assert capability.resolve_dtype("auto") == torch.float32
        assert "bfloat16" not in measured and "float32" in measured
    finally:
        capability.fastest_format.cache_clear()
    assert capability.resolve_dtype("bfloat16") == torch.bfloat16


def test_auto_weighs_a_prefill_chunk_beside_the_decode_batch(monkeypatch):
    """int8 on AVX2: faster at a decode batch, far slower at a prefill chunk: fp32 overall."""
    capability.fastest_format.cache_clear()
    monkeypatch.setattr(capability, "cpu_flags", lambda: {"avx2", "fma"})
    per_rows = {"float32": {8: 12.7, 64: 46.7}, "int8": {8: 10.5, 64: 95.7}}
    monkeypatch.setattr(capability, "_linear_seconds", lambda fmt, rows=8: per_rows[fmt][rows])
    try:
        assert capability.resolve_format("auto") == "float32"
    finally:
        capability.fastest_format.cache_clear()


@needs_int8
def test_auto_picks_int8_without_bf16_instructions_where_it_measures_fastest(monkeypatch):
    capability.fastest_format.cache_clear()
    monkeypatch.setattr(capability, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(capability, "_linear_seconds", lambda fmt, rows=8: {"float32": 1.0, "int8": 0.8}[fmt])
    try:
        assert capability.resolve_format("auto") == "int8"
    finally:
        capability.fastest_format.cache_clear()


def test_auto_measures_when_the_cpu_has_bf16(monkeypatch):
    capability.fastest_format.cache_clear()
    monkeypatch.setattr(capability, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(capability, "_linear_seconds", lambda fmt, rows=8: {"float32": 1.0, "bfloat16": 0.5, "int8": 0.7}[fmt])
    try:
        assert capability.resolve_dtype("auto") == torch.bfloat16
    finally:
        capability.fastest_format.cache_clear()


def test_auto_holds_int8_weights_in_bf16_where_int8_measures_fastest(monkeypatch):
    capability.fastest_format.cache_clear()
    monkeypatch.setattr(capability, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(capability, "_linear_seconds", lambda fmt, rows=8: {"float32": 1.0, "bfloat16": 0.5, "int8": 0.3}[fmt])
    try:
        assert capability.resolve_format("auto") == ("int8" if int8_works() else "bfloat16")
        assert capability.resolve_dtype("auto") == torch.bfloat16
    finally:
        capability.fastest_format.cache_clear()


def test_auto_measured_here_names_a_format():
    capability.fastest_format.cache_clear()
    try:
        assert capability.resolve_format("auto") in capability.FORMATS
        assert capability.resolve_dtype("auto") in (torch.float32, torch.bfloat16)
    finally:
        capability.fastest_format.cache_clear()


@needs_int8
def test_a_serve_config_of_dtype_int8_runs_its_compositions_as_int8(deep_lora):
    from live import wait_until

    from mergeserve.server.serve import start

    base, adapters = deep_lora
    spec = {"name": "moe", "base": str(base), "router": {"kind": "random", "top_k": 2},
            "experts": [{"name": n, "source": str(p)} for n, p in adapters.items()]}  # no dtype of its own
    registry, builder, executor = start(ServeConfig(dtype="int8", compositions=[spec]))
    try:
        wait_until(lambda: registry.names() == ["moe"], timeout=120, what="the composition to be built")
        (backend,) = registry.backends()
        model = backend.engine.runner.model
        assert model.composed.int8 and model.composed.embed.dtype == torch.bfloat16
        assert model.packed() and all(isinstance(p, Int8) for p in model.packed())
    finally:
        builder.shutdown()
        executor.stop()
