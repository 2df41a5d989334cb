"""The word-problem task: short natural-language arithmetic problems with 1..3 operations, for real models.

The embedded task is written for the embedded model (numbered operations, one-digit values); this one reads
the way people write, so a pretrained instruction model can be asked it as it is:

    Tom has 6 apples and buys 6 more. How many apples does Tom have now?                          (1 operation)
    Sara has 12 books. She gives 5 to a friend. Then her books double. How many books does she have now?  (2)

A problem is a person, an object, a starting count (1..20) and 1..3 operations: add 1..15, take away less
than the current count (counts never go below 1), or double / triple a count of at most 15. Each operation is one
sentence (or, first, one clause joined to the opening with "and"), chosen from several phrasings, and the
question is chosen from several too. `difficulty` is the number of operations. The worked `solution` is one
line per operation and a boxed answer, the shortest solution a model could write:

    6 + 6 = 12
    So the answer is \\boxed{12}.

Splits are fixed by their seeds and disjoint: no question text is shared between splits, and a problem of
two or more operations (its numbers and operations, whatever the wording) is in one split only. There are
too few one-operation problems (about 550) for that, so held-out one-operation questions differ from the
training ones at least in wording, as in the embedded task. Rows carry `source = "word-problems"`; the
dataset is registered in `selfbudgeter.data.TASKS` under that name (`--dataset word-problems`).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from . import Row, draw_split, write_splits

SOURCE = "word-problems"
MIN_OPS, MAX_OPS = 1, 3
SPLITS = {"train": (3_000, 21), "validation": (300, 22), "test": (300, 23)}  # name -> (size, seed)
START = (1, 20)  # the starting count
ADD = (1, 15)  # operands of an addition
MAX_MULTIPLICAND = 15  # a count is doubled or tripled only up to this
MULTIPLY_RATE = 0.2  # share of operations that multiply, where allowed

# (name, subject pronoun, possessive pronoun)
_PEOPLE = (
    ("Tom", "he", "his"), ("Sara", "she", "her"), ("Ben", "he", "his"), ("Lily", "she", "her"),
    ("Omar", "he", "his"), ("Mia", "she", "her"), ("Jack", "he", "his"), ("Emma", "she", "her"),
    ("Ravi", "he", "his"), ("Nora", "she", "her"), ("Leo", "he", "his"), ("Anna", "she", "her"),
)
_OBJECTS = (
    "apples", "books", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "coins", "cards",
    "balloons", "oranges", "toy cars", "crayons", "flowers", "eggs", "buttons", "candies", "rocks", "beads",
)
_OPENINGS = (
    "{name} has {n} {noun}.",
    "{name} starts the day with {n} {noun}.",
    "{name} owns {n} {noun}.",
    "There are {n} {noun} in {name}'s bag.",
)
# Each operation: (sentence, clause after "and" in the opening). {k} is the operand.
_PHRASES = {
    "+": (
        ("{He} buys {k} more.", "buys {k} more"),
        ("{He} finds {k} more {noun}.", "finds {k} more"),
        ("A friend gives {him} {k} more {noun}.", "gets {k} more from a friend"),
        ("{He} picks up another {k} {noun}.", "picks up another {k}"),
    ),
    "-": (
        ("{He} gives {k} to a friend.", "gives {k} to a friend"),
        ("{He} loses {k} of them.", "loses {k} of them"),
        ("{He} sells {k} {noun}.", "sells {k} of them"),
        ("{He} uses up {k} {noun}.", "uses up {k}"),
    ),
    "*": (
        ("Then the number of {noun} {he} has {times}.", "then the number of {noun} {times}"),
        ("After that, {his} {noun} {times_plural}.", "then {his} {noun} {times_plural}"),
    ),
}
_TIMES = {2: ("doubles", "double"), 3: ("triples", "triple")}
_QUESTIONS = (
    "How many {noun} does {name} have now?",
    "How many {noun} does {he} have now?",
    "How many {noun} does {name} end up with?",
    "How many {noun} does {name} have in the end?",
    "What is the number of {noun} {name} has now?",
)
_SYMBOL = {"+": "+", "-": "-", "*": "*"}


@dataclass(frozen=True)
class WordProblem:
    start: int
    ops: tuple[tuple[str, int], ...]  # ("+" | "-" | "*", operand)
    person: int = 0  # index into the people
    noun: str = "apples"
    wording: tuple[int, ...] = ()  # opening, question, joined (0/1), then one phrase index per operation

    @property
    def steps(self) -> int:
        return len(self.ops)

    def values(self) -> list[int]:
        """The running count after each operation, the starting count first."""
        out = [self.start]
        for op, k in self.ops:
            out.append(apply(out[-1], op, k))
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def question(self) -> str:
        opening, question, joined, *phrases = self.wording or (0, 0, 0, *([0] * self.steps))
        name, he, his = _PEOPLE[self.person]
        him = "him" if he == "he" else "her"
        sentences = []
        for index, ((op, k), phrase) in enumerate(zip(self.ops, phrases)):
            times, times_plural = _TIMES.get(k, ("", "")) if op == "*" else ("", "")
            sentence, clause = _PHRASES[op][phrase]
            fill = dict(k=k, noun=self.noun, he=he, He=he.capitalize(), him=him, his=his, times=times,
                        times_plural=times_plural)
            if index == 0 and joined:
                first = _OPENINGS[opening].format(name=name, n=self.start, noun=self.noun)
                sentences.append(f"{first[:-1]} and {clause.format(**fill)}.")
            else:
                if index == 0:
                    sentences.append(_OPENINGS[opening].format(name=name, n=self.start, noun=self.noun))
                sentences.append(sentence.format(**fill))
        sentences.append(_QUESTIONS[question].format(noun=self.noun, name=name, he=he))
        return " ".join(sentences)

    def solution(self) -> str:
        """One line per operation, then the boxed answer."""
        values = self.values()
        lines = [f"{a} {_SYMBOL[op]} {k} = {b}" for a, (op, k), b in zip(values, self.ops, values[1:])]
        return "\n".join(lines + [f"So the answer is \\boxed{{{self.answer}}}."])


def apply(value: int, op: str, k: int) -> int:
    if op == "+":
        return value + k
    if op == "-":
        return value - k
    if op == "*":
        return value * k
    raise ValueError(f"unknown operation {op!r}")


def sample_problem(rng: random.Random, steps: int) -> WordProblem:
    """A problem of `steps` operations whose every running count stays >= 1 and every step changes it."""
    value = rng.randint(*START)
    start, ops = value, []
    for _ in range(steps):
        choices = ["+"] + (["-"] if value > 1 else [])
        if value <= MAX_MULTIPLICAND and rng.random() < MULTIPLY_RATE:
            op = "*"
        else:
            op = rng.choice(choices)
        k = rng.randint(*ADD) if op == "+" else rng.randint(1, value - 1) if op == "-" else rng.choice((2, 3))
        value = apply(value, op, k)
        ops.append((op, k))
    opening = rng.randrange(len(_OPENINGS))
    joined = rng.randrange(2) if _OPENINGS[opening].startswith("{name}") else 0  # "Tom has 6 apples and ..."
    wording = (opening, rng.randrange(len(_QUESTIONS)), joined,
               *(rng.randrange(len(_PHRASES[op])) for op, _ in ops))
    return WordProblem(start, tuple(ops), rng.randrange(len(_PEOPLE)), rng.choice(_OBJECTS), wording)


# --- splits --------------------------------------------------------------------------------------------------


def _key(problem: WordProblem) -> object:
    """What makes two questions the same: the numbers and operations from 2 operations on, the text below."""
    return (problem.start, problem.ops) if problem.steps >= 2 else problem.question()


# Each split is drawn apart from the ones after it here: test first, then validation, then train.
_HELD_OUT = {"test": (), "validation": ("test",), "train": ("validation", "test")}


@functools.lru_cache(maxsize=None)
def split_problems(split: str) -> tuple[WordProblem, ...]:
    """The problems of a split, in row order."""
    held_out = frozenset().union(*(_keys(other) for other in _HELD_OUT[split]))
    size, seed = SPLITS[split]
    return tuple(draw_split(sample_problem, _key, size, seed, range(MIN_OPS, MAX_OPS + 1), held_out))


def _keys(split: str) -> frozenset:
    problems = split_problems(split)
    return frozenset({_key(p) for p in problems} | {p.question() for p in problems})


@functools.lru_cache(maxsize=None)
def _cached(split: str) -> tuple[Row, ...]:
    return tuple(
        Row(id=f"{SOURCE}-{split}-{index}", question=problem.question(), answer=str(problem.answer),
            solution=problem.solution(), difficulty=problem.steps, source=SOURCE)
        for index, problem in enumerate(split_problems(split))
    )


def load_split(split: str) -> list[Row]:
    """The fixed split `train`, `validation` or `test` of the word-problem task."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of the word-problem task; choose from {', '.join(SPLITS)}")
    return list(_cached(split))


def main(argv: list[str] | None = None) -> int:
    description = "Write the word-problem task's fixed splits as JSONL (one row schema)."
    return write_splits(load_split, SPLITS, "python -m selfbudgeter.data.word_problems", description, argv)


if __name__ == "__main__":
    raise SystemExit(main())
