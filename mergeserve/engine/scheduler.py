"""Continuous batching: requests join and leave between steps. Knows nothing about tensors.

Each step either decodes one token for every running sequence or spends a bounded budget
of prompt tokens on prefill, so a long prompt never stalls the decodes for long and a
long generation never blocks a short request from starting. When both have work they take
turns: prefill and decode are separate forwards anyway, and a prefill that runs alone
hands its requests their first token one decode forward sooner (the running sequences
wait for the same two forwards as when one step ran both).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mergeserve.engine.sequence import Sequence


@dataclass
class ScheduledBatch:
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, prompt tokens this step)
    decode: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, max_num_seqs: int, max_prefill_tokens: int):
        self.max_prefill_tokens = max_prefill_tokens
        self.free_slots = list(range(max_num_seqs))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._decode_next = False  # the last step prefilled while sequences were waiting to decode

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop(0)
            self.running.append(seq)
        batch, budget = ScheduledBatch(), self.max_prefill_tokens
        for seq in self.running:
            if seq.awaiting:
                continue
            if not seq.in_prefill:
                batch.decode.append(seq)
            elif budget > 0:
                n = min(budget, len(seq.prompt_ids) - seq.num_cached)
                batch.prefill.append((seq, n))
                budget -= n
        if batch.prefill and batch.decode:
            if self._decode_next:
                batch.prefill = []
            else:
                batch.decode = []
            self._decode_next = not self._decode_next
        else:
            self._decode_next = False
        return batch

    def finish(self, seq: Sequence, reason: str) -> tuple[Sequence, int] | None:
        """Retire `seq`. Running sequences stay on the lowest slots (so a decode batch's slots
        are consecutive and its cache is read as views): when a hole opens below the highest
        running slot, that sequence moves into it. Returns (moved sequence, its old slot) or None;
        the caller moves its cache entries."""
        seq.finish_reason = reason
        moved = None
        if seq in self.running:
            self.running.remove(seq)
            hole = seq.slot
            top = max(self.running, key=lambda s: s.slot, default=None)
            if top is not None and top.slot > hole:
                moved, hole, top.slot = (top, top.slot), top.slot, hole
            self.free_slots.append(hole)
            self.free_slots.sort()
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.slot = None
        return moved

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None
