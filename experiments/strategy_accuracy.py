"""How accurate each way of solving is in a profile of the embedded base model, and what its checks do.

Reads the `samples.jsonl` of one or more `selfbudgeter profile` folders (embedded questions of any split) and
sorts every sample by its way of solving: a first pass with one operation per line or with combined lines,
followed by a verification pass or not. Prints accuracy per way and number of steps (1-3, 4-8), how many
check lines recompute their step wrongly, and how many answers with a right first pass end wrong (a check
that "repairs" what was right).

    .venv/bin/python experiments/strategy_accuracy.py runs/v2-val-prof
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from selfbudgeter.data import read_jsonl
from selfbudgeter.embedded.task import SPLITS, Problem, first_error, first_pass, load_split, parse_question

def way(response: str) -> tuple[str, str]:
    """(first pass, verification) of a response: ("one per line" | "combined", "checked" | "unchecked")."""
    lines = [line.strip() for line in response.splitlines()]
    combined = any(first != last for first, last, *_ in first_pass(response))
    checked = any(line.startswith("Check ") for line in lines)
    return ("combined" if combined else "one per line", "checked" if checked else "unchecked")


def check_lines(problem: Problem, response: str) -> tuple[int, int]:
    """(check lines, wrong ones): a check line ("Check 3) 6-1=5", read as a first-pass line) is wrong when its
    step's values or operation are not the problem's; a line naming a step the problem does not have counts as
    wrong."""
    checks = [line.strip().removeprefix("Check ") for line in response.splitlines()
              if line.strip().startswith("Check ")]
    values, total, wrong = problem.values(), 0, 0
    for first, last, a, terms, c in first_pass("\n".join(checks)):
        total += 1
        ok = first == last and 1 <= first <= problem.steps and (a, terms, c) == (
            values[first - 1], [problem.ops[first - 1]], values[first])
        wrong += not ok
    return total, wrong


def band(steps: int) -> str:
    return "1-3" if steps <= 3 else "4-8"


def tables(folder: Path, questions: dict[str, str]) -> dict:
    cells = defaultdict(lambda: [0, 0])  # (band, first pass, verification) -> [correct, n]
    checks = [0, 0]
    spoiled = [0, 0]  # answers with a right first pass: [wrong at the end, all]
    for sample in read_jsonl(folder / "samples.jsonl"):
        problem = parse_question(questions[sample["id"]])
        first, verification = way(sample["response"])
        correct = bool(sample["correct"])
        for key in ((band(problem.steps), first, verification), (band(problem.steps), first, "all"),
                    ("all", "all", "all")):
            cells[key][0] += correct
            cells[key][1] += 1
        total, wrong = check_lines(problem, sample["response"])
        checks[0] += wrong
        checks[1] += total
        if first_error(problem, sample["response"]) in (None, "final answer"):
            spoiled[0] += not correct
            spoiled[1] += 1
    return {"cells": dict(cells), "checks": checks, "spoiled": spoiled}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profiles", nargs="+", type=Path, help="`selfbudgeter profile` output folders")
    args = parser.parse_args()
    questions = {row.id: row.question for split in SPLITS for row in load_split(split)}
    for folder in args.profiles:
        if not (folder / "samples.jsonl").exists():
            parser.error(f"{folder} has no samples.jsonl: not a profile folder")
        got = tables(folder, questions)
        print(f"\n{folder}")
        print("| steps | first pass | verification | n | accuracy |")
        print("|---|---|---|---:|---:|")
        for (steps, first, verification), (correct, n) in sorted(got["cells"].items()):
            print(f"| {steps} | {first} | {verification} | {n} | {correct / n:.1%} |")
        wrong, total = got["checks"]
        spoiled, right_first = got["spoiled"]
        print(f"check lines: {total}, wrong {wrong} ({wrong / max(total, 1):.1%}); answers with a right first "
              f"pass: {right_first}, wrong at the end {spoiled} ({spoiled / max(right_first, 1):.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
