"""Arithmetic word problems from many everyday situations, told with many verbs.

The math expert learned the templates of `math_data` and `math_story` rather than arithmetic: on
problems someone else wrote it chose the operation from the sentence shape, e.g. it added the 37
books a library lends out. Here more than sixty shapes (shops and change, travel, time, school,
sport, cooking, farms, gardens, weather, storage, saving, sharing, comparisons...) draw their
events from a `Lexicon` in which each operation is signalled by many phrases that fit their
context, and every problem is posed in several sentence orders (story then question, question
first, "... if ...?", an instruction), sometimes with an aside that carries no number, so that
only the meaning of the words says which sum to do. The worked steps keep the zoo's form: one
short sentence per step, each with exactly one `a op b = c`, in computation order. The stream is
`math_data.problem_stream(SHAPES, seed)`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

Problem = tuple[str, list[str], int]  # question, worked steps, final answer

NAMES = ["Amara", "Kwame", "Aiko", "Hiroshi", "Priya", "Arjun", "Mei", "Wei", "Fatima", "Omar", "Sofia", "Mateo", "Olga",
         "Dmitri", "Ngozi", "Chidi", "Leila", "Hassan", "Ingrid", "Lars", "Ana", "João", "Yuki", "Kofi", "Zara", "Ravi",
         "Lucía", "Diego", "Emma", "Noah", "Siobhan", "Tariq", "Nia", "Malik", "Elif", "Emre", "Hana", "Min-jun", "Thandiwe",
         "Sipho", "Aroha", "Tane", "Lena", "Pablo", "Isabela", "Anil", "Sana", "Tomasz", "Marta", "Ayesha", "Bilal",
         "Chloe", "Jamal", "Rosa", "Femi", "Mariam", "Ivan", "Nadia", "Wen", "Kiri", "Astrid", "Javier", "Esi", "Farah"]
TEACHERS = ["Mr Okafor", "Ms Tanaka", "Mrs Rossi", "Mr Novak", "Ms Haddad", "Mrs Mensah", "Mr Silva", "Ms Kowalski"]
TEAMS = ["Lions", "Tigers", "Eagles", "Falcons", "Sharks", "Wolves", "Comets", "Rockets", "Bears", "Hawks"]
GOODS = [("notebook", "notebooks"), ("mango", "mangoes"), ("sandwich", "sandwiches"), ("toy car", "toy cars"),
         ("candle", "candles"), ("scarf", "scarves"), ("comic", "comics"), ("plant pot", "plant pots"), ("ticket", "tickets"),
         ("cupcake", "cupcakes"), ("torch", "torches"), ("paintbrush", "paintbrushes"), ("bus pass", "bus passes")]
SMALL = ["marbles", "stickers", "crayons", "shells", "beads", "buttons", "postcards", "badges", "pebbles", "trading cards"]
FRUIT = ["apples", "oranges", "pears", "plums", "mangoes", "lemons", "peaches", "apricots", "figs", "limes", "guavas"]
SWEETS = ["sweets", "cherries", "grapes", "biscuits", "dates", "strawberries", "chocolates", "dumplings"]
DAYS = [("Monday", "Tuesday"), ("Wednesday", "Thursday"), ("Friday", "Saturday"), ("Saturday", "Sunday")]
WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten", 11: "eleven"}
MULT = {2: "twice", 3: "three times", 4: "four times"}
NEUTRAL = {"+": "Add", "-": "Subtract", "*": "Multiply", "/": "Divide"}
INSTRUCT = ["Find", "Work out", "Calculate", "Figure out", "Determine"]
ASIDES = ["It is a sunny day.", "The weather is cold and windy.", "Everyone is in a good mood.", "Nobody is in a hurry.",
          "The radio is playing quietly.", "It has been a long week.", "There is a light breeze outside.",
          "It is raining a little.", "The town is busy today.", "Birds are singing outside."]
SAME = "^"  # written after a clause's leading subject, which an "if ..." list may leave out when repeated


def say(r: random.Random, n: int, words: float = 0.25) -> str:
    """A count as a reader might meet it: mostly digits, sometimes (`words` of the time) in words."""
    if n == 12 and r.random() < words:
        return r.choice(["twelve", "a dozen"])
    return WORDS[n] if n in WORDS and r.random() < words else str(n)


class Work:
    """The worked steps of one problem, each a short sentence with exactly one `a op b = c`; `#`
    in a phrasing stands for that expression."""

    def __init__(self, r: random.Random) -> None:
        self.r, self.steps, self.value = r, [], 0

    def __call__(self, a: int, op: str, b: int, unit: str, *phrasings: str) -> int:
        c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b and a % b == 0 else -1}[op]
        assert c >= 0, (a, op, b)
        # Products and quotients stay within the times tables up to 12.
        assert op not in "*/" or max((a, b) if op == "*" else (b, c)) <= 12, (a, op, b)
        form = self.r.choice(phrasings) if phrasings and self.r.random() < 0.85 else f"{NEUTRAL[op]}: # {unit}."
        self.steps.append(form.replace("#", f"{a} {op} {b} = {c}").replace(" .", "."))
        self.value = c
        return c


def sentence(clause: str) -> str:
    clause = clause.replace(SAME, "")
    return clause[0].upper() + clause[1:] + "."


def brief(facts: list[str]) -> str:
    """The facts as one list for an "if ..." question, a subject repeated from the clause before left out."""
    told = []
    for before, fact in zip([""] + facts, facts):
        subject = fact.split(SAME)[0]
        told.append(fact.split(SAME + " ", 1)[1] if SAME in fact and before.split(SAME)[0] == subject else fact.replace(SAME, ""))
    return ", ".join(told[:-1]) + " and " + told[-1] if len(told) > 1 else told[0]


def pose(r: random.Random, w: Work, facts: list[str], question: str, task: str, when: tuple[str, ...] = ()) -> Problem:
    """The facts (clauses) and the question in one of several orders; `task` is the question as an
    instruction's object ("how many pens Ana has"); `when` are time words for events, in time order."""
    told = [sentence(f) for f in facts]
    if when:
        for i, j in zip(range(1, len(facts)), sorted(r.sample(range(len(when)), len(facts) - 1))):
            told[i] = sentence(f"{when[j]} {facts[i]}") if r.random() < 0.5 else told[i]
    if r.random() < 0.15:
        told.insert(r.randint(1, len(told)), r.choice(ASIDES))
    story, verb = " ".join(told), r.choice(INSTRUCT)
    text = r.choice([f"{story} {question}", f"{story} {question}", f"{question} {story}", f"{question[:-1]} if {brief(facts)}?",
                     f"{story} {verb} {task}.", f"{verb} {task}. {story}"])
    return text, w.steps, w.value


@dataclass(frozen=True)
class Move:
    """One phrase that makes a quantity grow (+) or shrink (-): a clause with {n} (who), {k} (how
    many) and {t} (what), and how a worked step names it."""

    op: str
    text: str
    label: str


class Lexicon:
    """The phrases for adding and taking away, by context: a bus gains people who get on, a library
    loses books it lends out, a temperature falls by degrees."""

    def __init__(self, table: dict[str, dict[str, list[str]]]) -> None:
        self.moves = {ctx: {op: [Move(op, *line.split("|")) for line in lines] for op, lines in ops.items()} for ctx, ops in table.items()}

    def pick(self, r: random.Random, context: str, op: str) -> Move:
        return r.choice(self.moves[context][op])

    def phrases(self, op: str) -> set[str]:
        return {m.text for ops in self.moves.values() for m in ops[op]}


LEXICON = Lexicon({
    "own": {"+": ["{n} buys {k} more {t}|After buying more", "{n} is given {k} {t}|After the gift", "{n} finds {k} more {t}|After finding more",
                  "{n} wins {k} {t} in a game|After winning", "{n} gets {k} {t} as a birthday present|With the present",
                  "a friend gives {n} {k} {t}|With the friend's gift", "{n} collects {k} more {t}|After collecting more",
                  "{n} swaps a toy for {k} {t}|After the swap", "{n} receives {k} {t} in the post|With the parcel",
                  "{n} picks up {k} {t} at a fair|After the fair"],
            "-": ["{n} gives away {k} {t}|After giving some away", "{n} loses {k} {t}|After losing some", "{n} sells {k} of the {t}|After selling",
                  "{n} trades away {k} {t}|After the trade", "{n} gives {k} {t} to a cousin|After the gift to the cousin",
                  "{n} donates {k} {t} to a school|After the donation", "{n} throws away {k} old {t}|After throwing some away",
                  "{k} of the {t} get lost on a trip|After the trip", "{n} hands {k} {t} to a younger brother|After handing some over"]},
    "money": {"+": ["{n} earns ${k} mowing lawns|After earning", "{n} is paid ${k} for babysitting|After being paid",
                    "{n} gets ${k} for a birthday|With the birthday money", "{n} finds ${k} in a coat pocket|After the find",
                    "{n} wins ${k} in a spelling contest|With the prize", "an aunt gives {n} ${k}|With the aunt's gift",
                    "a friend pays {n} back ${k}|After being paid back", "{n} sells an old bike for ${k}|After the sale",
                    "{n} receives ${k} of pocket money|With the pocket money"],
              "-": ["{n} spends ${k} on a book|After buying the book", "{n} pays ${k} for lunch|After lunch", "{n} buys a hat for ${k}|After buying the hat",
                    "{n} donates ${k} to charity|After the donation", "{n} lends ${k} to a friend|After the loan", "{n} loses ${k} on the way home|After the loss",
                    "{n} spends ${k} at the cinema|After the cinema", "{n} gives ${k} to a younger sister|After the gift",
                    "{n} pays a ${k} library fine|After the fine"]},
    "stock": {"+": ["{n} receives a delivery of {k} {t}|After the delivery", "{n} orders {k} more {t}, and they arrive|After the order arrives",
                    "{k} {t} are returned by customers|After the returns", "{n} buys in {k} {t} from a supplier|After buying in",
                    "{n} restocks with {k} {t}|After restocking", "a van brings {k} more {t} to {n}|After the van comes"],
              "-": ["{n} sells {k} {t}|After the sales", "customers buy {k} {t}|After customers buy some", "{n} ships {k} {t} to another town|After shipping",
                    "{n} throws out {k} damaged {t}|After throwing out the damaged ones", "{n} sends {k} {t} back to the factory|After sending some back",
                    "{n} gives away {k} {t} as prizes|After the prizes"]},
    "library": {"+": ["{k} {t} are returned|After the returns", "readers bring back {k} {t}|After they are brought back",
                      "{n} buys {k} new {t}|After buying new ones", "someone donates {k} {t} to {n}|After the donation",
                      "{n} gets {k} {t} back from a school|After getting them back"],
                "-": ["{n} lends out {k} {t}|After lending", "readers borrow {k} {t}|After the borrowing", "{k} {t} are checked out|After the checkouts",
                      "{n} removes {k} worn-out {t}|After removing the worn-out ones", "{n} sends {k} {t} to a branch in another town|After sending some away"]},
    "riders": {"+": ["{k} {t} get on|After some get on", "{k} {t} board|After boarding", "{k} more {t} climb aboard|After they climb aboard",
                     "{k} {t} hop on|After they hop on", "another {k} {t} step on|After they step on", "{k} {t} join the trip|After they join"],
               "-": ["{k} {t} get off|After some get off", "{k} {t} step off|After they step off", "{k} {t} climb off|After they climb off",
                     "{k} {t} hop off|After they hop off", "{k} {t} get out|After they get out", "{k} {t} leave|After some leave"]},
    "cars": {"+": ["{k} {t} drive in|After they drive in", "{k} more {t} arrive|After they arrive", "{k} {t} pull in|After they pull in",
                   "{k} {t} park there|After they park"],
             "-": ["{k} {t} drive out|After they drive out", "{k} {t} pull out|After they pull out", "{k} {t} drive away|After they drive away",
                   "{k} {t} go home|After they go home"]},
    "crowd": {"+": ["{k} more {t} arrive|After they arrive", "{k} {t} join them|After they join", "{k} {t} come in|After they come in",
                    "{k} {t} walk in|After they walk in", "another {k} {t} turn up|After they turn up", "{k} {t} show up late|After the late ones come"],
              "-": ["{k} {t} go home|After some go home", "{k} {t} walk out|After they walk out", "{k} {t} head off|After they head off",
                    "{k} {t} slip away early|After they slip away", "{k} {t} say goodbye and go|After they go", "{k} {t} depart|After they depart"]},
    "heat": {"+": ["{n} rises by {k} degrees|After it rises", "{n} goes up by {k} degrees|After going up", "{n} climbs {k} degrees|After it climbs",
                   "{n} increases by {k} degrees|After the increase", "the sun warms the air by {k} degrees|After the sun warms it"],
             "-": ["{n} falls by {k} degrees|After it falls", "{n} drops {k} degrees|After the drop", "{n} goes down by {k} degrees|After going down",
                   "a cold wind cools the air by {k} degrees|After the wind cools it", "{n} decreases by {k} degrees|After the decrease"]},
    "water": {"+": ["{k} more litres are poured into {n}|After pouring", "rain adds {k} litres to {n}|After the rain", "{k} litres flow into {n}|After the inflow",
                    "someone tops up {n} with {k} litres|After topping up", "a hose fills {n} with another {k} litres|After the hose"],
              "-": ["{k} litres leak out of {n}|After the leak", "{k} litres are used to water plants|After watering", "{k} litres drain away|After draining",
                    "{k} litres evaporate in the sun|After evaporation", "{k} litres are pumped out of {n}|After pumping"]},
    "snow": {"+": ["{k} cm of fresh snow falls|After the snowfall", "{n} gets {k} cm deeper|After it deepens", "a storm adds {k} cm of snow|After the storm"],
             "-": ["{k} cm of {n} melts|After melting", "the sun melts {k} cm of snow|After the thaw", "the wind blows away {k} cm of snow|After the wind",
                   "{n} settles by {k} cm|After it settles"]},
    "battery": {"+": ["{n} charges by {k} percent|After charging", "the charger adds {k} percent|After the charger", "{n} gains {k} percent on a charger|After gaining"],
                "-": ["a video call uses {k} percent|After the call", "games use up {k} percent of the charge|After the games",
                      "{n} drains by {k} percent|After draining", "music streaming uses {k} percent|After the music"]},
    "farm": {"+": ["{k} new {t} are born|After the births", "{n} buys {k} more {t} at the market|After buying more",
                   "a neighbour gives {n} {k} {t}|After the neighbour's gift", "{n} wins {k} {t} at a country fair|After the fair"],
             "-": ["{n} sells {k} {t}|After selling", "{k} {t} run away|After some run away", "{n} takes {k} {t} to market and sells them|After the market",
                   "{k} {t} escape through a gap in the fence|After the escape", "{n} gives {k} {t} to a cousin's farm|After giving some"]},
    "pond": {"+": ["{k} baby {t} hatch in {n}|After the hatching", "a keeper adds {k} {t} to {n}|After adding some", "{k} more {t} are put into {n}|After putting more in"],
             "-": ["{k} {t} are caught|After the catch", "a heron eats {k} {t}|After the heron", "{k} {t} are moved to another tank|After the move",
                   "{k} {t} are given to a school|After giving some"]},
    "score": {"+": ["{n} scores {k} more points|After scoring", "{n} earns {k} points|After earning", "{n} gets a bonus of {k} points|With the bonus",
                    "{n} wins {k} points|After winning", "{n} collects {k} points for a right answer|After the right answer"],
              "-": ["{n} loses {k} points|After losing", "{n} gets a penalty of {k} points|After the penalty", "{k} points are taken off {n} for a wrong answer|After the wrong answer",
                    "{n} drops {k} points|After the drop", "{n} pays {k} points for a hint|After the hint"]},
    "food": {"+": ["{n} bakes {k} more {t}|After baking more", "{n} makes another {k} {t}|After making more", "a neighbour brings over {k} {t}|With the neighbour's",
                   "{n} buys {k} {t} at the bakery|After buying some", "an aunt drops off {k} {t}|With the aunt's"],
             "-": ["{n} eats {k} {t}|After eating", "the family eats {k} of the {t}|After the family eats", "{n} serves {k} {t} to guests|After serving",
                   "{n} packs {k} {t} for lunch|After packing lunch", "{k} {t} get burnt and are thrown away|After the burnt ones go",
                   "{n} gives {k} {t} to the neighbours|After giving some"]},
    "garden": {"+": ["{n} plants {k} more {t}|After planting", "{k} new {t} bloom|After the new ones bloom", "{n} is given {k} {t} to plant|After planting the gift",
                     "{n} buys {k} {t} from a nursery and plants them|After planting more"],
               "-": ["{n} picks {k} {t} for a vase|After picking", "rabbits eat {k} of the {t}|After the rabbits", "{k} {t} wilt and die|After the wilting",
                     "a frost kills {k} {t}|After the frost", "{n} digs up {k} {t} to give away|After digging some up"]},
    "store": {"+": ["a truck delivers {k} {t} to {n}|After the delivery", "{k} more {t} are stacked in {n}|After stacking", "workers unload {k} {t} into {n}|After unloading",
                    "{k} {t} are brought in|After bringing more in"],
              "-": ["{k} {t} are loaded onto a truck|After loading", "workers take out {k} {t}|After taking some out", "{k} {t} are moved to another room|After the move",
                    "{k} {t} are used up|After using some", "{k} {t} are sent to a shop|After sending some"]},
    "lift": {"+": ["{n} goes up {k} floors|After going up", "{n} rises {k} floors|After rising", "{n} climbs {k} floors|After climbing"],
             "-": ["{n} goes down {k} floors|After going down", "{n} drops {k} floors|After dropping", "{n} descends {k} floors|After descending"]},
})


@dataclass(frozen=True)
class Scene:
    """A quantity that events raise and lower: who or what holds it, the words for it, and the
    lexicon context whose phrases move it."""

    name: str
    context: str
    cast: tuple[tuple[str, tuple[str, ...]], ...]  # (holder, the things it holds); holder "" is a person's name
    starts: tuple[str, ...]  # opening clauses: {n} holder, {v} how many, {t} what
    asks: tuple[tuple[str, str], ...]  # (question, the same as an instruction's object)
    when: tuple[str, ...] = ("Then", "Later", "After that,", "Next,")  # in time order
    span: tuple[int, int] = (12, 60)
    top: int = 150
    unit: str | None = None  # for the steps; None: the things themselves
    groups: tuple[tuple[str, str, str], ...] = ()  # (one, many, "in"/"on"): a start in equal groups
    digits: bool = False


def each(holders: list[str], things: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple((h, tuple(things)) for h in holders)


def clause(template: str, **fill: str) -> str:
    text = template.format(**fill)
    return text.replace(fill["n"] + " ", fill["n"] + SAME + " ", 1) if template.startswith("{n} ") else text


def tally(r: random.Random, s: Scene) -> Problem:
    """A start and two or three events, or a start in equal groups and one or two events."""
    holder, things = r.choice(s.cast)
    n, t, w = holder or r.choice(NAMES), r.choice(things), Work(r)
    unit, num = (t if s.unit is None else s.unit), (str if s.digits else lambda v: say(r, v))
    if s.groups and r.random() < 0.35:
        one, many, at = r.choice(s.groups)
        count, per = r.randint(2, 9), r.randint(2, 12)
        facts = [f"{n}{SAME} has {num(count)} {many} of {t}, with {num(per)} {at} each {one}"]
        value, events = w(count, "*", per, unit, f"The {many} hold # {t}.", f"At the start: # {t}."), r.randint(1, 2)
    else:
        value, events = r.randint(*s.span), r.randint(2, 3)
        facts = [clause(r.choice(s.starts), n=n, v=num(value), t=t)]
    for _ in range(events):
        op = r.choice([op for op, ok in (("+", value + 2 <= s.top), ("-", value >= 4)) if ok])
        k = r.randint(2, min(25, s.top - value)) if op == "+" else r.randint(2, min(25, value - 2))
        move = LEXICON.pick(r, s.context, op)
        facts.append(clause(move.text, n=n, k=num(k), t=t))
        value = w(value, op, k, unit, f"{move.label}: # {unit}.", f"That makes # {unit}." if op == "+" else f"That leaves # {unit}.")
    question, task = (x.format(n=n, t=t) for x in r.choice(s.asks))
    return pose(r, w, facts, question, task, s.when)


SCENES = [
    Scene("collection", "own", each([""], SMALL), ("{n} has {v} {t}", "{n} owns {v} {t}", "{n} keeps {v} {t} in a shoebox", "{n}'s collection holds {v} {t}"),
          (("How many {t} does {n} have now?", "how many {t} {n} has now"), ("How many {t} does {n} end up with?", "how many {t} {n} ends up with")),
          groups=(("album page", "album pages", "on"), ("tin", "tins", "in"), ("packet", "packets", "in"))),
    Scene("wallet", "money", each([""], ["dollars"]), ("{n} has ${v}", "{n} has ${v} in a wallet", "{n} starts the month with ${v}", "there is ${v} in {n}'s piggy bank"),
          (("How many dollars does {n} have now?", "how many dollars {n} has now"), ("How much money does {n} have at the end?", "how much money {n} has at the end")),
          span=(15, 90), digits=True),
    Scene("shop", "stock", each(["the shop", "the corner store", "the market stall", "the toy store", "the kiosk"], [g[1] for g in GOODS]),
          ("{n} has {v} {t} in stock", "{n} starts the week with {v} {t}", "there are {v} {t} on the shelves of {n}"),
          (("How many {t} does {n} have now?", "how many {t} {n} has now"), ("How many {t} are in stock at the end?", "how many {t} are in stock at the end")),
          when=("Then", "Later that day", "The next day,", "After that,"), groups=(("box", "boxes", "in"), ("carton", "cartons", "in"))),
    Scene("library", "library", each(["the library", "the school library", "the town library", "the mobile library"], ["books", "comics", "magazines", "DVDs", "novels", "atlases"]),
          ("{n} has {v} {t} on its shelves", "there are {v} {t} on the shelves of {n}", "{n}'s shelves hold {v} {t}"),
          (("How many {t} are on the shelves now?", "how many {t} are on the shelves now"), ("How many {t} are in {n} now?", "how many {t} are in {n} now")),
          when=("On Monday", "On Tuesday", "On Wednesday", "On Thursday")),
    Scene("bus", "riders", each(["the bus", "the train", "the tram", "the ferry", "the minibus"], ["passengers", "people", "riders", "travellers", "tourists"]),
          ("{n} has {v} {t} on board", "there are {v} {t} on {n}", "{n} leaves the depot with {v} {t}"),
          (("How many {t} are on {n} now?", "how many {t} are on {n} now"), ("How many {t} are on board at the end?", "how many {t} are on board at the end")),
          when=("At the first stop,", "At the next stop,", "Further on,", "At the last stop,"), span=(8, 50)),
    Scene("car_park", "cars", each(["the car park", "the parking lot", "the garage"], ["cars", "vans", "taxis", "motorbikes"]),
          ("there are {v} {t} in {n}", "{n} holds {v} {t}", "{n} has {v} {t} parked in it"),
          (("How many {t} are in {n} now?", "how many {t} are in {n} now"), ("How many {t} are parked there at the end?", "how many {t} are parked there at the end"))),
    Scene("crowd", "crowd", (("the party", ("guests", "friends", "children")), ("the museum", ("visitors", "tourists", "children")),
                             ("the concert", ("fans", "people")), ("the playground", ("children", "kids")), ("the school hall", ("parents", "pupils"))),
          ("there are {v} {t} at {n}", "{n} starts with {v} {t}"),
          (("How many {t} are at {n} now?", "how many {t} are at {n} now"), ("How many {t} are there in the end?", "how many {t} are there in the end"))),
    Scene("temperature", "heat", each(["the temperature"], ["degrees"]), ("{n} is {v} degrees at dawn", "at sunrise {n} is {v} degrees"),
          (("How many degrees is it in the end?", "the temperature in the end, in degrees"),
           ("How many degrees does the thermometer show at the end?", "how many degrees the thermometer shows at the end")),
          when=("By noon,", "In the afternoon,", "In the evening,", "At night,"), span=(2, 25), top=40, digits=True),
    Scene("tank", "water", each(["the tank", "the barrel", "the paddling pool", "the water trough"], ["litres"]),
          ("{n} holds {v} litres of water", "there are {v} litres of water in {n}"),
          (("How many litres are in {n} now?", "how many litres are in {n} now"), ("How many litres of water are left in {n}?", "how many litres of water are left in {n}")),
          span=(20, 90), top=200, digits=True),
    Scene("snow", "snow", each(["the snow"], ["cm"]), ("{n} is {v} cm deep in the morning", "there is {v} cm of snow on the ground"),
          (("How many cm deep is the snow at the end?", "how deep the snow is at the end, in cm"),), when=("By noon,", "In the afternoon,", "In the evening,", "Overnight,"),
          span=(10, 60), digits=True),
    Scene("battery", "battery", each(["the phone battery", "the tablet battery", "the laptop battery"], ["percent"]), ("{n} is at {v} percent", "{n} shows {v} percent"),
          (("What percent does the battery show at the end?", "what percent the battery shows at the end"),), span=(20, 70), top=100, digits=True),
    Scene("flock", "farm", each([""], ["sheep", "goats", "cows", "hens", "ducks", "pigs", "rabbits"]), ("{n} has {v} {t} on the farm", "{n} keeps {v} {t}", "{n}'s farm has {v} {t}"),
          (("How many {t} are on {n}'s farm now?", "how many {t} are on {n}'s farm now"), ("How many {t} are left on the farm?", "how many {t} are left on the farm"))),
    Scene("pond", "pond", each(["the pond", "the aquarium", "the big fish tank"], ["fish", "goldfish", "guppies", "koi"]), ("there are {v} {t} in {n}", "{n} has {v} {t}"),
          (("How many {t} are in {n} now?", "how many {t} are in {n} now"),)),
    Scene("game_score", "score", each([""], ["points"]), ("{n} has {v} points in a board game", "{n} is on {v} points in a quiz", "{n} starts the round with {v} points"),
          (("How many points does {n} have now?", "how many points {n} has now"), ("What is {n}'s score at the end?", "{n}'s score at the end")), digits=True),
    Scene("kitchen", "food", each([""], ["cookies", "muffins", "pancakes", "dumplings", "samosas", "rolls", "tarts", "empanadas", "cupcakes"]),
          ("{n} has {v} {t}", "{n} bakes {v} {t}", "there are {v} {t} on {n}'s kitchen table"),
          (("How many {t} are there now?", "how many {t} there are now"), ("How many {t} does {n} have in the end?", "how many {t} {n} has in the end")),
          groups=(("tray", "trays", "on"), ("box", "boxes", "in"), ("plate", "plates", "on"))),
    Scene("flower_bed", "garden", each([""], ["tulips", "roses", "sunflowers", "daisies", "lilies", "marigolds"]),
          ("{n}'s garden has {v} {t}", "{n} grows {v} {t}", "there are {v} {t} in {n}'s garden"),
          (("How many {t} are in {n}'s garden now?", "how many {t} are in {n}'s garden now"),)),
    Scene("storeroom", "store", each(["the warehouse", "the pantry", "the storeroom", "the cellar", "the shed"], ["boxes", "cans", "jars", "sacks of rice", "bottles", "tins of paint"]),
          ("{n} holds {v} {t}", "there are {v} {t} in {n}", "{n} has {v} {t} stacked on shelves"),
          (("How many {t} are in {n} now?", "how many {t} are in {n} now"), ("How many {t} are left in {n}?", "how many {t} are left in {n}"))),
    Scene("lift", "lift", each(["the lift"], ["floors"]), ("{n} is on floor {v}", "{n} waits at floor {v}"),
          (("Which floor is the lift on now?", "which floor the lift is on now"), ("On which floor does the lift stop at the end?", "the floor where the lift stops at the end")),
          span=(2, 20), top=40, unit="", digits=True),
]


def change(r: random.Random) -> Problem:
    name, (one, many), w = r.choice(NAMES), r.choice(GOODS), Work(r)
    count, price = r.randint(2, 9), r.randint(2, 12)
    note = next(n for n in (10, 20, 50, 100, 200) if n > count * price)
    cost = w(count, "*", price, "dollars", f"The {many} cost # dollars.", "The price of all of them is # dollars.")
    w(note, "-", cost, "dollars", "The change is # dollars.", f"{name} gets back # dollars.")
    facts = r.choice([[f"{name}{SAME} buys {say(r, count)} {many} at ${price} each", f"{name}{SAME} {r.choice(['pays with', 'hands over', 'gives the cashier'])} a ${note} note"],
                      [f"a {one} costs ${price}", f"{name} hands over ${note} for {say(r, count)} of them"]])
    return pose(r, w, facts, f"How much change does {name} get?", f"how much change {name} gets")


def bill(r: random.Random) -> Problem:
    name, ((one, many), (one2, many2)), w = r.choice(NAMES), r.sample(GOODS, 2), Work(r)
    n1, p1, n2, p2 = r.randint(2, 9), r.randint(2, 12), r.randint(2, 9), r.randint(2, 12)
    a = w(n1, "*", p1, "dollars", f"The {many} cost # dollars.")
    b = w(n2, "*", p2, "dollars", f"The {many2} cost # dollars.")
    w(a, "+", b, "dollars", "Altogether: # dollars.", "The bill is # dollars.")
    facts = r.choice([[f"{name}{SAME} buys {say(r, n1)} {many} at ${p1} each and {say(r, n2)} {many2} at ${p2} each"],
                      [f"a {one} costs ${p1} and a {one2} costs ${p2}", f"{name}{SAME} buys {say(r, n1)} {many} and {say(r, n2)} {many2}"]])
    return pose(r, w, facts, f"How much does {name} spend?", f"how much {name} spends in all")


def discount(r: random.Random) -> Problem:
    name, (one, many), w = r.choice(NAMES), r.choice(GOODS), Work(r)
    price, count = r.randint(4, 15), r.randint(2, 9)
    off = r.randint(max(1, price - 12), price - 2)
    sale = w(price, "-", off, "dollars", f"In the sale a {one} costs # dollars.", "The sale price is # dollars.")
    w(count, "*", sale, "dollars", f"{name} pays # dollars.", "The total is # dollars.")
    facts = r.choice([[f"a {one} usually costs ${price}", f"in a sale the price drops by ${off}", f"{name}{SAME} buys {say(r, count)} {many} in the sale"],
                      [f"{name}{SAME} buys {say(r, count)} {many} in a sale", f"each {one} normally costs ${price}, but the sale takes ${off} off"]])
    return pose(r, w, facts, f"How much does {name} pay?", f"how much {name} pays")


def speed(r: random.Random) -> Problem:
    name, w = r.choice(NAMES), Work(r)
    how, doing, lo, hi = r.choice([("cycles", "Cycling", 8, 12), ("rows", "Rowing", 2, 5), ("skates", "Skating", 6, 12), ("jogs", "Jogging", 5, 9)])
    pace, hours, extra = r.randint(lo, hi), r.randint(2, 6), r.randint(2, 20)
    far = w(pace, "*", hours, "km", f"{doing}: # km.", f"{name} {how} # km.")
    w(far, "+", extra, "km", "With the walk: # km.", "In all: # km.")
    facts = [f"{name}{SAME} {how} at {pace} km an hour for {say(r, hours)} hours", f"{name}{SAME} then walks {extra} km more"]
    return pose(r, w, facts, f"How many km does {name} travel altogether?", f"how many km {name} travels altogether")


def trip_left(r: random.Random) -> Problem:
    name, w = r.choice(NAMES), Work(r)
    place = r.choice(["the coast", "the mountains", "a lake", "grandma's village", "the city", "a national park"])
    total, a = r.randint(60, 99), r.randint(10, 40)
    b = r.randint(5, total - a - 5)
    done = w(a, "+", b, "km", "Driven so far: # km.", "Both parts: # km.")
    w(total, "-", done, "km", "Still to go: # km.", "Left to drive: # km.")
    facts = r.choice([[f"the drive from home to {place} is {total} km", f"{name}{SAME} drives {a} km before lunch and {b} km after lunch"],
                      [f"{name}{SAME} is driving {total} km to {place}", f"{name}{SAME} has done {a} km in the morning and {b} km in the afternoon"]])
    return pose(r, w, facts, f"How many km does {name} still have to drive?", f"how many km {name} still has to drive")


def round_trip(r: random.Random) -> Problem:
    name, w = r.choice(NAMES), Work(r)
    away, days = r.randint(2, 6), r.randint(2, 12)
    day = w(away, "*", 2, "km", "There and back is # km a day.", "One day: # km.")
    w(day, "*", days, "km", "Over all the days: # km.", "Altogether: # km.")
    place = r.choice(["school", "the pool", "the library", "football practice"])
    facts = [f"{place} is {away} km from {name}'s home", f"{name}{SAME} walks there and back every day"]
    return pose(r, w, facts, f"How many km does {name} walk in {say(r, days)} days?", f"how many km {name} walks in {days} days")


def time_total(r: random.Random) -> Problem:
    name, w = r.choice(NAMES), Work(r)
    a, b, c = r.sample(["on homework", "practising the piano", "reading", "tidying up", "walking the dog", "drawing", "playing chess"], 3)
    x, y, z = r.randint(5, 45), r.randint(5, 45), r.randint(5, 45)
    first = w(x, "+", y, "minutes", "The first two: # minutes.", "So far: # minutes.")
    w(first, "+", z, "minutes", "All three: # minutes.", "Altogether: # minutes.")
    facts = r.choice([[f"{name}{SAME} spends {x} minutes {a}, {y} minutes {b} and {z} minutes {c}"],
                      [f"{name}{SAME} spends {x} minutes {a}", f"{name}{SAME} then spends {y} minutes {b}", f"{name}{SAME} finishes with {z} minutes {c}"]])
    return pose(r, w, facts, f"How many minutes does {name} spend on all three?", f"how many minutes {name} spends in all")


def playlist(r: random.Random) -> Problem:
    name, w = r.choice(NAMES), Work(r)
    songs, length, pause = r.randint(2, 12), r.randint(2, 5), r.randint(2, 15)
    music = w(songs, "*", length, "minutes", "The songs last # minutes.", "Music: # minutes.")
    w(music, "+", pause, "minutes", "With the break: # minutes.", "Altogether: # minutes.")
    facts = r.choice([[f"a playlist has {say(r, songs)} songs", f"each song lasts {length} minutes", f"there is a {pause}-minute break at the end"],
                      [f"{name}{SAME} plays {say(r, songs)} songs of {length} minutes each", f"{name}{SAME} then takes a break of {pause} minutes"]])
    return pose(r, w, facts, "How many minutes is that altogether?", "how many minutes that takes altogether")


def reading_left(r: random.Random) -> Problem:
    name, w = r.choice(NAMES), Work(r)
    per, days = r.randint(4, 12), r.randint(2, 9)
    pages = r.randint(per * days + 5, per * days + 80)
    done = w(per, "*", days, "pages", "Pages read: # pages.", f"{name} reads # pages.")
    w(pages, "-", done, "pages", "Pages left: # pages.", "Still to read: # pages.")
    facts = r.choice([[f"{name}'s book has {pages} pages", f"{name}{SAME} reads {per} pages a day for {say(r, days)} days"],
                      [f"{name}{SAME} is reading a {pages}-page book", f"{name}{SAME} reads {per} pages every day for {say(r, days)} days"]])
    return pose(r, w, facts, "How many pages are left to read?", "how many pages are left to read")


def reading_more(r: random.Random) -> Problem:
    name, (day1, day2), w = r.choice(NAMES), r.choice(DAYS), Work(r)
    first, times = r.randint(3, 12), r.choice([2, 3])
    second = w(first, "*", times, "pages", f"On {day2}: # pages.", f"{MULT[times].capitalize()} as many: # pages.")
    w(first, "+", second, "pages", "Both days: # pages.", "Together: # pages.")
    facts = [f"{name}{SAME} reads {say(r, first)} pages on {day1}", f"{name}{SAME} reads {MULT[times]} as many pages on {day2}"]
    return pose(r, w, facts, f"How many pages does {name} read on the two days together?", f"how many pages {name} reads on the two days")


def class_groups(r: random.Random) -> Problem:
    teacher, w = r.choice(TEACHERS), Work(r)
    groups, size, absent = r.randint(2, 9), r.randint(2, 6), r.randint(2, 6)
    total = groups * size + absent
    here = w(total, "-", absent, "students", "Students present: # students.", "In class today: # students.")
    w(here, "/", size, "groups", "Number of groups: # groups.", "The groups: # groups.")
    facts = [f"{teacher}'s class has {total} students", f"{say(r, absent)} students are absent today",
             f"{teacher} {r.choice(['puts', 'splits', 'divides'])} the {r.choice(['others', 'rest'])} into groups of {say(r, size)}"]
    return pose(r, w, facts, "How many groups are there?", "how many groups there are")


def cafe_tables(r: random.Random) -> Problem:
    place, w = r.choice(["a café", "the canteen", "a restaurant", "the reading room"]), Work(r)
    tables, chairs = r.randint(2, 9), r.randint(2, 8)
    empty = r.randint(2, tables * chairs - 2)
    seats = w(tables, "*", chairs, "chairs", "There are # chairs.", "Chairs: # chairs.")
    w(seats, "-", empty, "chairs", "Taken: # chairs.", "Chairs with someone on them: # chairs.")
    facts = r.choice([[f"{place} has {say(r, tables)} tables with {say(r, chairs)} chairs at each", f"every chair is taken except {empty}"],
                      [f"there are {tables} tables in {place}, each with {chairs} chairs", f"{empty} of the chairs are empty"]])
    return pose(r, w, facts, "How many chairs are taken?", "how many chairs are taken")


def supplies(r: random.Random) -> Problem:
    teacher, t, w = r.choice(TEACHERS), r.choice(["pencils", "crayons", "sheets of paper", "stickers", "markers"]), Work(r)
    per, kids = r.randint(2, 6), r.randint(2, 12)
    stock = r.randint(per * kids + 2, per * kids + 40)
    given = w(per, "*", kids, t, f"Handed out: # {t}.", f"The students get # {t}.")
    w(stock, "-", given, t, f"Left: # {t}.", f"{teacher} keeps # {t}.")
    facts = [f"{teacher}{SAME} has {stock} {t}", f"{teacher}{SAME} {r.choice(['gives', 'hands out', 'passes out'])} {say(r, per)} {t} to each of {say(r, kids)} students"]
    return pose(r, w, facts, f"How many {t} does {teacher} have left?", f"how many {t} {teacher} has left")


def basketball(r: random.Random) -> Problem:
    name, w = r.choice(NAMES), Work(r)
    twos, threes = r.randint(2, 12), r.randint(2, 10)
    a = w(twos, "*", 2, "points", "Two-point baskets: # points.")
    b = w(threes, "*", 3, "points", "Three-point baskets: # points.")
    w(a, "+", b, "points", "Total: # points.", f"{name} scores # points.")
    facts = r.choice([[f"{name}{SAME} scores {say(r, twos)} two-point baskets and {say(r, threes)} three-point baskets in a game"],
                      [f"{name}{SAME} makes {say(r, twos)} baskets worth 2 points each", f"{name}{SAME} also makes {say(r, threes)} baskets worth 3 points each"]])
    return pose(r, w, facts, f"How many points does {name} score?", f"how many points {name} scores")


def match_more(r: random.Random) -> Problem:
    (a, b), (game, unit), w = r.sample(TEAMS, 2), r.choice([("cricket match", "runs"), ("basketball game", "points"), ("hockey season", "goals"), ("quiz", "points")]), Work(r)
    first, times = r.randint(2, 12), r.choice([2, 3, 4])
    second = w(first, "*", times, unit, f"The {b} score # {unit}.")
    w(second, "-", first, unit, f"The difference is # {unit}.", f"The {b} score # more {unit}.")
    facts = [f"the {a} score {first} {unit} in a {game}", f"the {b} score {MULT[times]} as many {unit}"]
    return pose(r, w, facts, f"How many more {unit} do the {b} score than the {a}?", f"how many more {unit} the {b} score than the {a}")


def recipe_more(r: random.Random) -> Problem:
    name, dish, ing, w = r.choice(NAMES), r.choice(["pancakes", "bread", "cookies", "muffins"]), r.choice(["cups of flour", "eggs", "spoons of sugar", "cups of milk"]), Work(r)
    need, batches = r.randint(2, 6), r.randint(2, 6)
    have = r.randint(2, need * batches - 2)
    total = w(need, "*", batches, ing, f"For all the batches: # {ing}.", f"{name} needs # {ing}.")
    w(total, "-", have, ing, f"Still needed: # {ing}.", f"{name} must get # more {ing}.")
    facts = [f"a batch of {dish} needs {need} {ing}", f"{name}{SAME} wants to make {say(r, batches)} batches", f"{name}{SAME} has only {have} {ing}"]
    return pose(r, w, facts, f"How many more {ing} does {name} need?", f"how many more {ing} {name} needs")


def recipe_double(r: random.Random) -> Problem:
    name, (v1, v2), soup, w = r.choice(NAMES), r.choice([("carrots", "potatoes"), ("onions", "tomatoes"), ("peppers", "courgettes")]), r.choice(["soup", "stew", "curry"]), Work(r)
    x, y, times = r.randint(2, 6), r.randint(2, 6), r.choice([2, 3])
    pot = w(x, "+", y, "vegetables", "One pot: # vegetables.", f"One pot uses # {v1} and {v2}.")
    w(pot, "*", times, "vegetables", f"{MULT[times].capitalize()} as much: # vegetables.", "In all: # vegetables.")
    facts = [f"a pot of {soup} needs {say(r, x)} {v1} and {say(r, y)} {v2}", f"{name}{SAME} makes {MULT[times]} as much {soup} for a party"]
    return pose(r, w, facts, f"How many {v1} and {v2} does {name} use altogether?", f"how many {v1} and {v2} {name} uses altogether")


def pizza(r: random.Random) -> Problem:
    name, (dish, pieces), w = r.choice(NAMES), r.choice([("pizza", "slices"), ("cake", "pieces"), ("pie", "slices"), ("lasagne", "portions")]), Work(r)
    count, cut = r.randint(2, 6), r.choice([4, 6, 8, 10, 12])
    eaten = r.randint(2, count * cut - 2)
    total = w(count, "*", cut, pieces, f"There are # {pieces}.", f"All the {pieces}: #.")
    w(total, "-", eaten, pieces, f"{pieces.capitalize()} left: #.", f"Left over: # {pieces}.")
    eaters = r.choice(["the guests eat", "the children eat", "the family finishes", "everyone eats"])
    facts = [f"{name}{SAME} orders {say(r, count)} {dish}s for a party", f"each {dish} is cut into {say(r, cut)} {pieces}", f"{eaters} {eaten} {pieces}"]
    return pose(r, w, facts, f"How many {pieces} are left over?", f"how many {pieces} are left over")


def egg_cartons(r: random.Random) -> Problem:
    name, w = r.choice(NAMES), Work(r)
    hens, laid, box = 1, 1, 5
    while (hens * laid) % box or not 2 <= hens * laid // box <= 12:
        hens, laid, box = r.randint(2, 12), r.randint(2, 7), r.choice([2, 3, 4, 6])
    eggs = w(hens, "*", laid, "eggs", "The hens lay # eggs.", "Eggs: # eggs.")
    w(eggs, "/", box, "cartons", "Cartons filled: # cartons.", f"{name} fills # cartons.")
    facts = [f"{name}{SAME} keeps {say(r, hens)} hens", f"each hen lays {say(r, laid)} eggs this week", f"{name}{SAME} packs all the eggs into cartons of {box}"]
    return pose(r, w, facts, f"How many cartons does {name} fill?", f"how many cartons {name} fills")


def garden_rows(r: random.Random) -> Problem:
    name, plant, w = r.choice(NAMES), r.choice(["tomato plants", "lettuces", "onions", "tulip bulbs", "bean plants", "cabbages"]), Work(r)
    rows, per, pots = r.randint(2, 9), r.randint(2, 12), r.randint(2, 20)
    bed = w(rows, "*", per, plant, f"In the rows: # {plant}.", f"The rows hold # {plant}.")
    w(bed, "+", pots, plant, f"With the pots: # {plant}.", f"In all: # {plant}.")
    facts = [f"{name}{SAME} plants {say(r, rows)} rows of {plant} with {say(r, per)} in each row", f"{name}{SAME} also plants {pots} {plant} in pots"]
    return pose(r, w, facts, f"How many {plant} does {name} plant in all?", f"how many {plant} {name} plants in all")


def harvest_share(r: random.Random) -> Problem:
    name, fruit, w = r.choice(NAMES), r.choice(FRUIT), Work(r)
    per, baskets = r.randint(2, 12), r.randint(2, 6)
    morning = r.randint(2, per * baskets - 2)
    total = w(morning, "+", per * baskets - morning, fruit, f"Picked: # {fruit}.", f"In all: # {fruit}.")
    w(total, "/", baskets, fruit, f"In each basket: # {fruit}.", f"Each basket gets # {fruit}.")
    facts = [f"{name}{SAME} {r.choice(['picks', 'gathers', 'collects'])} {morning} {fruit} in the morning and {per * baskets - morning} in the afternoon",
             f"{name}{SAME} puts them into {say(r, baskets)} baskets, the same number in each"]
    return pose(r, w, facts, f"How many {fruit} go into each basket?", f"how many {fruit} go into each basket")


def boxes_needed(r: random.Random) -> Problem:
    name, t, w = r.choice(NAMES), r.choice(["jars of jam", "books", "glasses", "toys", "candles", "mugs"]), Work(r)
    per, boxes = r.randint(2, 12), r.randint(4, 12)
    have = r.randint(2, boxes - 2)
    need = w(per * boxes, "/", per, "boxes", "Boxes needed: # boxes.", "Full boxes: # boxes.")
    w(need, "-", have, "boxes", "Still to get: # boxes.", "More boxes: # boxes.")
    facts = [f"{name}{SAME} has {per * boxes} {t} to pack", f"each box holds {say(r, per)} {t}", f"{name}{SAME} already has {say(r, have)} empty boxes"]
    return pose(r, w, facts, f"How many more boxes does {name} need?", f"how many more boxes {name} needs")


def sharing(r: random.Random) -> Problem:
    name, t, w = r.choice(NAMES), r.choice(SWEETS), Work(r)
    people, share = r.randint(2, 9), r.randint(3, 12)
    used = r.randint(1, share - 2)
    w(people * share, "/", people, t, f"Each share: # {t}.", f"Each one gets # {t}.")
    w(share, "-", used, t, f"Each one keeps # {t}.", f"Left for each: # {t}.")
    facts = r.choice([[f"{name}{SAME} shares {people * share} {t} equally among {say(r, people)} friends", f"each friend eats {used} of them"],
                      [f"{people * share} {t} are split evenly between {say(r, people)} children", f"each child gives {used} away"]])
    return pose(r, w, facts, f"How many {t} does each one have left?", f"how many {t} each one has left")


def share_with_self(r: random.Random) -> Problem:
    name, t, w = r.choice(NAMES), r.choice(SMALL + SWEETS), Work(r)
    friends, share = r.randint(2, 11), r.randint(2, 12)
    people = w(friends, "+", 1, "people", f"With {name}: # people.", "People sharing: # people.")
    w(people * share, "/", people, t, f"Each person gets # {t}.", f"One share: # {t}.")
    facts = r.choice([[f"{name} and {say(r, friends)} friends share {people * share} {t} equally"],
                      [f"{people * share} {t} are shared equally by {name} and {say(r, friends)} cousins"]])
    return pose(r, w, facts, f"How many {t} does each person get?", f"how many {t} each person gets")


def savings(r: random.Random) -> Problem:
    name, w = r.choice(NAMES), Work(r)
    per, weeks = r.randint(2, 12), r.randint(2, 12)
    spent = r.randint(2, per * weeks - 2)
    saved = w(per, "*", weeks, "dollars", "Saved: # dollars.", f"{name} saves # dollars.")
    w(saved, "-", spent, "dollars", "Left: # dollars.", f"{name} still has # dollars.")
    (verb, to), gift = r.choice([("spends", "on"), ("pays", "for")]), r.choice(["a video game", "new trainers", "a present for a friend", "a concert ticket", "a skateboard"])
    facts = r.choice([[f"{name}{SAME} saves ${per} a week for {say(r, weeks)} weeks", f"{name}{SAME} then {verb} ${spent} {to} {gift}"],
                      [f"each week {name} puts ${per} in a jar", f"after {say(r, weeks)} weeks {name} takes out ${spent} for {gift}"]])
    return pose(r, w, facts, f"How much money does {name} have left?", f"how much money {name} has left")


def saving_goal(r: random.Random) -> Problem:
    name, item, w = r.choice(NAMES), r.choice(["bike", "guitar", "tent", "telescope", "football kit"]), Work(r)
    weekly, weeks, have = r.randint(2, 12), r.randint(2, 12), r.randint(2, 40)
    need = w(have + weekly * weeks, "-", have, "dollars", "Still needed: # dollars.", f"{name} is short by # dollars.")
    w(need, "/", weekly, "weeks", "Weeks of saving: # weeks.", f"{name} must save for # weeks.")
    facts = [f"a {item} costs ${have + weekly * weeks}", f"{name}{SAME} already has ${have}", f"{name}{SAME} saves ${weekly} every week"]
    return pose(r, w, facts, f"How many weeks does {name} need to save to buy the {item}?", f"how many weeks {name} must save for the {item}")


def compare(r: random.Random, more: bool) -> Problem:
    (a, b), t, w = r.sample(NAMES, 2), r.choice(SMALL + FRUIT), Work(r)
    x = r.randint(8, 60)
    d = r.randint(2, 20 if more else min(20, x - 2))
    word, op = ("more", "+") if more else ("fewer", "-")
    y = w(x, op, d, t, f"{b} has # {t}.", f"{b}: # {t}.")
    w(x, "+", y, t, f"Together: # {t}.", f"Both: # {t}.")
    facts = r.choice([[f"{a}{SAME} has {x} {t}", f"{b}{SAME} has {say(r, d)} {word} {t} than {a}"],
                      [f"{b}{SAME} has {say(r, d)} {word} {t} than {a}", f"{a}{SAME} has {x}"]])
    return pose(r, w, facts, f"How many {t} do {a} and {b} have together?", f"how many {t} {a} and {b} have together")


def more_than(r: random.Random) -> Problem:
    return compare(r, True)


def fewer_than(r: random.Random) -> Problem:
    return compare(r, False)


def times_as_many(r: random.Random) -> Problem:
    (a, b), t, w = r.sample(NAMES, 2), r.choice(SMALL + FRUIT), Work(r)
    x, times = r.randint(2, 12), r.choice([2, 3, 4])
    y = w(x, "*", times, t, f"{b} has # {t}.", f"{MULT[times].capitalize()} as many: # {t}.")
    w(x, "+", y, t, f"Together: # {t}.", f"In all: # {t}.")
    facts = [f"{a}{SAME} has {say(r, x)} {t}", f"{b}{SAME} has {MULT[times]} as many {t} as {a}"]
    return pose(r, w, facts, f"How many {t} do they have in all?", f"how many {t} {a} and {b} have in all")


def half_as_many(r: random.Random) -> Problem:
    (a, b), t, w = r.sample(NAMES, 2), r.choice(SMALL + FRUIT), Work(r)
    x = 2 * r.randint(2, 12)
    y = w(x, "/", 2, t, f"{b} has # {t}.", f"Half as many: # {t}.")
    facts = [f"{a}{SAME} has {x} {t}", f"{b}{SAME} has half as many {t} as {a}"]
    if r.random() < 0.5:
        w(x, "+", y, t, f"Together: # {t}.")
        return pose(r, w, facts, f"How many {t} do {a} and {b} have together?", f"how many {t} {a} and {b} have together")
    w(x, "-", y, t, f"{a} has # more {t}.", f"The difference is # {t}.")
    return pose(r, w, facts, f"How many more {t} does {a} have than {b}?", f"how many more {t} {a} has than {b}")


def give_and_compare(r: random.Random) -> Problem:
    (a, b), t, w = r.sample(NAMES, 2), r.choice(SMALL), Work(r)
    x, d = r.randint(20, 60), r.randint(2, 10)
    y = r.randint(max(2, x - 2 * d + 2), x)
    left = w(x, "-", d, t, f"{a} has # {t} left.", f"{a}: # {t}.")
    got = w(y, "+", d, t, f"{b} now has # {t}.", f"{b}: # {t}.")
    w(got, "-", left, t, f"{b} has # more {t}.", f"The difference is # {t}.")
    facts = [f"{a} has {x} {t} and {b} has {y}", f"{a} gives {b} {say(r, d)} {t}"]
    return pose(r, w, facts, f"How many more {t} does {b} have than {a} now?", f"how many more {t} {b} has than {a} now")


def rain(r: random.Random) -> Problem:
    w = Work(r)
    per, days, storm = r.randint(2, 12), r.randint(2, 7), r.randint(5, 40)
    quiet = w(per, "*", days, "mm", "Rain on the quiet days: # mm.", "Before the storm: # mm.")
    w(quiet, "+", storm, "mm", "With the storm: # mm.", "In all: # mm.")
    facts = [r.choice([f"it rains {per} mm a day for {say(r, days)} days", f"{per} mm of rain falls each day for {say(r, days)} days"]),
             f"then a storm {r.choice(['brings', 'adds', 'dumps'])} {storm} mm more"]
    return pose(r, w, facts, "How many mm of rain fall in all?", "how many mm of rain fall in all")


def growth(r: random.Random) -> Problem:
    plant, w = r.choice(["sunflower", "bean plant", "young tree", "tomato plant"]), Work(r)
    height, weekly, weeks = r.randint(5, 40), r.randint(2, 8), r.randint(2, 8)
    grew = w(weekly, "*", weeks, "cm", "It grows # cm.", "Growth: # cm.")
    w(height, "+", grew, "cm", "Its height is then # cm.", "New height: # cm.")
    facts = [f"a {plant} is {height} cm tall", f"it grows {weekly} cm every week for {say(r, weeks)} weeks"]
    return pose(r, w, facts, f"How many cm tall is the {plant} after that?", f"how tall the {plant} is after that, in cm")


def balloons(r: random.Random) -> Problem:
    name, w = r.choice(NAMES), Work(r)
    kids, per = r.randint(2, 12), r.randint(2, 5)
    popped = r.randint(2, kids * per - 2)
    total = w(kids, "*", per, "balloons", "Balloons given out: # balloons.", "There are # balloons.")
    w(total, "-", popped, "balloons", "Left: # balloons.", "Not popped: # balloons.")
    facts = [f"at {name}'s party each of the {kids} children gets {say(r, per)} balloons", f"{popped} balloons {r.choice(['pop', 'burst', 'float away', 'fly off in the wind'])}"]
    return pose(r, w, facts, "How many balloons are left?", "how many balloons are left")


def coins(r: random.Random) -> Problem:
    name, w = r.choice(NAMES), Work(r)
    fives, tens = r.randint(2, 12), r.randint(2, 12)
    a = w(fives, "*", 5, "cents", "The 5-cent coins: # cents.")
    b = w(tens, "*", 10, "cents", "The 10-cent coins: # cents.")
    w(a, "+", b, "cents", "Altogether: # cents.", f"{name} has # cents.")
    facts = r.choice([[f"{name}{SAME} has {say(r, fives, 1)} 5-cent coins and {say(r, tens, 1)} 10-cent coins"],
                      [f"in {name}'s pocket there are {fives} coins worth 5 cents each and {tens} coins worth 10 cents each"]])
    return pose(r, w, facts, f"How many cents does {name} have?", f"how many cents {name} has")


def stall_sold(r: random.Random) -> Problem:
    name, fruit, w = r.choice(NAMES), r.choice(FRUIT), Work(r)
    stock, a = r.randint(40, 99), r.randint(5, 30)
    b = r.randint(5, min(30, stock - a - 2))
    sold = w(a, "+", b, fruit, f"Sold: # {fruit}.", f"Sold in the day: # {fruit}.")
    w(stock, "-", sold, fruit, f"Left: # {fruit}.", f"Unsold: # {fruit}.")
    facts = r.choice([[f"a market stall has {stock} {fruit}", f"{r.choice(['it sells', 'customers buy', 'shoppers take home'])} {a} in the morning and {b} in the afternoon"],
                      [f"{name}{SAME} brings {stock} {fruit} to market", f"{name}{SAME} sells {a} before noon and {b} after noon"]])
    return pose(r, w, facts, f"How many {fruit} are left?", f"how many {fruit} are left")


def food_drive(r: random.Random) -> Problem:
    teacher, w = r.choice(TEACHERS), Work(r)
    kids, per, extra = r.randint(2, 12), r.randint(2, 6), r.randint(2, 25)
    brought = w(kids, "*", per, "cans", "The students bring # cans.", "From the class: # cans.")
    w(brought, "+", extra, "cans", "In all: # cans.", f"With {teacher}'s: # cans.")
    facts = [f"each of the {kids} students in a class {r.choice(['brings', 'donates', 'collects', 'hands in'])} {say(r, per)} cans for a food drive",
             f"{teacher} {r.choice(['adds', 'brings', 'gives'])} {extra} more cans"]
    return pose(r, w, facts, "How many cans are collected in all?", "how many cans are collected in all")


def job_pay(r: random.Random) -> Problem:
    name, job, w = r.choice(NAMES), r.choice(["café", "car wash", "bookshop", "bakery", "garden centre"]), Work(r)
    rate, hours, tips = r.randint(5, 12), r.randint(2, 8), r.randint(2, 20)
    wage = w(rate, "*", hours, "dollars", "Pay for the hours: # dollars.", "Wages: # dollars.")
    w(wage, "+", tips, "dollars", "With tips: # dollars.", f"{name} earns # dollars.")
    facts = [f"{name}{SAME} earns ${rate} an hour at a {job}", f"{name}{SAME} works {say(r, hours)} hours on Saturday", f"{name}{SAME} also gets ${tips} in tips"]
    return pose(r, w, facts, f"How much does {name} earn on Saturday?", f"how much {name} earns on Saturday")


def age(r: random.Random) -> Problem:
    name, rel, w = r.choice(NAMES), r.choice(["mother", "father", "aunt", "uncle"]), Work(r)
    now, times, later = r.randint(8, 12), r.choice([3, 4]), r.randint(2, 10)
    old = w(now, "*", times, "years", f"The {rel} is # years old.", "Now: # years.")
    w(old, "+", later, "years", f"Then the {rel} will be # years old.", "Later: # years.")
    facts = [f"{name}{SAME} is {now} years old", f"{name}'s {rel} is {MULT[times]} as old"]
    return pose(r, w, facts, f"How old will {name}'s {rel} be in {say(r, later)} years?", f"how old {name}'s {rel} will be in {later} years")


def ribbon(r: random.Random) -> Problem:
    name, stuff, w = r.choice(NAMES), r.choice(["ribbon", "rope", "string", "piece of cloth"]), Work(r)
    piece, count = r.randint(2, 6), r.randint(4, 12)
    gave = r.randint(2, count - 2)
    cut = w(piece * count, "/", piece, "pieces", "Pieces cut: # pieces.", f"{name} gets # pieces.")
    w(cut, "-", gave, "pieces", f"{name} keeps # pieces.", "Kept: # pieces.")
    facts = [f"{name}{SAME} cuts a {piece * count}-metre {stuff} into pieces {piece} metres long", f"{name}{SAME} gives {say(r, gave)} pieces to friends"]
    return pose(r, w, facts, f"How many pieces does {name} keep?", f"how many pieces {name} keeps")


def laps(r: random.Random) -> Problem:
    name, (day1, day2), w = r.choice(NAMES), r.choice(DAYS), Work(r)
    lap, a, b = r.randint(2, 5), r.randint(2, 6), r.randint(2, 6)
    total = w(a, "+", b, "laps", "Laps in all: # laps.", "Both days: # laps.")
    w(total, "*", lap, "km", "Distance: # km.", f"{name} runs # km.")
    facts = [f"a lap of the park is {lap} km", f"{name}{SAME} runs {say(r, a)} laps on {day1} and {say(r, b)} laps on {day2}"]
    return pose(r, w, facts, f"How many km does {name} run over the two days?", f"how many km {name} runs over the two days")


def weeks_and_days(r: random.Random) -> Problem:
    name, w = r.choice(NAMES), Work(r)
    weeks, days = r.randint(2, 8), r.randint(2, 6)
    trip = r.choice(["holiday", "school trip", "visit to grandma"])
    whole = w(weeks, "*", 7, "days", "The weeks are # days.", "Whole weeks: # days.")
    w(whole, "+", days, "days", "In all: # days.", f"The {trip} is # days long.")
    facts = [f"{name}'s {trip} lasts {say(r, weeks)} weeks and {say(r, days)} days"]
    return pose(r, w, facts, "How many days is that?", "how many days that is")


def dozens(r: random.Random) -> Problem:
    name, t, w = r.choice(NAMES), r.choice(["eggs", "rolls", "roses", "pencils", "bagels"]), Work(r)
    boxes, extra = r.randint(2, 9), r.randint(2, 11)
    whole = w(boxes, "*", 12, t, f"The dozens: # {t}.", f"{say(r, boxes).capitalize()} dozen is # {t}.")
    w(whole, "+", extra, t, f"In all: # {t}.", f"{name} buys # {t}.")
    facts = [f"{name}{SAME} buys {say(r, boxes)} dozen {t} and {say(r, extra)} more {t}"]
    return pose(r, w, facts, f"How many {t} does {name} buy?", f"how many {t} {name} buys")


def vans(r: random.Random) -> Problem:
    w = Work(r)
    per, count, cost = r.randint(4, 12), r.randint(2, 9), r.randint(5, 12)
    hired = w(per * count, "/", per, "vans", "Vans needed: # vans.", "Full vans: # vans.")
    w(hired, "*", cost, "dollars", "Total cost: # dollars.", "The vans cost # dollars.")
    facts = [f"{per * count} people go on a {r.choice(['school trip', 'picnic', 'tour'])}", f"they fill vans that hold {say(r, per)} people each",
             f"one van costs ${cost} to hire"]
    return pose(r, w, facts, "How much do the vans cost in all?", "how much the vans cost in all")


def unit_price(r: random.Random) -> Problem:
    (one, many), w = r.choice(GOODS), Work(r)
    price, count = r.randint(2, 12), r.randint(2, 9)
    other = r.choice([m for m in range(2, 13) if m != count])
    each_cost = w(price * count, "/", count, "dollars", f"One {one} costs # dollars.", "Each costs # dollars.")
    w(other, "*", each_cost, "dollars", "They cost # dollars.", "Total: # dollars.")
    facts = [f"{say(r, count)} {many} cost ${price * count} in all", f"every {one} has the same price"]
    return pose(r, w, facts, f"How much do {say(r, other)} {many} cost?", f"how much {other} {many} cost")


def scene_shape(scene: Scene) -> Callable[[random.Random], Problem]:
    def shape(r: random.Random) -> Problem:
        return tally(r, scene)
    shape.__name__ = scene.name
    return shape


SHAPES: list[Callable[[random.Random], tuple[str, list[str], int]]] = [scene_shape(s) for s in SCENES] + [
    change, bill, discount, speed, trip_left, round_trip, time_total, playlist, reading_left, reading_more, class_groups,
    cafe_tables, supplies, basketball, match_more, recipe_more, recipe_double, pizza, egg_cartons, garden_rows, harvest_share,
    boxes_needed, sharing, share_with_self, savings, saving_goal, more_than, fewer_than, times_as_many, half_as_many,
    give_and_compare, rain, growth, balloons, coins, stall_sold, food_drive, job_pay, age, ribbon, laps, weeks_and_days,
    dozens, vans, unit_price]
