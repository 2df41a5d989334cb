"""The embedded task: multi-step arithmetic chains with graded difficulty, and the base model's traces.

A problem starts from a one-digit count of some object and applies 1..8 additions or subtractions:

    question: Start with 3 apples. 1) add 4 2) subtract 5 3) add 6. How many apples now?
    minimal:  1) 3+4=7
              2) 7-5=2
              3) 2+6=8
              So the answer is \\boxed{8}.

Every running value stays in 0..9: a few-million-parameter model trained from scratch on a 2-core CPU for
half an hour learns one-digit facts and the step-by-step bookkeeping reliably, but not two-digit carries
(measured: 7.5% accuracy on two-digit chains after the same training). The object word only varies the
question text, so that the held-out splits can hold 50 distinct one-step questions.

The difficulty is the number of steps, and the minimal correct solution grows linearly with it, so a good
budget has to depend on the question. `render_trace` writes what an overthinking reasoning model writes:
the needed steps, then re-verification and filler whose amount is drawn independently of the difficulty
(in real reasoning models most of the savings come from such filler). The amount is uniform from none to
a lot, as a real model's length varies between samples of one question, so its own correct answers include
concise ones and the budgets a cold start learns from them reach down to what a question needs (measured:
with a floor of 40 rough tokens, GRPO never sampled a budget that low). On longer chains a trace sometimes
makes an arithmetic slip that its verification pass catches and repairs, so cutting verification away is
not entirely free.

Splits are fixed by their seeds; train excludes every validation and test question.
"""

from __future__ import annotations

import argparse
import functools
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .data import Row, write_jsonl
from .grading import is_correct

MIN_STEPS, MAX_STEPS = 1, 8
SPLITS = {"train": (20_000, 11), "validation": (400, 12), "test": (400, 13)}  # name -> (size, seed)
SOURCE = "embedded"

FILLER_TOKENS = (0, 140)  # the filler of one trace, drawn uniformly, whatever the difficulty
SLIP_RATE = 0.12  # share of traces with >= SLIP_MIN_STEPS steps that make a slip and repair it
SLIP_MIN_STEPS = 4

_OPS = {"add": "+", "subtract": "-"}
_OBJECTS = (
    "apples", "books", "coins", "cards", "birds", "stones", "shells", "pens", "cups", "boxes",
    "eggs", "keys", "bells", "stars", "hats", "rings", "beads", "shoes", "leaves", "seeds",
)
_QUESTION = re.compile(r"Start with (\d+) (\w+)\.((?: \d+\) (?:add|subtract) \d+)+)\. How many (\w+) now\?")
_STEP = re.compile(r"\d+\) (add|subtract) (\d+)")

_FILLER = (
    "Wait, let me double-check.",
    "Hmm, let me re-read the question.",
    "Let me verify the result once more.",
    "That seems right.",
    "Actually, let me recount to be sure.",
    "Hmm, is that correct?",
    "Okay, let me go over it again.",
)


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]  # ("+" | "-", operand)
    noun: str = "apples"

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
        words = {sym: word for word, sym in _OPS.items()}
        listed = " ".join(f"{i}) {words[op]} {b}" for i, (op, b) in enumerate(self.ops, 1))
        return f"Start with {self.start} {self.noun}. {listed}. How many {self.noun} now?"


def parse_question(question: str) -> Problem:
    match = _QUESTION.fullmatch(question.strip())
    if not match:
        raise ValueError(f"not an embedded-task question: {question[:80]!r}")
    ops = tuple((_OPS[word], int(b)) for word, b in _STEP.findall(match.group(3)))
    return Problem(int(match.group(1)), ops, match.group(2))


def sample_problem(rng: random.Random, steps: int) -> Problem:
    """Every operand and running value is one digit (0..9), and every step changes the value."""
    value = rng.randint(0, 9)
    start, ops = value, []
    for _ in range(steps):
        op = "+" if value == 0 else "-" if value == 9 else rng.choice("+-")
        b = rng.randint(1, 9 - value) if op == "+" else rng.randint(1, value)
        value = value + b if op == "+" else value - b
        ops.append((op, b))
    return Problem(start, tuple(ops), rng.choice(_OBJECTS))


def _step_line(i: int, a: int, op: str, b: int, c: int) -> str:
    return f"{i}) {a}{op}{b}={c}"


def minimal_solution(problem: Problem) -> str:
    values = problem.values()
    lines = [_step_line(i, values[i - 1], op, b, values[i]) for i, (op, b) in enumerate(problem.ops, 1)]
    return "\n".join(lines) + f"\nSo the answer is \\boxed{{{problem.answer}}}."


def render_trace(problem: Problem, rng: random.Random, filler_tokens: int | None = None) -> str:
    """An overthinking trace: the steps (perhaps with a slip), then verification and filler, then the answer.

    `filler_tokens` is approximate (one token per digit, word or symbol); drawn from FILLER_TOKENS if None.
    """
    values = problem.values()
    n = problem.steps
    slip = n >= SLIP_MIN_STEPS and rng.random() < SLIP_RATE
    slip_at = rng.randint(1, n) if slip else 0
    lines = []
    if slip:
        wrong = values[:]
        delta = rng.choice((-1, 1))
        for i in range(slip_at, n + 1):
            wrong[i] = values[i] + delta
        lines += [_step_line(i, wrong[i - 1], op, b, wrong[i]) for i, (op, b) in enumerate(problem.ops, 1)]
        a, (op, b) = values[slip_at - 1], problem.ops[slip_at - 1]
        lines.append(f"Wait, let me check step {slip_at}: {a}{op}{b}={values[slip_at]}, not {wrong[slip_at]}.")
        lines += [
            _step_line(i, values[i - 1], op, b, values[i])
            for i, (op, b) in enumerate(problem.ops[slip_at - 1 :], slip_at)
        ]
    else:
        lines += [_step_line(i, values[i - 1], op, b, values[i]) for i, (op, b) in enumerate(problem.ops, 1)]

    budget = rng.randint(*FILLER_TOKENS) if filler_tokens is None else filler_tokens
    spent = 0
    while spent < budget:
        if rng.random() < 0.5:
            i = rng.randint(1, n)
            op, b = problem.ops[i - 1]
            line = f"Check step {i}: {values[i - 1]}{op}{b}={values[i]}. Yes."
        else:
            line = rng.choice(_FILLER)
        lines.append(line)
        spent += _rough_tokens(line)
    lines.append(f"So the answer is \\boxed{{{problem.answer}}}.")
    return "\n".join(lines)


# A step line as `_step_line` writes it (and a model may get wrong): "3) 7-5=2".
_STEP_LINE = re.compile(r"(\d+)\) (-?\d+)([+-])(-?\d+)=(-?\d+)$")
ERROR_KINDS = ("operand", "carry", "arithmetic", "missing step", "final answer")


def first_error(problem: Problem, response: str) -> str | None:
    """What went wrong first in a response to `problem`, one of ERROR_KINDS, or None if nothing did.

    The first pass of step lines is read in order: a step whose operation or operand is not the question's
    is an `operand` error (copied from the wrong step), one that starts from another value than the last
    step's true result a `carry` error, one whose result is not its own sum an `arithmetic` error.
    """
    values = problem.values()
    lines = [m.groups() for line in response.splitlines() if (m := _STEP_LINE.match(line.strip()))][: problem.steps]
    for i, (_, a, op, b, c) in enumerate(lines, 1):
        if (op, int(b)) != problem.ops[i - 1]:
            return "operand"
        if int(a) != values[i - 1]:
            return "carry"
        if int(c) != (int(a) + int(b) if op == "+" else int(a) - int(b)):
            return "arithmetic"
    if len(lines) < problem.steps:
        return "missing step"
    return None if is_correct(response, str(problem.answer)) else "final answer"


def split_filler(response: str) -> tuple[str, str]:
    """(essential, filler) lines of a response: the step lines and the answer line are essential; every
    re-check, "Wait, ..." and other line is filler, the part SelfBudgeter should learn to drop."""
    essential, filler = [], []
    for line in response.splitlines():
        text = line.strip()
        (essential if _STEP_LINE.match(text) or text.startswith("So the answer is ") else filler).append(line)
    return "\n".join(essential), "\n".join(filler)


def filler_tokens(tokenizer, solution: str) -> int:
    """Tokens (in `tokenizer`) of the filler lines of a solution, as `split_filler` divides it."""
    from .format import token_length

    _, filler = split_filler(solution)
    return token_length(tokenizer, filler) if filler else 0


def _rough_tokens(text: str) -> int:
    return len(re.findall(r"\d|[A-Za-z]+|[^\sA-Za-z\d]", text))


def _rows(split: str) -> list[Row]:
    size, seed = SPLITS[split]
    rng = random.Random(seed)
    held_out = set() if split != "train" else {r.question for s in ("validation", "test") for r in load_split(s)}
    rows: list[Row] = []
    seen: set[str] = set()
    attempt = 0
    while len(rows) < size:
        # Levels in turn; a repeated question is skipped, so the few distinct 1-step questions cannot stall it.
        steps = MIN_STEPS + attempt % (MAX_STEPS - MIN_STEPS + 1)
        attempt += 1
        problem = sample_problem(rng, steps)
        question = problem.question()
        if question in held_out or question in seen:
            continue
        seen.add(question)
        rows.append(
            Row(
                id=f"{SOURCE}-{split}-{len(rows)}",
                question=question,
                answer=str(problem.answer),
                solution=minimal_solution(problem),
                difficulty=steps,
                source=SOURCE,
            )
        )
    return rows


@functools.lru_cache(maxsize=None)
def _cached(split: str) -> tuple[Row, ...]:
    return tuple(_rows(split))


def load_split(split: str) -> list[Row]:
    """The fixed split `train`, `validation` or `test` of the embedded task."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of the embedded task; choose from {', '.join(SPLITS)}")
    return list(_cached(split))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfbudgeter task",
        description="Write the embedded arithmetic task's fixed splits as JSONL (one row schema).",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write <split>.jsonl into")
    parser.add_argument("--split", choices=list(SPLITS), action="append", help="split(s) to write (default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for split in args.split or list(SPLITS):
        rows = load_split(split)
        write_jsonl(args.out / f"{split}.jsonl", [r.to_dict() for r in rows])
        print(f"{split}: {len(rows)} rows -> {args.out / f'{split}.jsonl'}")
    return 0
