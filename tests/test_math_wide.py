"""The wide math problems: right worked arithmetic, sized for a small model, and broad in
situations, verbs and sentence orders."""

from __future__ import annotations

import re
from collections import Counter
from itertools import islice

import pytest

from mergeserve.zoo.math_data import problem_stream
from mergeserve.zoo.math_wide import INSTRUCT, LEXICON, NAMES, SHAPES, TEACHERS, WORDS, Move

STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (-?\d+)")
NUMBER_WORDS = re.compile(r"\b(?:" + "|".join([*WORDS.values(), "twelve", "a dozen"]) + r")\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def drawn() -> list[tuple[str, dict[str, str]]]:
    return list(islice(problem_stream(SHAPES, 0), 3000))


def worked(text: str) -> list[tuple[int, str, int, int]]:
    """The `a op b = c` of each step line; exactly one per line."""
    steps = text.split("\n")[1:-1]
    found = [STEP.findall(line) for line in steps]
    assert all(len(f) == 1 for f in found), text
    return [(int(a), op, int(b), int(c)) for ((a, op, b, c),) in found]


def test_every_step_is_right_and_ends_in_the_answer(drawn) -> None:
    for _, e in drawn:
        steps = worked(e["text"])
        assert 2 <= len(steps) <= 3, e["text"]
        for a, op, b, c in steps:
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == c, e["text"]
            assert min(a, b, c) >= 0
            if op == "/":
                assert a % b == 0 and b <= 12 and c <= 12, e["text"]
            if op == "*":
                assert a <= 12 and b <= 12, e["text"]
        assert steps[-1][3] == int(e["answer"]) <= 500
        assert e["text"] == f"Question: {e['question']}\n" + e["text"].split("\n", 1)[1]
        assert e["text"].endswith(f"\nAnswer: {e['answer']}")


def test_operands_stay_small(drawn) -> None:
    operands = [n for _, e in drawn for a, _, b, _ in worked(e["text"]) for n in (a, b)]
    assert max(operands) <= 200
    assert sum(n < 100 for n in operands) / len(operands) > 0.95


def test_the_stream_is_a_seeded_one(drawn) -> None:
    again = list(islice(problem_stream(SHAPES, 0), 300))
    assert again == drawn[:300]
    assert list(islice(problem_stream(SHAPES, 1), 300)) != again


def test_many_situations_appear(drawn) -> None:
    shapes = Counter(name for name, _ in drawn)
    assert len(SHAPES) >= 40 and len(shapes) == len(SHAPES)
    assert min(shapes.values()) >= 20


def pattern(move: Move) -> re.Pattern[str]:
    """Where a lexicon phrase was used: its words, with any holder, count and things in its slots."""
    slots = {"n": r"[\w' -]+?", "k": r"(?:\d+|[a-z ]+?)", "t": r"[a-z ]+?"}
    parts = re.split(r"\{(\w)\}", move.text)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else slots[p] for i, p in enumerate(parts)) + r"\b", re.IGNORECASE)


def test_each_operation_is_told_with_many_verbs(drawn) -> None:
    assert len(LEXICON.phrases("+")) >= 30 and len(LEXICON.phrases("-")) >= 30
    questions = "\n".join(e["question"] for _, e in drawn)
    moves = [m for ops in LEXICON.moves.values() for group in ops.values() for m in group]
    used = Counter(m.op for m in moves if pattern(m).search(questions))
    assert used["+"] >= 60 and used["-"] >= 60


def skeleton(question: str) -> str:
    """A question with its names and numbers blanked out: what is left is its wording."""
    for name in sorted(NAMES + TEACHERS, key=len, reverse=True):
        question = question.replace(name, "N")
    return NUMBER_WORDS.sub("#", re.sub(r"\d+", "#", question))


def test_questions_are_worded_in_many_ways(drawn) -> None:
    questions = [e["question"] for _, e in drawn]
    assert len({skeleton(q) for q in questions}) >= 2000
    assert len({" ".join(skeleton(q).split()[:3]) for q in questions}) >= 300
    share = lambda test: sum(map(test, questions)) / len(questions)  # noqa: E731
    assert share(lambda q: q.startswith(("How", "What", "Which", "On which"))) > 0.2  # question first
    assert share(lambda q: q.startswith(tuple(INSTRUCT))) > 0.05  # instruction first
    assert share(lambda q: q.endswith(".") and any(f" {v.lower()} " in f" {q.lower()}" for v in INSTRUCT)) > 0.1  # instruction last
    assert share(lambda q: " if " in q) > 0.1
    assert share(lambda q: NUMBER_WORDS.search(q) is not None) > 0.15
    assert share(lambda q: any(w in q for w in ("twice", "three times", "four times", "half"))) > 0.03
