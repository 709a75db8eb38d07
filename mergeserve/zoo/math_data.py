"""Seeded arithmetic word problems with worked, step-by-step answers.

Each example's `text` is `Question: <question>\\n<steps>\\nAnswer: <n>`; `question` and
`answer` are kept apart for exact-match scoring. The problems are sized for a 135M model to
learn from the zoo's training budget: 1-2 digit operands, 2-3 steps, products within the
times tables up to 12, and several phrasings of each template, so that the expert has to
read the question rather than recall one sentence shape.

Held-out problems share no arithmetic with training. A problem's key is the tuple of its worked
steps' `(operand, operator, operand)` triples, e.g. `((3, '*', 4), (5, '*', 6), (12, '+', 30))`:
the sums the expert would have to recall. It is stricter than (template, operands), since two
templates can work the same sums (savings and garden both multiply, then subtract). Training
is what the committed math expert was trained on: 4000 seed-1 problems whose questions are not
among the first 200 of the seed-2 stream. The held-out set is the first 200 problems of the
seed-2 stream that share neither a question nor a key with training problems: 84 of the first
284 candidates were dropped (sharing 35, garden 17, ages 10, savings 7, packing 6, shopping 5,
distance 2, stamps 2), so the template with the smallest operand space, sharing, is gone.
Held-out mix: stamps 33, shopping 32, distance 31, savings 31, ages 30, packing 23, garden 20,
sharing 0.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from itertools import islice

from mergeserve.zoo import math_drill, math_story, math_wide
from mergeserve.zoo.splits import Example

TRAIN_SEED, HELDOUT_SEED, STORY_SEED, WIDE_SEED, DRILL_SEED = 1, 2, 11, 11, 13
TRAIN_SIZE, HELDOUT_SIZE, STORY_SIZE, DRILL_SIZE = 4000, 200, 4000, 8000
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam", "Maya", "Noah", "Olga", "Pedro", "Rosa", "Sam", "Tara", "Yusuf"]
ITEMS = [("pen", "pens"), ("book", "books"), ("cup", "cups"), ("ball", "balls"), ("lamp", "lamps"), ("kite", "kites"), ("plate", "plates"), ("shirt", "shirts")]
FRUIT = ["apples", "oranges", "pears", "plums", "lemons", "peaches"]
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("crate", "crates"), ("jar", "jars")]
Problem = tuple[str, list[str], int]  # question, worked steps, final answer


def shopping(r: random.Random) -> Problem:
    name, (one, many), (one2, many2) = r.choice(NAMES), *r.sample(ITEMS, 2)
    n1, p1, n2, p2 = r.randint(2, 9), r.randint(2, 12), r.randint(2, 9), r.randint(2, 12)
    a, b = n1 * p1, n2 * p2
    question = r.choice([
        f"{name} buys {n1} {many} at ${p1} each and {n2} {many2} at ${p2} each. How much does {name} pay in total?",
        f"A {one} costs ${p1} and a {one2} costs ${p2}. How many dollars do {n1} {many} and {n2} {many2} cost together?",
        f"{name} orders {n1} {many} for ${p1} each and {n2} {many2} for ${p2} each. What is the bill, in dollars?",
    ])
    steps = [f"The {many} cost {n1} * {p1} = {a} dollars.", f"The {many2} cost {n2} * {p2} = {b} dollars.",
             f"Together they cost {a} + {b} = {a + b} dollars."]
    return question, steps, a + b


def packing(r: random.Random) -> Problem:
    (one, many), fruit = r.choice(CONTAINERS), r.choice(FRUIT)
    count, per, loose = r.randint(2, 12), r.randint(2, 9), r.randint(1, 19)
    packed = count * per
    question = r.choice([
        f"There are {count} {many} with {per} {fruit} in each {one}, and {loose} more {fruit} on the table. How many {fruit} are there in all?",
        f"A shop has {loose} loose {fruit} and {count} {many} of {fruit}. Each {one} holds {per} {fruit}. How many {fruit} does the shop have?",
        f"{r.choice(NAMES)} fills {count} {many} with {per} {fruit} each and still has {loose} {fruit} left over. How many {fruit} were there?",
    ])
    steps = [f"The {many} hold {count} * {per} = {packed} {fruit}.", f"In all: {packed} + {loose} = {packed + loose} {fruit}."]
    return question, steps, packed + loose


def sharing(r: random.Random) -> Problem:
    people, share, eaten = r.randint(2, 9), r.randint(3, 12), r.randint(1, 2)
    total, fruit, name = people * share, r.choice(FRUIT), r.choice(NAMES)
    question = r.choice([
        f"{name} shares {total} {fruit} equally among {people} friends. Each friend eats {eaten} of them. How many {fruit} does each friend have left?",
        f"{total} {fruit} are split evenly between {people} children, and each child gives {eaten} away. How many {fruit} does each child keep?",
    ])
    steps = [f"Each gets {total} / {people} = {share} {fruit}.", f"Each keeps {share} - {eaten} = {share - eaten} {fruit}."]
    return question, steps, share - eaten


def stamps(r: random.Random) -> Problem:
    a, b = r.sample(NAMES, 2)
    has, gives, buys = r.randint(20, 60), r.randint(2, 19), r.randint(2, 30)
    thing = r.choice(["stamps", "marbles", "stickers", "cards", "shells"])
    question = r.choice([
        f"{a} has {has} {thing}. {a} gives {gives} to {b} and then buys {buys} more. How many {thing} does {a} have now?",
        f"{a} starts with {has} {thing}, loses {gives} of them, and gets {buys} new ones from {b}. How many {thing} does {a} have?",
        f"{a} had {has} {thing}. After giving {b} {gives} {thing}, {a} found {buys} more. How many {thing} does {a} have?",
    ])
    steps = [f"After giving away: {has} - {gives} = {has - gives} {thing}.", f"After getting more: {has - gives} + {buys} = {has - gives + buys} {thing}."]
    return question, steps, has - gives + buys


def distance(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    d1, d2, d3 = r.randint(3, 40), r.randint(3, 40), r.randint(3, 40)
    unit = r.choice(["km", "miles"])
    how = r.choice(["walks", "cycles", "runs", "drives"])
    question = r.choice([
        f"{name} {how} {d1} {unit} on Monday, {d2} {unit} on Tuesday and {d3} {unit} on Wednesday. How many {unit} is that in total?",
        f"On a three-day trip {name} {how} {d1} {unit}, then {d2} {unit}, then {d3} {unit}. How far does {name} go altogether, in {unit}?",
    ])
    steps = [f"The first two days: {d1} + {d2} = {d1 + d2} {unit}.", f"All three days: {d1 + d2} + {d3} = {d1 + d2 + d3} {unit}."]
    return question, steps, d1 + d2 + d3


def ages(r: random.Random) -> Problem:
    older, younger = r.sample(NAMES, 2)
    age, more, years = r.randint(4, 15), r.randint(2, 25), r.randint(2, 10)
    other = age + more
    question = r.choice([
        f"{younger} is {age} years old. {older} is {more} years older than {younger}. What will be the sum of their ages in {years} years?",
        f"{older} is {more} years older than {younger}, who is {age}. In {years} years, what will their ages add up to?",
    ])
    steps = [f"{older} is {age} + {more} = {other} years old.",
             f"In {years} years they will be {age + years} and {other + years}.",
             f"The sum is {age + years} + {other + years} = {age + other + 2 * years}."]
    return question, steps, age + other + 2 * years


def savings(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    per, weeks = r.randint(2, 12), r.randint(2, 9)
    saved = per * weeks
    spent = r.randint(1, saved - 1)
    question = r.choice([
        f"{name} saves ${per} every week for {weeks} weeks, then spends ${spent} on a game. How many dollars does {name} have left?",
        f"Each week {name} puts ${per} in a jar. After {weeks} weeks {name} takes out ${spent}. How much money is in the jar?",
    ])
    steps = [f"{name} saves {per} * {weeks} = {saved} dollars.", f"Left: {saved} - {spent} = {saved - spent} dollars."]
    return question, steps, saved - spent


def garden(r: random.Random) -> Problem:
    rows, per, dead = r.randint(2, 9), r.randint(2, 12), r.randint(1, 9)
    plant = r.choice(["tulips", "roses", "trees", "carrots", "tomato plants"])
    planted = rows * per
    dead = min(dead, planted - 1)
    question = r.choice([
        f"A gardener plants {rows} rows of {plant} with {per} in each row. {dead} of them do not grow. How many {plant} grow?",
        f"There are {rows} rows of {plant}, {per} in every row. A storm ruins {dead}. How many {plant} are left?",
    ])
    steps = [f"There are {rows} * {per} = {planted} {plant}.", f"Left: {planted} - {dead} = {planted - dead} {plant}."]
    return question, steps, planted - dead


TEMPLATES: list[Callable[[random.Random], Problem]] = [shopping, packing, sharing, stamps, distance, ages, savings, garden]


def stream(seed: int) -> Iterator[tuple[str, Example]]:
    """Endless seeded problems of TEMPLATES, each question once, with the name of its template."""
    return problem_stream(TEMPLATES, seed)


def problem_stream(templates: list[Callable[[random.Random], Problem]], seed: int) -> Iterator[tuple[str, Example]]:
    """Endless seeded problems, a template drawn for each, each question once, with the template's name."""
    r, seen = random.Random(seed), set()
    while True:
        template = r.choice(templates)
        question, steps, answer = template(r)
        if question in seen:
            continue
        seen.add(question)
        text = f"Question: {question}\n" + "\n".join(steps) + f"\nAnswer: {answer}"
        yield template.__name__, {"question": question, "answer": str(answer), "text": text}


def problems(seed: int, count: int, exclude: set[str] = frozenset()) -> list[Example]:
    """The first `count` problems of the seed's stream whose question is not in `exclude`."""
    return list(islice((e for _, e in stream(seed) if e["question"] not in exclude), count))


def arithmetic_key(example: Example) -> tuple[tuple[int, str, int], ...]:
    """The `(operand, operator, operand)` of every `a op b = c` in the worked steps, in order."""
    steps = example["text"].split("\n", 1)[1]
    return tuple((int(a), op, int(b)) for a, op, b in re.findall(r"(\d+) ([-+*/]) (\d+) =", steps))


def heldout_problems(train: list[Example], count: int = HELDOUT_SIZE) -> tuple[list[Example], dict[str, int], int]:
    """The first `count` seed-2 problems that share neither a question nor an arithmetic key with
    `train`; with how many each template gave and how many candidates were dropped."""
    keys, questions = {arithmetic_key(e) for e in train}, {e["question"] for e in train}
    kept, mix, dropped = [], dict.fromkeys((t.__name__ for t in TEMPLATES), 0), 0
    for template, e in stream(HELDOUT_SEED):
        if len(kept) == count:
            break
        if e["question"] in questions or arithmetic_key(e) in keys:
            dropped += 1
            continue
        kept.append(e)
        mix[template] += 1
    return kept, mix, dropped


def problems_apart(templates: list[Callable[[random.Random], Problem]], seed: int, heldout: list[Example], count: int) -> list[Example]:
    """The first `count` problems of the seed's stream that share neither a question nor an
    arithmetic key with `heldout`."""
    keys, questions = {arithmetic_key(e) for e in heldout}, {e["question"] for e in heldout}
    kept = (e for _, e in problem_stream(templates, seed) if e["question"] not in questions and arithmetic_key(e) not in keys)
    return list(islice(kept, count))


def stories(heldout: list[Example], count: int = STORY_SIZE) -> list[Example]:
    """The first `count` composed stories (math_story) apart from `heldout`."""
    return problems_apart(math_story.SHAPES, STORY_SEED, heldout, count)


def wide(heldout: list[Example], count: int) -> list[Example]:
    """The first `count` math_wide problems apart from `heldout`."""
    return problems_apart(math_wide.SHAPES, WIDE_SEED, heldout, count)


def drill(heldout: list[Example], count: int = DRILL_SIZE) -> list[Example]:
    """The first `count` math_drill problems apart from `heldout`."""
    return problems_apart(math_drill.SHAPES, DRILL_SEED, heldout, count)


def build() -> tuple[list[Example], list[Example]]:
    # The template problems stay apart from the seed-2 stream's first 200 questions (the held-out
    # set they were drawn beside), so that the held-out set's bytes stay as they were.
    templated = problems(TRAIN_SEED, TRAIN_SIZE, exclude={e["question"] for e in problems(HELDOUT_SEED, HELDOUT_SIZE)})
    heldout = heldout_problems(templated)[0]
    return templated + stories(heldout), heldout
