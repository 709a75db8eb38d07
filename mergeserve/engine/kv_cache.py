"""Per-slot key/value cache. The engine owns it; each running sequence holds one slot."""

from __future__ import annotations

import ctypes
import mmap

import torch


class KVCache:
    """k, v: [layers, slots + 1, kv_heads, max_len, head_dim], allocated once at full size.

    The buffers are anonymous memory maps: the OS hands out zero pages on first touch, so a
    cache sized for max_num_seqs x max_model_len costs resident memory only for the positions
    written, and never grows or moves. Zeros matter: masked positions still enter attention
    as 0 * value, and garbage could be NaN.
    The extra last slot is scratch space: padding tokens of a batched prefill write there,
    never into a real sequence's slot.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int):
        self.max_len = max_len
        self.scratch_slot = slots
        self.shape = (layers, slots + 1, kv_heads, max_len, head_dim)
        # NORESERVE: the reservation is address space, not committed memory (a large max_model_len
        # must not be refused by overcommit accounting for pages that are never written).
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        # fp32 whatever the weights: attention runs in fp32 (layers.attention).
        self._maps = [mmap.mmap(-1, max(1, _numel(self.shape) * 4), flags=flags) for _ in range(2)]
        self.k, self.v = (torch.frombuffer(m, dtype=torch.float32, count=_numel(self.shape)).view(self.shape) for m in self._maps)

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
