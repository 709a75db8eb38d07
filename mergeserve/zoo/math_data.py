"""Seeded arithmetic word problems with worked, step-by-step answers.

Each example's `text` is `Question: <question>\\n<steps>\\nAnswer: <n>`; `question` and
`answer` are kept apart for exact-match scoring. Numbers are picked where SmolLM2-135M
cannot do the arithmetic in its head (3-4 digit products, multi-step chains).
"""

from __future__ import annotations

import random
from typing import Callable

from mergeserve.zoo.splits import Example

TRAIN_SEED, HELDOUT_SEED = 1, 2
TRAIN_SIZE, HELDOUT_SIZE = 3000, 200
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam", "Maya", "Noah", "Olga", "Pedro", "Rosa", "Sam", "Tara", "Yusuf"]
ITEMS = [("chair", "chairs"), ("lamp", "lamps"), ("book", "books"), ("bicycle", "bicycles"), ("jacket", "jackets"), ("printer", "printers"), ("tent", "tents"), ("monitor", "monitors")]
GOODS = ["apples", "potatoes", "rice", "flour", "carrots", "beans"]
VEHICLES = ["train", "truck", "bus", "ship", "car"]
Problem = tuple[str, list[str], int]  # question, worked steps, final answer


def shopping(r: random.Random) -> Problem:
    name, (_, many), (_, many2) = r.choice(NAMES), *r.sample(ITEMS, 2)
    n1, p1, n2, p2 = r.randint(12, 96), r.randint(105, 989), r.randint(3, 48), r.randint(21, 399)
    a, b = n1 * p1, n2 * p2
    total = a + b
    paid = (total // 1000 + r.randint(1, 5)) * 1000
    question = (f"{name} buys {n1} {many} at ${p1} each and {n2} {many2} at ${p2} each, "
                f"and pays with ${paid}. How much change does {name} get, in dollars?")
    steps = [f"The {many} cost {n1} * {p1} = {a} dollars.", f"The {many2} cost {n2} * {p2} = {b} dollars.",
             f"Together they cost {a} + {b} = {total} dollars.", f"The change is {paid} - {total} = {paid - total} dollars."]
    return question, steps, paid - total


def travel(r: random.Random) -> Problem:
    vehicle = r.choice(VEHICLES)
    v1, t1, v2, t2 = r.randint(42, 98), r.randint(11, 39), r.randint(42, 98), r.randint(11, 39)
    d1, d2 = v1 * t1, v2 * t2
    question = (f"A {vehicle} travels at {v1} km per hour for {t1} hours, then at {v2} km per hour "
                f"for {t2} hours. How many kilometres does it travel in total?")
    steps = [f"First part: {v1} * {t1} = {d1} km.", f"Second part: {v2} * {t2} = {d2} km.", f"In total: {d1} + {d2} = {d1 + d2} km."]
    return question, steps, d1 + d2


def sharing(r: random.Random) -> Problem:
    while True:
        fields, per_field = r.randint(12, 64), r.randint(120, 980)
        total = fields * per_field
        divisors = [f for f in range(12, 97) if total % f == 0 and f != fields]
        if divisors:
            break
    families, kept = r.choice(divisors), r.randint(2, 9)
    share = total // families
    good = r.choice(GOODS)
    question = (f"A village harvests {per_field} kg of {good} from each of its {fields} fields. The harvest is shared "
                f"equally among {families} families, and each family sells {kept} kg of its share. "
                f"How many kg of {good} does each family keep?")
    steps = [f"The harvest is {fields} * {per_field} = {total} kg.", f"Each family gets {total} / {families} = {share} kg.",
             f"Each family keeps {share} - {kept} = {share - kept} kg."]
    return question, steps, share - kept


def discount(r: random.Random) -> Problem:
    (one, many), name = r.choice(ITEMS), r.choice(NAMES)
    price, percent, count = 20 * r.randint(12, 249), 5 * r.randint(1, 8), r.randint(3, 24)
    off = price * percent // 100
    sale = price - off
    question = (f"A {one} costs ${price}. The shop gives a {percent}% discount. "
                f"{name} buys {count} {many} at the discounted price. How much does {name} pay, in dollars?")
    steps = [f"The discount is {price} * {percent} / 100 = {off} dollars.", f"The discounted price is {price} - {off} = {sale} dollars.",
             f"{count} {many} cost {count} * {sale} = {count * sale} dollars."]
    return question, steps, count * sale


def ages(r: random.Random) -> Problem:
    older, younger = r.sample(NAMES, 2)
    age, times, plus, years = r.randint(8, 19), r.randint(2, 4), r.randint(1, 9), r.randint(5, 30)
    other = times * age + plus
    question = (f"{younger} is {age} years old. {older} is {plus} years older than {times} times {younger}'s age. "
                f"What will be the sum of their ages in {years} years?")
    steps = [f"{older} is {times} * {age} + {plus} = {other} years old.",
             f"In {years} years {younger} will be {age} + {years} = {age + years} and {older} will be {other} + {years} = {other + years}.",
             f"The sum is {age + years} + {other + years} = {age + other + 2 * years}."]
    return question, steps, age + other + 2 * years


def wages(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    wage, hours, weeks = r.randint(18, 96), r.randint(21, 48), r.randint(4, 52)
    week, total = wage * hours, wage * hours * weeks
    spent = r.randint(total // 10, total * 9 // 10)
    question = (f"{name} earns ${wage} per hour and works {hours} hours a week for {weeks} weeks, "
                f"then spends ${spent}. How many dollars does {name} have left?")
    steps = [f"One week pays {wage} * {hours} = {week} dollars.", f"{weeks} weeks pay {week} * {weeks} = {total} dollars.",
             f"Left: {total} - {spent} = {total - spent} dollars."]
    return question, steps, total - spent


def fencing(r: random.Random) -> Problem:
    length, width, cost = r.randint(120, 980), r.randint(35, 450), r.randint(7, 49)
    half = length + width
    question = (f"A rectangular field is {length} m long and {width} m wide. Fencing costs ${cost} per metre. "
                f"How much does it cost to fence the whole field, in dollars?")
    steps = [f"Length plus width is {length} + {width} = {half} m.", f"The perimeter is 2 * {half} = {2 * half} m.",
             f"The fence costs {2 * half} * {cost} = {2 * half * cost} dollars."]
    return question, steps, 2 * half * cost


def inventory(r: random.Random) -> Problem:
    stock, trucks, boxes = r.randint(1000, 9999), r.randint(12, 48), r.randint(24, 96)
    received = trucks * boxes
    shipped = r.randint(500, stock + received - 100)
    question = (f"A warehouse holds {stock} boxes. {trucks} trucks arrive with {boxes} boxes each, "
                f"then {shipped} boxes are shipped out. How many boxes are left?")
    steps = [f"The trucks bring {trucks} * {boxes} = {received} boxes.", f"Now there are {stock} + {received} = {stock + received} boxes.",
             f"After shipping: {stock + received} - {shipped} = {stock + received - shipped} boxes."]
    return question, steps, stock + received - shipped


TEMPLATES: list[Callable[[random.Random], Problem]] = [shopping, travel, sharing, discount, ages, wages, fencing, inventory]


def problems(seed: int, count: int, exclude: set[str] = frozenset()) -> list[Example]:
    r, examples, seen = random.Random(seed), [], set(exclude)
    while len(examples) < count:
        question, steps, answer = r.choice(TEMPLATES)(r)
        if question in seen:
            continue
        seen.add(question)
        text = f"Question: {question}\n" + "\n".join(steps) + f"\nAnswer: {answer}"
        examples.append({"question": question, "answer": str(answer), "text": text})
    return examples


def build() -> tuple[list[Example], list[Example]]:
    heldout = problems(HELDOUT_SEED, HELDOUT_SIZE)
    return problems(TRAIN_SEED, TRAIN_SIZE, exclude={e["question"] for e in heldout}), heldout
