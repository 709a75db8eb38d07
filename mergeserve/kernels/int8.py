"""int8 weight-only weights (`dtype: int8`): bf16 weights run as int8 with one bf16 scale per output row.

A run format, not a storage dtype: the pool holds the checkpoints in bfloat16, and an engine
whose composition asks for int8 quantises each full-size weight when it packs it (symmetric,
per output channel, w ~ q * scale with q in [-127, 127]). Low-rank factors run in fp32.
The matmul is torch's `_weight_int8pack_mm`, which takes bf16 activations (with fp32 ones it ran
5-20x slower) and returns bf16.

Measured on a 2-core AMX Xeon (avx512_vnni, avx512_bf16), 240 distinct 1536 x 576 weights (more
than the caches hold), all 240 linears: 1 row fp32 34.8 ms, bf16 37.7 ms, int8 24.0 ms;
8 rows 63.3 / 38.9 / 48.3 ms; 16 rows 101 / 50.3 / 94.5 ms. int8 reads half of bf16's bytes and
wins when one sequence decodes; from 8 rows on its kernel computes slower than oneDNN's bf16.
`dtype: auto` measures it beside the others at 8 rows (kernels/capability.py).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from mergeserve.kernels.lowrank import FACTOR_DTYPE
from mergeserve.kernels.packed import Packed, WeightPacker

log = logging.getLogger(__name__)

# The kernel reads the inner dimension in blocks of 16: at K = 8, 24 or 40 it returned wrong
# values or crashed (torch 2.13, AVX512); weights of other widths run as bf16.
K_MULTIPLE = 16


@dataclass(eq=False)
class Int8(Packed):
    """A [out, in] weight as int8 rows and their scales; `weight` holds the int8 values."""

    scales: torch.Tensor  # [out] bf16

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] -> [..., out] in bf16."""
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()  # [N, in]
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales).view(*x.shape[:-1], -1)
        return y if bias is None else y + bias

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * self.scales.element_size()

    @classmethod
    def of(cls, w: torch.Tensor, keep_source: bool = False) -> Int8:
        """`w` [out, in] quantised; `keep_source` holds `w` (a shared copy, see Packed.source)."""
        q, scales = quantize(w)
        return cls(q, w if keep_source else torch.empty(0, dtype=w.dtype), w.shape, scales)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: q [out, in] int8 and scales [out] bf16, with w ~ q * scales[:, None]."""
    wf = w.float()
    scales = (wf.abs().amax(1) / 127).clamp_min(torch.finfo(torch.bfloat16).tiny).bfloat16()
    # Against the bf16-rounded scale the kernel multiplies by; the clamp catches a scale rounded down.
    q = (wf / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales


@functools.cache
def int8_works() -> bool:
    try:
        w = Int8.of(torch.full((2, K_MULTIPLE), 0.5, dtype=torch.bfloat16))
        out = w(torch.ones(1, K_MULTIPLE))
        return torch.equal(out, torch.full((1, 2), K_MULTIPLE * 0.5, dtype=torch.bfloat16))
    except (RuntimeError, AttributeError):
        return False


def runs_int8(w: torch.Tensor) -> bool:
    """Whether `w` runs as int8 here: a bf16 matrix of a width the kernel takes, on a torch that has it."""
    return w.dtype == torch.bfloat16 and w.dim() == 2 and w.shape[1] % K_MULTIPLE == 0 and int8_works()


class Int8Packer:
    """A WeightPacker's int8 face, for the engines of `dtype: int8` compositions: each full-size
    weight is quantised once and shared, under its own key, with every int8 engine over the same
    tensor (a bf16 engine's packed copy of it stays apart). Weights the kernel cannot run are
    packed as bf16; factor tables run in fp32 beside them."""

    def __init__(self, packer: WeightPacker) -> None:
        self.packer = packer
        if not int8_works():
            log.warning("dtype int8: torch's _weight_int8pack_mm does not run here; the weights run as bfloat16")

    def __call__(self, w: torch.Tensor) -> torch.Tensor | Packed:
        if not runs_int8(w):
            return self.packer(w)
        return self.packer.shared(w, "int8", lambda w: Int8.of(w, keep_source=True))

    def private(self, w: torch.Tensor) -> torch.Tensor | Packed:
        """`w` quantised for one owner (a fused copy of its own), not shared."""
        return Int8.of(w) if runs_int8(w) else self.packer.private(w)

    def factors(self, w: torch.Tensor) -> torch.Tensor:
        """In FACTOR_DTYPE: thin bf16 matmuls are slow unpacked (kernels/lowrank.py)."""
        return w.to(FACTOR_DTYPE)


@dataclass(eq=False)
class Int8Graph:
    """An Int8Packer's face for a compiled step (engine/compiled.py): the same shared int8 copies,
    and every other weight as it is, since a graph freezes plain tensors, not oneDNN packs."""

    int8: Int8Packer

    def __call__(self, w: torch.Tensor) -> torch.Tensor | Int8:
        return self.int8(w) if runs_int8(w) else w

    def private(self, w: torch.Tensor) -> torch.Tensor | Int8:
        return Int8.of(w) if runs_int8(w) else w

    def factors(self, w: torch.Tensor) -> torch.Tensor:
        return self.int8.factors(w)
