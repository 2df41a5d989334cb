"""Grading fidelity on real benchmarks: gold solutions must grade as correct, other questions' answers as wrong.

For every row of GSM8K test (1,319) and MATH500 (500), the gold *solution* text is graded against

* its own gold answer: it must come out correct;
* the gold answer of another question of the same benchmark, chosen by a fixed-seed derangement: it must
  come out wrong. Pairs whose two gold answers are the same value (after light normalisation that does not
  use the grader) are skipped, since there "wrong" would be the mistake.

Grading failures (`Grade.error`) count as misses in both directions and are listed.

With `--lenient`, the opt-in lenient extraction (`grading.extract_answer_lenient`: the last "= N", else the
last number) is measured instead, on GSM8K by default, on the solutions as a model that does not box its
answer writes them: the `#### N` line, any `\\boxed{...}` and GSM8K's calculator annotations (`<<48/2=24>>`)
removed, so that only prose and numbers remain (`prose`). It has no pass mark: docs/grading.md records it.

    .venv/bin/python benchmarks/grading_fidelity.py [--data-dir ../shared/data] [--limit N] [--seed 0] [--lenient]
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from selfbudgeter.data import Row, load_benchmark
from selfbudgeter.core.grading import BOXED, LENIENT, grade, parse_number

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
BENCHMARKS = ("gsm8k", "math500")
TARGET = 0.995


@dataclass
class Result:
    name: str
    own_total: int = 0
    own_correct: int = 0
    other_total: int = 0
    other_wrong: int = 0
    skipped_pairs: int = 0
    graded: int = 0
    seconds: float = 0.0
    exceptions: list[str] = field(default_factory=list)

    @property
    def own_rate(self) -> float:
        return self.own_correct / self.own_total if self.own_total else 1.0

    @property
    def other_rate(self) -> float:
        return self.other_wrong / self.other_total if self.other_total else 1.0


def derangement(n: int, seed: int) -> list[int]:
    """A permutation with no fixed point (Sattolo's algorithm gives a single n-cycle)."""
    order = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        order[i], order[j] = order[j], order[i]
    return order


def same_answer(a: str, b: str) -> bool:
    """Grader-independent equality of two gold answers, to skip pairs that are not really different."""
    na, nb = parse_number(a), parse_number(b)
    if na is not None and nb is not None:
        return na == nb

    def norm(text: str) -> str:
        text = re.sub(r"\\left|\\right|\\!|\\,|\\;|\s|\$", "", text)
        return text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")

    return norm(a) == norm(b)


_HASHES_LINE = re.compile(r"^.*####.*$", re.MULTILINE)
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def _drop_boxed(text: str) -> str:
    """The text without any `\\boxed{...}` / `\\fbox{...}` (nested braces), its content included."""
    for tag in ("\\boxed{", "\\fbox{"):
        while (start := text.find(tag)) >= 0:
            depth, j = 1, start + len(tag)
            while j < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            text = text[:start] + text[j:]
    return text


def prose(solution: str) -> str:
    """A worked solution as a model that does not box its answer writes it: no `#### N` line, no boxed part,
    no calculator annotation."""
    return _CALCULATOR.sub("", _drop_boxed(_HASHES_LINE.sub("", solution))).strip()


def run(name: str, rows: list[Row], seed: int, extraction: str = BOXED) -> Result:
    result = Result(name)
    partner = derangement(len(rows), seed)
    start = time.perf_counter()
    for i, row in enumerate(rows):
        solution = row.solution or ""
        if extraction == LENIENT:
            solution = prose(solution)
        own = grade(solution, row.answer, extraction=extraction)
        result.own_total += 1
        result.graded += 1
        if own.correct:
            result.own_correct += 1
        else:
            why = f"error: {own.error}" if own.error else f"predicted {own.predicted!r}"
            result.exceptions.append(f"{name} {row.id} own answer {row.answer!r}: {why}")
        other = rows[partner[i]].answer
        if same_answer(other, row.answer):
            result.skipped_pairs += 1
            continue
        wrong = grade(solution, other, extraction=extraction)
        result.other_total += 1
        result.graded += 1
        if not wrong.correct and wrong.error is None:
            result.other_wrong += 1
        else:
            why = f"error: {wrong.error}" if wrong.error else f"predicted {wrong.predicted!r}"
            result.exceptions.append(f"{name} {row.id} vs other answer {other!r} (own {row.answer!r}): {why}")
    result.seconds = time.perf_counter() - start
    return result


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder with <name>/test.jsonl")
    parser.add_argument("--benchmarks", nargs="+", default=None, choices=BENCHMARKS,
                        help="default: both, or gsm8k alone with --lenient")
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each benchmark")
    parser.add_argument("--seed", type=int, default=0, help="seed of the derangement")
    parser.add_argument("--lenient", action="store_true",
                        help="measure the opt-in lenient extraction on prose solutions (no pass mark)")
    parser.add_argument("--show", type=int, default=None, help="list at most N misses of each benchmark")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    grade("\\boxed{\\frac{1}{2}}", "0.5")  # imports sympy before the clock starts
    ok = True
    extraction = LENIENT if args.lenient else BOXED
    names = args.benchmarks or (["gsm8k"] if args.lenient else list(BENCHMARKS))
    for name in names:
        rows = load_benchmark(name, "test", data_dir=args.data_dir, limit=args.limit)
        result = run(name, rows, args.seed, extraction)
        if args.lenient:
            strict = sum(grade(prose(row.solution or ""), row.answer).correct for row in rows)
            print(f"{name}: strict (boxed) extraction on the same prose: own answer correct {strict}/{len(rows)} "
                  f"= {strict / len(rows):.2%}")
        rate = result.graded / result.seconds if result.seconds else float("inf")
        print(
            f"{name}: own answer correct {result.own_correct}/{result.own_total} = {result.own_rate:.2%}; "
            f"other answer wrong {result.other_wrong}/{result.other_total} = {result.other_rate:.2%} "
            f"({result.skipped_pairs} equal pairs skipped); {result.graded} gradings in {result.seconds:.1f} s "
            f"= {rate:.0f} answers/s"
        )
        for line in result.exceptions[: args.show]:
            print(f"  {line}")
        if len(result.exceptions) > len(result.exceptions[: args.show]):
            print(f"  ... and {len(result.exceptions) - args.show} more")
        ok &= result.own_rate >= TARGET and result.other_rate >= TARGET
    if args.lenient:
        print(f"{extraction} extraction on prose solutions: no pass mark (docs/grading.md)")
        return 0
    print("PASS" if ok else f"FAIL: a rate is below {TARGET:.1%}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
