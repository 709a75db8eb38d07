"""The scheduler alone (no tensors): who prefills and who decodes in each step."""

from __future__ import annotations

from mergeserve.engine.scheduler import Scheduler
from mergeserve.engine.sequence import SamplingParams, Sequence


def prefilled(seq: Sequence) -> Sequence:
    seq.num_cached = len(seq.prompt_ids)
    return seq


def test_a_prompt_that_arrives_while_others_decode_is_prefilled_alone_then_everyone_decodes() -> None:
    scheduler = Scheduler(max_num_seqs=4, max_prefill_tokens=256)
    running = Sequence("a", [1, 2, 3], SamplingParams())
    scheduler.add(running)
    first = scheduler.schedule()
    assert [s.request_id for s, _ in first.prefill] == ["a"] and first.decode == []
    prefilled(running)

    new = Sequence("b", [4, 5], SamplingParams())
    scheduler.add(new)
    step = scheduler.schedule()  # prefill alone: b's first token does not wait for a's decode forward
    assert [s.request_id for s, _ in step.prefill] == ["b"] and step.decode == []
    prefilled(new)
    step = scheduler.schedule()
    assert step.prefill == [] and [s.request_id for s in step.decode] == ["a", "b"]


def test_a_long_prompt_takes_turns_with_the_decodes() -> None:
    scheduler = Scheduler(max_num_seqs=4, max_prefill_tokens=4)
    running = Sequence("a", [1], SamplingParams())
    scheduler.add(running)
    scheduler.schedule()
    prefilled(running)
    long = Sequence("long", list(range(10)), SamplingParams())
    scheduler.add(long)
    kinds = []
    for _ in range(5):
        step = scheduler.schedule()
        for seq, n in step.prefill:
            seq.num_cached += n
        kinds.append("P" if step.prefill else "D")
    assert kinds == ["P", "D", "P", "D", "P"]  # decodes are never held back for two prefill steps in a row
