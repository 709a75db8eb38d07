import itertools
import re

from mergeserve.zoo.math_other import TEMPLATES, build, stream

EXPR = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def worked(example: dict) -> tuple[list[str], int]:
    lines = example["text"].split("\n")
    assert lines[0] == "Question: " + example["question"]
    assert lines[-1] == "Answer: " + example["answer"]
    return lines[1:-1], int(example["answer"])


def test_steps_are_correct_and_end_in_the_answer():
    for ex in build(200):
        steps, answer = worked(ex)
        assert 2 <= len(steps) <= 3
        result = None
        for line in steps:
            found = EXPR.findall(line)
            assert len(found) == 1, line
            a, op, b, c = found[0]
            assert OPS[op](int(a), int(b)) == int(c), line
            if op == "*":
                assert min(int(a), int(b)) <= 12, line
            result = int(c)
        assert result == answer and 0 <= answer <= 500


def test_questions_are_unique_and_every_template_appears():
    examples = build(200)
    assert len({ex["question"] for ex in examples}) == 200
    names = {name for name, _ in itertools.islice(stream(7), 200)}
    assert len(names) >= 14 and len(TEMPLATES) >= 14


def test_deterministic_for_a_seed():
    assert build(50, seed=3) == build(50, seed=3)
    assert build(50, seed=3) != build(50, seed=4)
