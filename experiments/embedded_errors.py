"""What the wrong answers of an embedded-task evaluation got wrong first, by difficulty.

Reads the `items.jsonl` of one or more `selfbudgeter eval` folders on the embedded test split, keeps the
responses to the model's own budget (no user budget prefilled), and classifies the solution of each wrong
one (the text inside the solution tags; a model without the budget format, such as the base, is read whole)
with `task.first_error`: an operand copied from the wrong step of the question, a carried value, a sum, a
missing step, or only the final answer. Prints accuracy and the error kinds per number of steps.

    .venv/bin/python experiments/embedded_errors.py runs/demo/eval/sft runs/demo/eval/selfbudgeter
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

from selfbudgeter.core.errors import UserError
from selfbudgeter.core.format import BUDGET_OPEN, FormatError, try_parse
from selfbudgeter.evaluation.report import load_records
from selfbudgeter.embedded.task import ERROR_KINDS, first_error, load_split, parse_question

BROKEN = "broken format"  # a response that opens a budget tag but does not parse


def error_kind(question: str, response: str) -> str:
    """The first mistake of a wrong response (ERROR_KINDS), BROKEN, or "graded wrong" if none is found."""
    parsed = try_parse(response)
    if isinstance(parsed, FormatError):
        if BUDGET_OPEN in response:
            return BROKEN
        solution = response
    else:
        solution = parsed.solution
    return first_error(parse_question(question), solution) or "graded wrong"


def breakdown(folder: Path) -> tuple[dict[int, list[bool]], dict[int, Counter]]:
    """(correct flags, error kinds) per difficulty for the own-budget responses of an evaluation folder."""
    questions = {row.id: row.question for row in load_split("test")}
    correct, kinds = defaultdict(list), defaultdict(Counter)
    for item in load_records(folder):
        if item.get("prefill_budget") is not None:
            continue
        if item["id"] not in questions:
            raise UserError(f"{folder}: {item['id']} is not an embedded test question")
        level = item["difficulty"]
        correct[level].append(bool(item["correct"]))
        if not item["correct"]:
            kinds[level][error_kind(questions[item["id"]], item["response"])] += 1
    return correct, kinds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("evals", nargs="+", type=Path, help="`selfbudgeter eval` output folders")
    args = parser.parse_args()
    for folder in args.evals:
        try:
            correct, kinds = breakdown(folder)
        except UserError as error:
            parser.error(str(error))
        columns = [*ERROR_KINDS, BROKEN, "graded wrong"]
        total = Counter()
        print(f"\n{folder}")
        print("| steps | n | accuracy | " + " | ".join(columns) + " |")
        print("|" + "---|" * (3 + len(columns)))
        for level in sorted(correct):
            flags = correct[level]
            total.update(kinds[level])
            cells = [str(kinds[level][kind]) for kind in columns]
            print(f"| {level} | {len(flags)} | {sum(flags) / len(flags):.1%} | " + " | ".join(cells) + " |")
        flags = [flag for level in correct for flag in correct[level]]
        print(f"| all | {len(flags)} | {sum(flags) / len(flags):.1%} | "
              + " | ".join(str(total[kind]) for kind in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
