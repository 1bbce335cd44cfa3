"""A built-in, multi-domain corpus with verifiable content, deterministic from a seed.

Four domains, each record tagged with its domain and a difficulty level (1 = easiest):
- math: arithmetic (1-2) and multi-step word problems with worked solutions (3-4), answer after "####";
- code: small Python functions with a docstring and asserts that pass (1-3);
- logic: boolean expressions (1-2) and ordering puzzles (3);
- language: templated English prose (1).
Every record has `prompt` and `answer` as well as the full `text`, so the same generator feeds pre-training,
fine-tuning, RL rewards and evaluation. Checking is exact: `answer` is computed, never written by hand.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass

DOMAINS = ("math", "code", "logic", "language")


@dataclass(frozen=True)
class Record:
    """One corpus document."""

    domain: str
    difficulty: int
    prompt: str
    answer: str
    text: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _arithmetic(rng: random.Random, level: int) -> Record:
    if level == 1:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        op = rng.choice("+-")
        value = a + b if op == "+" else a - b
        prompt = f"What is {a} {op} {b}?"
        solution = f"{a} {op} {b} = {value}"
    else:
        a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(1, 50)
        value = a * b + c
        prompt = f"What is {a} * {b} + {c}?"
        solution = f"{a} * {b} = {a * b}. {a * b} + {c} = {value}"
    return Record("math", level, prompt, str(value), f"Question: {prompt}\nAnswer: {solution}\n#### {value}")


NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack")
ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stickers", "cards", "shells")


def _word_problem(rng: random.Random, level: int) -> Record:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, bought = rng.randint(3, 40), rng.randint(2, 30)
    steps = [f"{name} starts with {start} {item}.", f"{name} buys {bought} more."]
    work = [f"{start} + {bought} = {start + bought}"]
    total = start + bought
    if level >= 4:
        given = rng.randint(1, total)
        steps.append(f"Then {name} gives away {given}.")
        work.append(f"{total} - {given} = {total - given}")
        total -= given
        groups = rng.choice([g for g in (2, 3, 4, 5) if total % g == 0] or [1])
        if groups > 1:
            steps.append(f"{name} splits the rest equally into {groups} boxes.")
            work.append(f"{total} / {groups} = {total // groups}")
            total //= groups
            question = f"How many {item} are in each box?"
        else:
            question = f"How many {item} does {name} have now?"
    else:
        question = f"How many {item} does {name} have now?"
    prompt = " ".join(steps) + " " + question
    return Record("math", level, prompt, str(total), f"Question: {prompt}\nAnswer: {'. '.join(work)}\n#### {total}")


def _code(rng: random.Random, level: int) -> Record:
    kind = rng.choice(["add", "scale", "max"] if level == 1 else ["count", "reverse", "sum_even"])
    if level >= 3:
        kind = rng.choice(["fizz", "sum_even", "count"])
    n = rng.randint(2, 9)
    specs = {
        "add": (f"add_{n}", f"Return x plus {n}.", f"    return x + {n}", lambda x: x + n, "x"),
        "scale": (f"times_{n}", f"Return x times {n}.", f"    return x * {n}", lambda x: x * n, "x"),
        "max": ("larger", "Return the larger of x and 7.", "    return max(x, 7)", lambda x: max(x, 7), "x"),
        "count": (
            f"count_{n}",
            f"Count how many items of xs equal {n}.",
            f"    return sum(1 for v in xs if v == {n})",
            lambda xs: sum(1 for v in xs if v == n),
            "xs",
        ),
        "reverse": ("backwards", "Return xs reversed.", "    return list(reversed(xs))", lambda xs: xs[::-1], "xs"),
        "sum_even": (
            "sum_even",
            "Return the sum of the even numbers in xs.",
            "    return sum(v for v in xs if v % 2 == 0)",
            lambda xs: sum(v for v in xs if v % 2 == 0),
            "xs",
        ),
        "fizz": (
            "fizz",
            "Return 'fizz' if x is divisible by 3, else str(x).",
            "    return 'fizz' if x % 3 == 0 else str(x)",
            lambda x: "fizz" if x % 3 == 0 else str(x),
            "x",
        ),
    }
    name, doc, body, fn, arg = specs[kind]
    samples = (
        [rng.randint(0, 12) for _ in range(2)]
        if arg == "x"
        else [[rng.randint(0, 9) for _ in range(4)] for _ in range(2)]
    )
    asserts = "\n".join(f"assert {name}({s!r}) == {fn(s)!r}" for s in samples)
    prompt = f'def {name}({arg}):\n    """{doc}"""\n'
    return Record("code", level, prompt, body, f"{prompt}{body}\n\n\n{asserts}\n")


def _boolean(rng: random.Random, level: int) -> Record:
    terms = [rng.choice(["True", "False"]) for _ in range(2 + level)]
    ops = [rng.choice(["and", "or"]) for _ in range(len(terms) - 1)]
    expression = terms[0]
    for op, term in zip(ops, terms[1:], strict=True):
        expression = f"{expression} {op} {'not ' if rng.random() < 0.3 else ''}{term}"
    value = str(eval(expression))  # noqa: S307 - expression built above from True/False/and/or/not only
    prompt = f"Evaluate: {expression}"
    return Record("logic", level, prompt, value, f"Q: {prompt}\nA: {value}\n")


def _ordering(rng: random.Random, level: int) -> Record:
    shortest, middle, tallest = rng.sample(NAMES, 3)
    facts = [f"{middle} is taller than {shortest}.", f"{tallest} is taller than {middle}."]
    rng.shuffle(facts)
    prompt = " ".join(facts) + " Who is the tallest?"
    reasoning = f"{tallest} is taller than {middle}, who is taller than {shortest}."
    return Record("logic", level, prompt, tallest, f"Q: {prompt}\nA: {reasoning} The answer is {tallest}.\n")


SUBJECTS = ("The river", "A small fox", "The old library", "Our teacher", "The city bus", "A quiet garden")
VERBS = ("runs past", "looks at", "waits near", "shines over", "leads to", "hides behind")
OBJECTS = ("the hill", "a red door", "the market", "the sleeping cat", "a tall tree", "the harbor")


def _prose(rng: random.Random, level: int) -> Record:
    sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(3)]
    text = " ".join(sentences)
    return Record("language", level, sentences[0], " ".join(sentences[1:]), text + "\n")


def make_record(rng: random.Random, domain: str) -> Record:
    """One record of the given domain at a random difficulty."""
    if domain == "math":
        level = rng.randint(1, 4)
        return _arithmetic(rng, level) if level <= 2 else _word_problem(rng, level)
    if domain == "code":
        return _code(rng, rng.randint(1, 3))
    if domain == "logic":
        level = rng.randint(1, 3)
        return _boolean(rng, level) if level <= 2 else _ordering(rng, level)
    if domain == "language":
        return _prose(rng, 1)
    raise ValueError(f"unknown domain {domain!r}; domains: {list(DOMAINS)}")


def builtin_corpus(num_records: int, seed: int = 0, domains: tuple[str, ...] = DOMAINS) -> Iterator[Record]:
    """`num_records` records cycling through the domains; the same seed always gives the same corpus."""
    rng = random.Random(seed)
    for index in range(num_records):
        yield make_record(rng, domains[index % len(domains)])
