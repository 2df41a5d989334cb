"""The embedded task: arithmetic chains with graded difficulty, solved in ways whose length is worth something.

A problem starts from a one-digit count of some object and applies 1..8 additions or subtractions, worded in
several ways (an opening sentence, a verb per operation, a closing question, any object word):

    question: Tom has 3 apples. 1) gets 4 2) loses 5 3) finds 6. How many apples are there now?

Every running value stays in 0..9: a few-million-parameter model trained on a 2-core CPU learns one-digit
facts and the step-by-step bookkeeping reliably, but not two-digit carries.

A solution is a plan: how many operations each line combines, how many verification passes follow, how much
filler. Lines that combine several operations are short and, for a tiny model, error-prone (it must sum the
chain in one forward pass); one operation per line is longer and reliable; a verification pass recomputes the
chain step by step and the answer follows it, so it repairs a slip of the first pass:

    direct (minimal):  1-3) 3+4-5+6=8                          14 tokens of work
    chunked:           1-2) 3+4-5=2 / 3) 2+6=8
    stepwise:          1) 3+4=7 / 2) 7-5=2 / 3) 2+6=8          24 tokens
    + verification:    Check 1) 3+4=7 / Check 2) 7-5=2 / ...   +10 tokens a step
                       So the answer is \\boxed{8}.

So tokens buy accuracy (finer steps, verification), and a budget has something to choose between. The base
model's traces (`render_trace`) mix the plans at random and add filler drawn independently of the
difficulty, so the base model overthinks easy questions the way reasoning models do, while its own correct
answers span short and long plans: a cold start that labels them with their lengths pairs each budget with
a plan that fits it. Traces sometimes open with a preamble (a sentence, or tags of any name around a number)
so that what precedes the first step, a prefilled budget for one, does not derail the model; object words
are drawn from a large list and from made-up words, so new words do not either.

Splits are fixed by their seeds; train excludes every validation and test question. `UNSEEN_OBJECTS` are
never used by any split or trace: they measure robustness to new wording.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

from ..core.grading import is_correct
from ..data import Row, draw_split, write_splits

MIN_STEPS, MAX_STEPS = 1, 8
SPLITS = {"train": (20_000, 11), "validation": (400, 12), "test": (400, 13)}  # name -> (size, seed)
SOURCE = "embedded"

FILLER_TOKENS = (0, 50)  # rough tokens (about 0.7 of a real token each) of filler in one base trace, uniform, whatever the difficulty
PREAMBLE_RATE = 0.3  # share of base traces that open with a preamble before the first step
SLIP_RATE = 0.35  # share of verified traces ending in a combined line whose first pass slips

_PLUS = ("add", "gets", "finds", "buys", "gains", "receives")
_MINUS = ("subtract", "loses", "gives away", "eats", "sells", "drops")
_VERB_OP = {**{v: "+" for v in _PLUS}, **{v: "-" for v in _MINUS}}
_OBJECTS = (
    "apples", "books", "coins", "cards", "birds", "stones", "shells", "pens", "cups", "boxes",
    "eggs", "keys", "bells", "stars", "hats", "rings", "beads", "shoes", "leaves", "seeds",
    "plums", "socks", "bowls", "nuts", "pears", "toys", "fish", "flags", "drums", "maps",
    "coats", "bikes", "ducks", "jars", "cakes", "dolls", "nails", "ropes", "tiles", "forks",
)
UNSEEN_OBJECTS = ("marbles", "kites", "robots", "lamps", "candles", "tickets", "buttons", "pebbles")
_NAMES = ("Tom", "Ana", "Sam", "Mia", "Leo", "Ivy", "Ben", "Zoe")
_OPENINGS = ("Start with {s} {noun}.", "You have {s} {noun}.", "{name} has {s} {noun}.",
             "A box holds {s} {noun}.", "There are {s} {noun}.")
_CLOSINGS = ("How many {noun} now?", "How many {noun} are there now?", "How many {noun} at the end?",
             "What is the number of {noun} now?")

_FILLER = (
    "Wait, let me double-check.",
    "Hmm, let me re-read the question.",
    "Let me verify the result once more.",
    "That seems right.",
    "Actually, let me recount to be sure.",
    "Hmm, is that correct?",
    "Okay, let me go over it again.",
)
_OPENERS = ("Okay", "Alright", "Well", "So", "Right", "Sure", "Fine", "Now")
_SUBJECTS = ("let me", "I will", "I'll", "we can")
_VERBS = ("solve this", "work", "compute it", "go", "count")
_MANNERS = ("step by step", "carefully", "line by line", "from the start", "slowly")

_OPENING = re.compile(r"(?:Start with|You have|\w+ has|A box holds|There are) (\d+) \S+\.")
_OP = re.compile(r"(\d+)\) (" + "|".join(sorted(_VERB_OP, key=len, reverse=True)) + r") (\d+)")


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]  # ("+" | "-", operand)
    noun: str = "apples"
    wording: tuple[int, ...] = ()  # opening, closing, name, then one verb index per operation; () = plain

    @property
    def steps(self) -> int:
        return len(self.ops)

    def values(self) -> list[int]:
        """The running value after each step, starting value first."""
        out = [self.start]
        for op, b in self.ops:
            out.append(out[-1] + b if op == "+" else out[-1] - b)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def question(self) -> str:
        opening, closing, name, *verbs = self.wording or (0, 0, 0, *([0] * self.steps))
        words = [(_PLUS if op == "+" else _MINUS)[v] for (op, _), v in zip(self.ops, verbs)]
        listed = " ".join(f"{i}) {w} {b}" for i, (w, (_, b)) in enumerate(zip(words, self.ops), 1))
        first = _OPENINGS[opening].format(s=self.start, noun=self.noun, name=_NAMES[name])
        return f"{first} {listed}. {_CLOSINGS[closing].format(noun=self.noun)}"


def parse_question(question: str) -> Problem:
    """The problem behind any wording of an embedded question (the wording itself is not recovered)."""
    opening = _OPENING.match(question.strip())
    ops = _OP.findall(question)
    if not opening or not ops or [int(i) for i, _, _ in ops] != list(range(1, len(ops) + 1)):
        raise ValueError(f"not an embedded-task question: {question[:80]!r}")
    noun = question.strip().split(".")[0].split()[-1]
    return Problem(int(opening.group(1)), tuple((_VERB_OP[v], int(b)) for _, v, b in ops), noun)


def made_up_word(rng: random.Random) -> str:
    """A pronounceable made-up plural noun ("bevos", "tuniks"): wording the model cannot have memorised."""
    syllables = rng.randint(1, 3)
    word = "".join(rng.choice("bcdfghjklmnprstvz") + rng.choice("aeiou") for _ in range(syllables))
    return word + rng.choice(("s", "ks", "ns", "ts"))


def sample_problem(rng: random.Random, steps: int, noun: str | None = None) -> Problem:
    """Every operand and running value is one digit (0..9), and every step changes the value."""
    value = rng.randint(0, 9)
    start, ops = value, []
    for _ in range(steps):
        op = "+" if value == 0 else "-" if value == 9 else rng.choice("+-")
        b = rng.randint(1, 9 - value) if op == "+" else rng.randint(1, value)
        value = value + b if op == "+" else value - b
        ops.append((op, b))
    if noun is None:
        noun = rng.choice(_OBJECTS) if rng.random() < 0.7 else made_up_word(rng)
    return Problem(start, tuple(ops), noun, _wording(rng, steps))


# --- solutions -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How a solution is written: operations per line of the first pass, verification passes, filler."""

    chunks: tuple[int, ...]  # sizes of the first pass's lines, summing to the number of steps
    checks: int = 0  # step-by-step verification passes
    check_each_line: bool = False  # a pass checks each line right below it, not the whole chain after the first pass
    filler: int = 0  # rough tokens of filler lines
    preamble: str = ""  # text before the first step


def _line(first: int, last: int, values: list[int], ops, prefix: str = "") -> str:
    index = f"{first}" if first == last else f"{first}-{last}"
    expr = f"{values[first - 1]}" + "".join(f"{op}{b}" for op, b in ops[first - 1 : last])
    return f"{prefix}{index}) {expr}={values[last]}"


def answer_line(answer: int) -> str:
    return f"So the answer is \\boxed{{{answer}}}."


def render(problem: Problem, plan: Plan, rng: random.Random | None = None, slip: bool = False) -> str:
    """The solution that `plan` describes. With `slip` (for a plan whose last line combines operations and
    that verifies), the first pass ends one off, the verification pass recomputes the chain and notices, and
    the answer follows it. With `plan.check_each_line` a verification pass checks each line right below it,
    so that a check reads its operations from the line above instead of searching the chain for them."""
    if slip and (plan.chunks[-1] < 2 or not plan.checks):
        raise ValueError("a slip needs a combined last line and a verification pass")
    rng = rng or random.Random(0)
    values, ops = problem.values(), problem.ops
    lines = [plan.preamble] if plan.preamble else []

    def checks(first: int, last: int) -> list[str]:
        return [_line(i, i, values, ops, "Check ") for i in range(first, last + 1)] * plan.checks

    first = 1
    for size in plan.chunks:
        last = first + size - 1
        lines.append(_line(first, last, values, ops))
        if slip and last == problem.steps:
            wrong = values[-1] + rng.choice([d for d in (-1, 1) if 0 <= values[-1] + d <= 9])
            lines[-1] = lines[-1][: -len(str(values[-1]))] + str(wrong)
        if plan.check_each_line:
            lines += checks(first, last)
        first = last + 1
    filler_lines = _filler(rng, plan.filler)
    if plan.check_each_line:
        split = 0
    else:
        split = rng.randint(0, len(filler_lines))
        lines += filler_lines[:split] + checks(1, problem.steps)
    if slip:
        lines.append(f"Wait, the check gives {values[-1]}, not {wrong}.")
    lines += filler_lines[split:]
    lines.append(answer_line(problem.answer))
    return "\n".join(lines)


def _filler(rng: random.Random, tokens: int) -> list[str]:
    lines, spent = [], 0
    while spent < tokens:
        lines.append(rng.choice(_FILLER))
        spent += _rough_tokens(lines[-1])
    return lines


def minimal_plan(problem: Problem) -> Plan:
    return Plan(chunks=(problem.steps,))


def stepwise_plan(problem: Problem) -> Plan:
    return Plan(chunks=(1,) * problem.steps)


def minimal_solution(problem: Problem) -> str:
    """The shortest correct solution: the whole chain on one line, then the answer."""
    return render(problem, minimal_plan(problem))


def random_chunks(rng: random.Random, steps: int, size: int) -> tuple[int, ...]:
    """Line sizes of `size` operations each (the last line takes the rest), `size` >= steps = one line."""
    chunks = [size] * (steps // size) + ([steps % size] if steps % size else [])
    return tuple(chunks)


def _preamble(rng: random.Random) -> str:
    if rng.random() < 0.5:
        # Sentences from a small grammar (about 200 of them), so that no particular opening matters.
        return (f"{rng.choice(_OPENERS)}, {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} "
                f"{rng.choice(_MANNERS)}.")
    # Tags of any name around a number, as a prefilled budget looks: the model learns to read past them.
    a, b = made_up_word(rng)[:-1], made_up_word(rng)[:-1]
    return f"<{a}>{rng.randint(1, 400)}</{a}><{b}>"


def sample_plan(problem: Problem, rng: random.Random, filler_tokens: int | None = None,
                check_each_line: bool = False) -> Plan:
    """The base model's habits: mostly one operation per line, sometimes combined lines, verification passes
    and filler drawn independently of the question."""
    n = problem.steps
    r = rng.random()
    size = 1 if r < 0.55 else n if r < 0.75 else rng.choice((2, 3))
    checks = rng.choices((0, 1, 2), weights=(0.45, 0.45, 0.10))[0]
    filler = rng.randint(*FILLER_TOKENS) if filler_tokens is None else filler_tokens
    preamble = _preamble(rng) if rng.random() < PREAMBLE_RATE else ""
    return Plan(random_chunks(rng, n, size), checks=checks, check_each_line=check_each_line, filler=filler,
                preamble=preamble)


def render_trace(problem: Problem, rng: random.Random, filler_tokens: int | None = None,
                 check_each_line: bool = False) -> str:
    """A base-model trace: a sampled plan, with a repaired slip in some combined first passes."""
    plan = sample_plan(problem, rng, filler_tokens, check_each_line)
    slip = plan.chunks[-1] > 1 and plan.checks > 0 and rng.random() < SLIP_RATE
    return render(problem, plan, rng, slip=slip)


# --- reading responses ---------------------------------------------------------------------------------------

# A first-pass line as `_line` writes it (and a model may get wrong): "3) 7-5=2" or "2-4) 7-5+1-2=1".
_STEP_LINE = re.compile(r"(\d+)(?:-(\d+))?\) (-?\d+)((?:[+-]\d+)+)=(-?\d+)$")
_TERM = re.compile(r"([+-])(\d+)")
ERROR_KINDS = ("operand", "carry", "arithmetic", "missing step", "final answer")


def first_pass(response: str) -> list[tuple[int, int, int, list[tuple[str, int]], int]]:
    """The first-pass lines of a response as (first step, last step, start value, terms, result)."""
    out = []
    for line in response.splitlines():
        m = _STEP_LINE.match(line.strip())
        if m:
            first = int(m.group(1))
            last = int(m.group(2) or first)
            terms = [(op, int(b)) for op, b in _TERM.findall(m.group(4))]
            out.append((first, last, int(m.group(3)), terms, int(m.group(5))))
    return out


def first_error(problem: Problem, response: str) -> str | None:
    """What went wrong first in a response to `problem`, one of ERROR_KINDS, or None if nothing did.

    The first pass is read line by line: a line whose operations are not the question's is an `operand`
    error, one that starts from another value than the true running value a `carry` error, one whose result
    is not its own sum an `arithmetic` error.
    """
    values = problem.values()
    covered = 0
    for first, last, a, terms, c in first_pass(response):
        if first != covered + 1 or last > problem.steps:
            break
        if tuple(terms) != problem.ops[first - 1 : last]:
            return "operand"
        if a != values[first - 1]:
            return "carry"
        if c != a + sum(b if op == "+" else -b for op, b in terms):
            return "arithmetic"
        covered = last
        if covered == problem.steps:
            break
    if covered < problem.steps:
        return "missing step"
    return None if is_correct(response, str(problem.answer)) else "final answer"


def split_filler(response: str) -> tuple[str, str]:
    """(essential, extra) lines of a response: the first pass and the answer line are essential; verification
    passes, "Wait, ..." and every other line are extra, the part a budget can spend or save."""
    essential, filler = [], []
    for line in response.splitlines():
        text = line.strip()
        (essential if _STEP_LINE.match(text) or text.startswith("So the answer is ") else filler).append(line)
    return "\n".join(essential), "\n".join(filler)


def filler_tokens(tokenizer, solution: str) -> int:
    """Tokens (in `tokenizer`) of the extra lines of a solution, as `split_filler` divides it."""
    from ..core.format import token_length

    _, filler = split_filler(solution)
    return token_length(tokenizer, filler) if filler else 0


def _rough_tokens(text: str) -> int:
    return len(re.findall(r"\d|[A-Za-z]+|[^\sA-Za-z\d]", text))


# --- splits --------------------------------------------------------------------------------------------------


def _rows(split: str) -> list[Row]:
    size, seed = SPLITS[split]
    held_out = set() if split != "train" else {_key(r.question) for s in ("validation", "test") for r in load_split(s)}
    problems = draw_split(sample_problem, lambda p: _key(p.question()), size, seed,
                          range(MIN_STEPS, MAX_STEPS + 1), held_out)
    return [Row(id=f"{SOURCE}-{split}-{i}", question=p.question(), answer=str(p.answer),
                solution=minimal_solution(p), difficulty=p.steps, source=SOURCE) for i, p in enumerate(problems)]


def _key(question: str) -> object:
    """What makes two questions the same: the problem from 3 steps on, the wording too below that (there are
    only 90 one-step problems, so held-out one- and two-step questions differ from training ones in wording)."""
    problem = parse_question(question)
    return (problem.start, problem.ops) if problem.steps >= 3 else question


@functools.lru_cache(maxsize=None)
def _cached(split: str) -> tuple[Row, ...]:
    return tuple(_rows(split))


def load_split(split: str) -> list[Row]:
    """The fixed split `train`, `validation` or `test` of the embedded task."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of the embedded task; choose from {', '.join(SPLITS)}")
    return list(_cached(split))


def _wording(rng: random.Random, steps: int) -> tuple[int, ...]:
    return (rng.randrange(len(_OPENINGS)), rng.randrange(len(_CLOSINGS)), rng.randrange(len(_NAMES)),
            *(rng.randrange(len(_PLUS)) for _ in range(steps)))


def reworded(rows: list[Row], seed: int = 0, nouns: tuple[str, ...] = UNSEEN_OBJECTS) -> list[Row]:
    """The same problems in another wording, with object words that no split or trace uses."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        p = parse_question(row.question)
        problem = Problem(p.start, p.ops, rng.choice(nouns), _wording(rng, p.steps))
        out.append(Row(id=f"{row.id}-reworded", question=problem.question(), answer=row.answer, solution=row.solution,
                       difficulty=row.difficulty, source=row.source))
    return out


def main(argv: list[str] | None = None) -> int:
    description = "Write the embedded arithmetic task's fixed splits as JSONL (one row schema)."
    return write_splits(load_split, SPLITS, "selfbudgeter task", description, argv)
