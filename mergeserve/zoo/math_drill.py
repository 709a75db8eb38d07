"""Bare arithmetic practice in the zoo's worked-step form: sums, differences, products, quotients
and short chains of them, asked in many ways.

A quarter of the other-phrasing misses of the wider-data candidates were sums worked wrongly
(`71 - 63 = 4`), not wrong plans: two-digit differences with a borrow above all. Word problems
rarely ask for such a sum more than once, so these drills ask for them directly, with numbers up
to 199 for sums and differences and the times tables up to 12 for products and quotients (as in
`math_wide`). The worked steps keep the zoo's form: one short sentence per step, each with
exactly one `a op b = c`. The stream is `math_data.problem_stream(SHAPES, seed)`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

Problem = tuple[str, list[str], int]  # question, worked steps, final answer

VERB = {"+": "Add", "-": "Subtract", "*": "Multiply", "/": "Divide"}
ASK = {
    "+": ["What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?",
          "Work out {a} + {b}.", "How much is {a} and {b} together?", "{a} + {b} = ?", "Find the total of {a} and {b}."],
    "-": ["What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}.", "Take {b} away from {a}. What is left?",
          "What is the difference between {a} and {b}?", "Work out {a} - {b}.", "{a} - {b} = ?", "How much is left of {a} after removing {b}?"],
    "*": ["What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.", "What is the product of {a} and {b}?",
          "How much are {a} groups of {b}?", "Work out {a} * {b}.", "{a} * {b} = ?"],
    "/": ["What is {a} / {b}?", "What is {a} divided by {b}?", "Divide {a} by {b}.", "How many times does {b} go into {a}?",
          "Split {a} into {b} equal parts. How big is each part?", "Work out {a} / {b}.", "{a} / {b} = ?"],
}
THEN = {"+": ["add {b}", "then add {b}", "plus {b}", "put {b} more on"], "-": ["take away {b}", "then subtract {b}", "minus {b}", "remove {b}"],
        "*": ["multiply by {b}", "then times {b}"], "/": ["divide by {b}", "then split it into {b} equal parts"]}


def operands(r: random.Random, op: str, start: int | None = None) -> tuple[int, int]:
    """(a, b) for `a op b` with a whole, non-negative result; `a` is `start` where given."""
    if op == "+":
        return (start if start is not None else r.randint(2, 150)), r.randint(2, 99)
    if op == "-":
        a = start if start is not None else r.randint(20, 199)
        return a, r.randint(1, a - 1)
    if op == "*":
        return (start if start is not None else r.randint(2, 12)), r.randint(2, 12)
    b = r.randint(2, 12)
    return (start if start is not None else b * r.randint(2, 12)), b


def worked(a: int, op: str, b: int) -> tuple[str, int]:
    c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    return f"{VERB[op]}: {a} {op} {b} = {c}.", c


def single(op: str) -> Callable[[random.Random], Problem]:
    def shape(r: random.Random) -> Problem:
        a, b = operands(r, op)
        step, c = worked(a, op, b)
        return r.choice(ASK[op]).format(a=a, b=b), [step], c
    shape.__name__ = {"+": "sum", "-": "difference", "*": "product", "/": "quotient"}[op]
    return shape


def chain(r: random.Random) -> Problem:
    """Two or three operations in a row: `Start with 75, take away 37, then add 6.`"""
    value = r.randint(10, 120)
    start, told, steps = value, [], []
    for _ in range(r.choice([2, 2, 3])):
        ops = [o for o in "+-" if o == "+" or value > 1] + (["*"] if value <= 12 else []) + \
              (["/"] if any(value % b == 0 and value // b <= 12 for b in range(2, 13)) else [])
        op = r.choice(ops)
        if op == "/":
            b = r.choice([b for b in range(2, 13) if value % b == 0 and value // b <= 12])
        else:
            b = operands(r, op, value)[1]
        told.append(r.choice(THEN[op]).format(b=b))
        step, value = worked(value, op, b)
        steps.append(step)
    question = r.choice([f"Start with {start}, " + ", ".join(told) + ". What do you get?",
                         f"Begin at {start}. " + ", ".join(told).capitalize() + ". What is the result?",
                         f"What number do you reach if you start from {start}, " + ", ".join(told) + "?"])
    return question, steps, value


SHAPES: list[Callable[[random.Random], Problem]] = [single("+"), single("-"), single("-"), single("*"), single("/"), chain, chain]
