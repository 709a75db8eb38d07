"""Per-slot key/value cache. The engine owns it; each running sequence holds one slot."""

from __future__ import annotations

import torch


class KVCache:
    """k, v: [layers, slots + 1, kv_heads, capacity, head_dim]; capacity grows by doubling up to max_len.

    The extra last slot is scratch space: padding tokens of a batched prefill write there,
    never into a real sequence's slot.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int, initial: int = 256):
        self.max_len = max_len
        self.scratch_slot = slots
        self.shape = (layers, slots + 1, kv_heads, min(initial, max_len), head_dim)
        # Zeros, not empty: masked positions still enter attention as 0 * value, and garbage could be NaN.
        self.k = torch.zeros(self.shape)
        self.v = torch.zeros(self.shape)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, length: int) -> None:
        """Make room for positions [0, length)."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds max_model_len={self.max_len}")
        new = min(self.max_len, max(length, 2 * self.capacity))
        for name in ("k", "v"):
            old = getattr(self, name)
            grown = torch.zeros(old.shape[:3] + (new, old.shape[4]))
            grown[:, :, :, : old.shape[3]] = old
            setattr(self, name, grown)

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots and positions [B, T] (one per token), k/v [B, KVH, T, Dh]."""
        # Advanced indices on dims 0 and 2 put the index dims first: target is [B, T, KVH, Dh].
        self.k[layer][slots, :, positions] = k.transpose(1, 2)
        self.v[layer][slots, :, positions] = v.transpose(1, 2)

    def read(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, length) for each slot: [B, KVH, length, Dh]."""
        return self.k[layer, slots, :, :length], self.v[layer, slots, :, :length]
