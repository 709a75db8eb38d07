"""Grade-school arithmetic word problems in an "other phrasing": a second held-out math test.

These templates were written apart from the training generator, with no access to its templates
or wording, so a model solves them only if it learned the arithmetic rather than the phrasing.
"""

from __future__ import annotations

import itertools
import random
from typing import Callable, Iterator

from mergeserve.zoo.splits import Example

Problem = tuple[str, list[str], int]

NAMES = ["Amara", "Bilal", "Chen", "Dagny", "Emeka", "Farah", "Giulia", "Hiroshi", "Ines", "Jamal",
         "Kavya", "Lars", "Mei", "Nia", "Oskar", "Priya", "Quentin", "Rosa", "Sione", "Tamar", "Umar",
         "Valentina", "Wen", "Yusuf", "Zofia", "Diego", "Aroha", "Leilani"]
WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine",
         10: "ten", 11: "eleven", 12: "twelve"}
OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


def num(r: random.Random, n: int) -> str:
    return WORDS[n] if n in WORDS and r.random() < 0.3 else str(n)


def step(text: str, a: int, op: str, b: int) -> tuple[str, int]:
    """`text` with its `{}` filled by `a op b = c`, and c."""
    c = OPS[op](a, b)
    if c < 0 or (op == "/" and a % b):
        raise ValueError(f"{a} {op} {b} is not a non-negative whole number")
    return text.format(f"{a} {op} {b} = {c}"), c


def names(r: random.Random, k: int = 1) -> list[str]:
    return r.sample(NAMES, k)


def bakery(r: random.Random) -> Problem:
    place = r.choice(["the bakery", "the corner bakery", "the village bakery"])
    item = r.choice(["rolls", "muffins", "bagels", "scones", "buns"])
    b, k = r.randint(3, 9), r.randint(6, 12)
    sold = r.randint(5, b * k - 2)
    s1, made = step(f"The bakery makes {{}} {item}.", b, "*", k)
    s2, left = step(f"After the sales, {{}} {item} are left.", made, "-", sold)
    per = "a dozen" if k == 12 and r.random() < 0.5 else num(r, k)
    B = num(r, b)
    return r.choice([
        f"{place.capitalize()} bakes {B} trays of {item} with {per} on each tray. By noon it has sold {sold} of them. How many {item} are left?",
        f"How many {item} does {place} have left if it bakes {B} trays of {per} {item} and sells {sold}?",
        f"Work out how many {item} remain: {place} fills {B} trays with {per} {item} apiece, then customers buy {sold}.",
    ]), [s1, s2], left


def bus(r: random.Random) -> Problem:
    (who,) = names(r)
    p, on1 = r.randint(5, 30), r.randint(2, 15)
    off, on2 = r.randint(1, p + on1 - 1), r.randint(2, 12)
    s1, x = step("After the first stop the bus carries {} people.", p, "+", on1)
    s2, y = step("After the second stop {} people are on board.", x, "-", off)
    s3, z = step("After the third stop there are {} passengers.", y, "+", on2)
    return r.choice([
        f"A bus leaves the depot with {p} passengers. At the first stop {on1} people get on. At the second stop {off} people get off, and at the third stop {num(r, on2)} more climb aboard. How many passengers are on the bus now?",
        f"How many people are riding the bus after three stops, if it started with {p} riders, picked up {on1} at the first stop, let {off} off at the second and picked up {num(r, on2)} at the third?",
        f"{who} counts {p} passengers on the bus as it sets off. At the first stop {on1} board, at the second {off} leave, and at the third {num(r, on2)} board. Find the number of passengers after the third stop.",
    ]), [s1, s2, s3], z


def library(r: random.Random) -> Problem:
    (who,) = names(r)
    n = r.randint(40, 99)
    lent = r.randint(10, n - 5)
    back = r.randint(3, lent)
    s1, x = step("After the loans, {} books are on the shelves.", n, "-", lent)
    s2, y = step("With the returns, the shelves hold {} books.", x, "+", back)
    return r.choice([
        f"A school library has {n} books on its shelves. On Monday students borrow {lent} of them, and on Tuesday {back} borrowed books come back. How many books are on the shelves now?",
        f"Find how many books are on the library shelves after {who} lends out {lent} of the {n} books and later takes {back} of them back.",
        f"How many books sit on the shelves if the library starts with {n}, lends out {lent} and then gets {back} returned?",
    ]), [s1, s2], y


def change(r: random.Random) -> Problem:
    (who,) = names(r)
    note = r.choice([20, 50, 100])
    items = r.choice(["notebooks", "pens", "comics", "mangoes", "candles"])
    q = r.randint(2, 9)
    price = r.randint(2, min(12, note // q))
    s1, cost = step(f"The {items} cost {{}} dollars.", q, "*", price)
    s2, back = step("The change is {} dollars.", note, "-", cost)
    return r.choice([
        f"{who} buys {num(r, q)} {items} at {price} dollars each and pays with a {note}-dollar note. How much change does {who} get?",
        f"How much change comes back from a {note}-dollar note when {who} pays for {q} {items} costing {price} dollars apiece?",
        f"{items.capitalize()} cost {price} dollars each. {who} hands the shopkeeper a {note}-dollar note for {num(r, q)} of them. Work out the change in dollars.",
    ]), [s1, s2], back


def recipe(r: random.Random) -> Problem:
    (who,) = names(r)
    ing, dish = r.choice([("eggs", "pancakes"), ("cups of flour", "bread"), ("lemons", "lemonade"),
                          ("carrots", "soup"), ("bananas", "banana muffins")])
    per, batches = r.randint(2, 6), r.randint(2, 9)
    have = r.randint(1, per * batches - 1)
    s1, need = step(f"The batches need {{}} {ing}.", per, "*", batches)
    s2, buy = step(f"So {who} must get {{}} more {ing}.", need, "-", have)
    return r.choice([
        f"One batch of {dish} needs {num(r, per)} {ing}. {who} wants to make {num(r, batches)} batches but has only {have} {ing} in the kitchen. How many more {ing} does {who} need?",
        f"How many more {ing} must {who} get to make {batches} batches of {dish}, if each batch uses {per} and there are {have} at home?",
        f"{who} is scaling up a recipe: each batch of {dish} takes {per} {ing}, and {who} is cooking {batches} batches. With {have} {ing} already on hand, find how many more are needed.",
    ]), [s1, s2], buy


def pages(r: random.Random) -> Problem:
    (who,) = names(r)
    per, days = r.randint(4, 12), r.randint(2, 12)
    total = per * days + r.randint(5, 90)
    s1, read = step(f"In that time {who} reads {{}} pages.", per, "*", days)
    s2, left = step("That leaves {} pages unread.", total, "-", read)
    return r.choice([
        f"{who}'s book has {total} pages. {who} reads {per} pages every day for {num(r, days)} days. How many pages are left to read?",
        f"How many pages of a {total}-page book remain after {who} reads {per} pages a day for {days} days?",
        f"Reading {num(r, per)} pages each evening, {who} works through a novel for {days} evenings. The novel is {total} pages long. Work out how many pages {who} still has to read.",
    ]), [s1, s2], left


def league(r: random.Random) -> Problem:
    (who,) = names(r)
    sport = r.choice(["football", "hockey", "handball", "netball", "water polo"])
    w, wins, draws = r.choice([2, 3]), r.randint(2, 12), r.randint(2, 9)
    s1, x = step("The wins give {} points.", wins, "*", w)
    s2, y = step("Adding the draws gives {} points.", x, "+", draws)
    steps, extra = [s1, s2], ""
    if r.random() < 0.5:
        bonus = r.randint(2, 10)
        s3, y = step("With the bonus the team has {} points.", y, "+", bonus)
        steps, extra = [s1, s2, s3], f", and it earned {bonus} bonus points for fair play"
    return r.choice([
        f"In a {sport} league a win is worth {num(r, w)} points and a draw is worth one point. {who}'s team won {wins} games and drew {draws}{extra}. How many points does the team have?",
        f"How many points did {who}'s {sport} team collect this season if it won {wins} matches at {w} points each and drew {draws} matches at one point each{extra}?",
        f"Find the points total of a {sport} team with {wins} wins and {draws} draws, where a win counts {w} points and a draw counts one{extra}.",
    ]), steps, y


def temperature(r: random.Random) -> Problem:
    (who,) = names(r)
    t, rate, hours = r.randint(0, 20), r.randint(2, 5), r.randint(2, 8)
    s1, rise = step("The temperature climbs {} degrees.", rate, "*", hours)
    s2, end = step("It reaches {} degrees.", t, "+", rise)
    return r.choice([
        f"At dawn the thermometer in {who}'s garden shows {t} degrees. The temperature rises {rate} degrees each hour for {num(r, hours)} hours. What temperature does it show then?",
        f"What is the temperature after {hours} hours if it starts at {t} degrees and goes up by {rate} degrees every hour?",
        f"{who} reads {t} degrees on the thermometer early in the morning. Over the next {num(r, hours)} hours it warms by {rate} degrees per hour. Find the temperature at the end.",
    ]), [s1, s2], end


def tickets(r: random.Random) -> Problem:
    (who,) = names(r)
    venue = r.choice(["the zoo", "the museum", "the cinema", "the aquarium", "the fair"])
    pa = r.randint(5, 12)
    pc, na, nc = r.randint(2, pa - 1), r.randint(2, 6), r.randint(2, 8)
    s1, a = step("The adult tickets cost {} dollars.", na, "*", pa)
    s2, c = step("The child tickets cost {} dollars.", nc, "*", pc)
    s3, total = step("Altogether that is {} dollars.", a, "+", c)
    return r.choice([
        f"Tickets for {venue} cost {pa} dollars for an adult and {pc} dollars for a child. {who} buys tickets for {num(r, na)} adults and {num(r, nc)} children. How much does {who} spend?",
        f"How much do {na} adults and {nc} children pay to get into {venue}, if an adult ticket is {pa} dollars and a child ticket is {pc} dollars?",
        f"{who} takes a group to {venue}: {na} adults and {nc} children. Adults pay {pa} dollars each and children pay {pc} dollars each. Work out the total cost.",
    ]), [s1, s2, s3], total


def groups(r: random.Random) -> Problem:
    (who,) = names(r)
    items = r.choice(["markers", "worksheets", "rulers", "glue sticks", "balloons"])
    g, k, n_groups = r.randint(2, 6), r.randint(2, 10), r.randint(3, 8)
    n = g * n_groups
    s1, x = step("There are {} groups.", n, "/", g)
    s2, y = step(f"The teacher hands out {{}} {items}.", x, "*", k)
    return r.choice([
        f"A class of {n} pupils is split into groups of {num(r, g)}. Each group gets {k} {items}. How many {items} does the teacher hand out?",
        f"How many {items} are needed if {n} students work in groups of {g} and every group receives {num(r, k)}?",
        f"{who}, a teacher, puts the {n} children of the class into teams of {g} and gives each team {k} {items}. Find the number of {items} given out.",
    ]), [s1, s2], y


def coins(r: random.Random) -> Problem:
    (who,) = names(r)
    va, vb = r.choice([(2, 5), (5, 10), (2, 10), (1, 5)])
    ca, cb = r.randint(2, 12), r.randint(2, 12)
    s1, a = step("The smaller coins are worth {} cents.", ca, "*", va)
    s2, b = step("The larger coins are worth {} cents.", cb, "*", vb)
    s3, total = step("Together that makes {} cents.", a, "+", b)
    return r.choice([
        f"{who}'s piggy bank holds {va}-cent and {vb}-cent coins: {ca} of the first kind and {cb} of the second. How many cents are in it?",
        f"How many cents does {who} have with {num(r, ca)} coins worth {va} cents each and {num(r, cb)} coins worth {vb} cents each?",
        f"{who} empties a coin jar and counts {ca} coins of {va} cents and {cb} coins of {vb} cents. Find the total value in cents.",
    ]), [s1, s2, s3], total


def tank(r: random.Random) -> Problem:
    (who,) = names(r)
    rate, minutes, start = r.randint(2, 12), r.randint(2, 12), r.randint(1, 40)
    cap = start + rate * minutes
    s1, room = step("The tank still needs {} liters.", cap, "-", start)
    s2, t = step("Filling it takes {} minutes.", room, "/", rate)
    return r.choice([
        f"A water tank holds {cap} liters and already contains {start} liters. A hose adds {rate} liters every minute. How many minutes until the tank is full?",
        f"How long, in minutes, does it take to fill a {cap}-liter tank that has {start} liters in it, if water flows in at {rate} liters per minute?",
        f"{who} is filling a rain barrel that holds {cap} liters. There are {start} liters in it now, and the tap runs at {num(r, rate)} liters a minute. Work out how many minutes it takes to fill.",
    ]), [s1, s2], t


def collections(r: random.Random) -> Problem:
    a, b, c = names(r, 3)
    items = r.choice(["stickers", "marbles", "shells", "stamps", "trading cards"])
    x, times = r.randint(3, 12), r.choice([2, 3])
    fewer = r.randint(2, min(15, times * x - 1))
    like = {2: "twice as many as", 3: "three times as many as"}[times]
    s1, y = step(f"{b} has {{}} {items}.", x, "*", times)
    s2, z = step(f"{c} has {{}} {items}.", y, "-", fewer)
    steps, ask = [s1, s2], f"How many {items} does {c} have?"
    if r.random() < 0.5:
        s3, z = step("Together they have {}.", y, "+", z)
        steps, ask = [s1, s2, s3], f"How many {items} do {b} and {c} have together?"
    return r.choice([
        f"{a} has {x} {items}. {b} has {like} {a}, and {c} has {fewer} fewer than {b}. {ask}",
        f"{ask} {c} has {fewer} fewer {items} than {b}, and {b} has {like} {a}, who has {x}.",
        f"Three friends compare their {items}. {a} owns {x}; {b} owns {like} {a}; {c} owns {fewer} fewer than {b}. {ask}",
    ]), steps, z


def train(r: random.Random) -> Problem:
    stops, off = r.randint(2, 6), r.randint(2, 9)
    p = stops * off + r.randint(5, 60)
    board = r.randint(3, 20)
    s1, x = step("At those stations {} passengers get off.", stops, "*", off)
    s2, y = step("That leaves {} passengers.", p, "-", x)
    s3, z = step("With the new riders there are {} passengers.", y, "+", board)
    return r.choice([
        f"A train leaves the city with {p} passengers. At each of the next {num(r, stops)} stations, {off} passengers get off. Then {board} people board at the last station. How many passengers are on the train now?",
        f"How many people are on the train after {stops} stations, if it started with {p} on board, {off} got off at every station, and {board} got on at the end?",
        f"Work out the number of passengers: a train carries {p} people, drops off {num(r, off)} at each of {stops} stations, and then picks up {board}.",
    ]), [s1, s2, s3], z


def sharing(r: random.Random) -> Problem:
    (who,) = names(r)
    fruit = r.choice(["plums", "apples", "pears", "oranges", "lemons", "apricots"])
    while True:
        baskets, per = r.randint(2, 9), r.randint(2, 12)
        shares = [k for k in range(2, 13) if baskets * per % k == 0 and baskets * per // k <= 12]
        if shares:
            break
    friends = r.choice(shares)
    s1, total = step(f"There are {{}} {fruit} in all.", baskets, "*", per)
    s2, each = step("Each one gets {}.", total, "/", friends)
    return r.choice([
        f"{who} picks {num(r, baskets)} baskets of {fruit} with {per} in each basket and shares them equally among {friends} friends. How many {fruit} does each friend get?",
        f"How many {fruit} does each of {friends} friends receive when {baskets} baskets holding {per} {fruit} each are shared out equally?",
        f"There are {baskets} baskets on the table, each holding {num(r, per)} {fruit}. {who} divides all of them equally between {friends} children. Find how many each child gets.",
    ]), [s1, s2], each


def savings(r: random.Random) -> Problem:
    (who,) = names(r)
    weekly, weeks = r.randint(3, 12), r.choice([2, 4, 6, 8, 10, 12])
    s1, saved = step(f"{who} saves {{}} dollars.", weekly, "*", weeks)
    s2, kept = step("Half of that is {} dollars.", saved, "/", 2)
    return r.choice([
        f"{who} puts {weekly} dollars into a jar every week for {num(r, weeks)} weeks, then spends half of the money on a bike helmet. How many dollars are left in the jar?",
        f"How much money is left in {who}'s jar after saving {weekly} dollars a week for {weeks} weeks and spending half of it?",
        f"Saving {weekly} dollars each week, {who} collects money for {weeks} weeks and then gives half of it away. Work out how much {who} keeps.",
    ]), [s1, s2], kept


def wheels(r: random.Random) -> Problem:
    (who,) = names(r)
    cars = r.randint(2, 12)
    kind, per = r.choice([("bicycles", 2), ("tricycles", 3)])
    small = r.randint(2, 12)
    spot = r.choice(["in a car park", "in the school yard", "on the street by the station", "at the campsite"])
    s1, a = step("The cars have {} wheels.", cars, "*", 4)
    s2, b = step(f"The {kind} have {{}} wheels.", small, "*", per)
    s3, total = step("That is {} wheels in all.", a, "+", b)
    return r.choice([
        f"{who} counts {cars} cars and {small} {kind} {spot}. How many wheels are there altogether?",
        f"Find the total number of wheels on the {num(r, cars)} cars and {num(r, small)} {kind} parked {spot}.",
        f"How many wheels do the {cars} cars and {small} {kind} {spot} have in total, with four wheels on each car?",
    ]), [s1, s2, s3], total


TEMPLATES: dict[str, Callable[[random.Random], Problem]] = {f.__name__: f for f in [
    bakery, bus, library, change, recipe, pages, league, temperature, tickets, groups, coins, tank,
    collections, train, sharing, savings, wheels]}


def stream(seed: int) -> Iterator[tuple[str, Example]]:
    """(template name, example) forever, each question at most once."""
    r, seen, order = random.Random(seed), set(), sorted(TEMPLATES)
    while True:
        name = r.choice(order)
        q, steps, n = TEMPLATES[name](r)
        if q in seen:
            continue
        seen.add(q)
        text = "Question: " + q + "\n" + "\n".join(steps) + "\nAnswer: " + str(n)
        yield name, {"question": q, "answer": str(n), "text": text}


def build(count: int = 200, seed: int = 7) -> list[Example]:
    return [ex for _, ex in itertools.islice(stream(seed), count)]
