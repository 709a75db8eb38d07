"""Per-slot key/value cache. The engine owns it; each running sequence holds one slot.

Attention over the cache is also an opaque operator, `mergeserve::cache_attention`, for compiled
steps (engine/compiled.py): inductor would turn a write into the ~GB cache tensor into a copy of
all of it every step, so the compiled graph hands the operator only the step's q/k/v and index
tensors, and the operator finds its cache by key.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mergeserve.engine.layers import Batch  # layers imports this module


class KVCache:
    """k, v: [layers, slots + 1, kv_heads, max_len, head_dim], allocated once at full size.

    The buffers are anonymous memory maps: the OS hands out zero pages on first touch, so a
    cache sized for max_num_seqs x max_model_len costs resident memory only for the positions
    written, and never grows or moves. Zeros matter: masked positions still enter attention
    as 0 * value, and garbage could be NaN.
    The extra last slot is scratch space: padding tokens of a batched prefill write there,
    never into a real sequence's slot.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int,
                 windows: tuple[int | None, ...] | None = None):
        """windows: each cache layer's sliding window (None: full attention), for cache_attention."""
        self.max_len = max_len
        self.windows = windows or (None,) * layers
        self.scratch_slot = slots
        self.shape = (layers, slots + 1, kv_heads, max_len, head_dim)
        # NORESERVE: the reservation is address space, not committed memory (a large max_model_len
        # must not be refused by overcommit accounting for pages that are never written).
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        # fp32 whatever the weights: attention runs in fp32 (layers.attention).
        self._maps = [mmap.mmap(-1, max(1, _numel(self.shape) * 4), flags=flags) for _ in range(2)]
        self.k, self.v = (torch.frombuffer(m, dtype=torch.float32, count=_numel(self.shape)).view(self.shape) for m in self._maps)
        self.key = next(_KEYS)
        _CACHES[self.key] = self

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
        write_slots: torch.Tensor, num_keys: int, first_slot: int | None, mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Write k/v [B, KVH, T, Dh] at each token's slot and position ([B, T] each), then attend q
        [B, H, T, Dh] over the first `num_keys` positions of each row's slot: [B, H, T, Dh]."""
        self.write(layer, write_slots, positions, k, v)
        keys, values = self.read(layer, slots, num_keys, first_slot)  # [B, KVH, S, Dh]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots and positions [B, T] (one per token), k/v [B, KVH, T, Dh]."""
        # Advanced indices on dims 0 and 2 put the index dims first: target is [B, T, KVH, Dh].
        self.k[layer][slots, :, positions] = k.transpose(1, 2)
        self.v[layer][slots, :, positions] = v.transpose(1, 2)

    def read(self, layer: int, slots: torch.Tensor, length: int, first_slot: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, length) for each slot: [B, KVH, length, Dh].

        With `first_slot` (the slots are consecutive from there) they are views, not copies.
        """
        if first_slot is not None:
            rows = slice(first_slot, first_slot + len(slots))
            return self.k[layer, rows, :, :length], self.v[layer, rows, :, :length]
        return self.k[layer, slots, :, :length], self.v[layer, slots, :, :length]

    def resident_bytes(self) -> int | None:
        """Bytes of the cache the OS backs right now (pages written at least once), measured with
        mincore(2); None where that cannot be asked (not Linux/glibc)."""
        try:
            return sum(_resident(m) for m in self._maps)
        except (OSError, AttributeError, ValueError):
            return None

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's first `length` positions from slot src to slot dst (all layers)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


# Every live cache by key: the operator below takes ints and tensors only, so it finds its cache
# here (a weak map: a cache goes with its engine).
_CACHES: weakref.WeakValueDictionary[int, KVCache] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


@torch.library.custom_op("mergeserve::cache_attention", mutates_args=())
def cache_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: int, layer: int, slots: torch.Tensor,
    positions: torch.Tensor, chunk_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """KVCache.attend for a compiled step's batch: q [B, H, T, Dh], k/v [B, KVH, T, Dh], slots [B]
    (-1: a padding row, after the real ones), positions [B, T] (a decode step's T = 1). A packed
    prefill (chunk_ids [1, N], slots [N]: Batch.packed) is attended row by row, its chunks
    unpacked. Padding rows attend nothing and return zeros: they are cut from the result."""
    from mergeserve.engine.layers import Batch, unpack  # layers imports this module

    if chunk_ids is not None:
        rows = Batch.unpacked(positions, slots, chunk_ids)
        real = rows.real()  # [C, T]

        def unpacked(x: torch.Tensor) -> torch.Tensor:  # [1, heads, N, Dh] -> [C, heads, T, Dh]
            return unpack(x[0].transpose(0, 1), real).transpose(1, 2)

        out = _attend_rows(_CACHES[cache], layer, unpacked(q), unpacked(k), unpacked(v), rows)  # [C, H, T, Dh]
        return out.transpose(1, 2)[real].transpose(0, 1).unsqueeze(0).contiguous()  # [1, H, N, Dh]
    return _attend_rows(_CACHES[cache], layer, q, k, v, Batch(positions, positions, slots))


def _attend_rows(kv: KVCache, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
    """kv.attend over the rows of `batch` that have a slot (Batch.slotted); zeros for the rest."""
    out = q.new_zeros(q.shape)
    if (sub := batch.slotted()) is None:
        return out
    n = len(sub.slots)
    out[:n] = kv.attend(layer, q[:n], k[:n], v[:n], sub.slots, sub.positions, sub.write_slots(kv.scratch_slot),
                        sub.num_keys(), sub.first_slot, sub.mask(kv.windows[layer]))
    return out


@cache_attention.register_fake
def _(q, k, v, cache, layer, slots, positions, chunk_ids=None):
    return q.new_empty(q.shape)  # contiguous, as the operator's own output (q is a transposed view)


def _resident(m: mmap.mmap) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    pages = (len(m) + page - 1) // page
    vec = (ctypes.c_ubyte * pages)()
    address = ctypes.addressof(ctypes.c_char.from_buffer(m))
    if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(len(m)), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return int(torch.frombuffer(vec, dtype=torch.uint8).bitwise_and(1).sum()) * page  # bit 0: resident


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
