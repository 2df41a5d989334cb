"""Where an embedded-task model's lengths miss its own budgets, and whether its filler follows the budget.

Reads the `items.jsonl` of one or more `selfbudgeter eval` folders on the embedded test split and keeps the
well-formed responses to the model's own budget. A solution is its needed steps (`length - filler_tokens`,
fixed by the question) plus filler (check lines, "That seems right."), which the model is free to vary. The
slack a budget leaves is `budget - needed`: a solution that plans its length to its budget writes filler
equal to the slack (slope 1 of filler on slack); one that picks its filler without reading its budget
gives slope 0, and its budget can then only match the average filler. Prints, per number of steps and
overall: responses, share within ±20% of the budget, misses under and over, mean budget, needed and filler
tokens, and the filler~slack Pearson correlation and slope.

    .venv/bin/python experiments/budget_misses.py runs/demo/eval/sft runs/demo/eval/selfbudgeter
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from selfbudgeter.core.errors import UserError
from selfbudgeter.evaluation.report import load_records

COLUMNS = ("n", "within ±20%", "under", "over", "budget", "needed", "filler", "filler~slack r", "slope")
# How each column prints; the others are mean token counts, "{:.1f}".
FORMATS = {"n": "{}", "within ±20%": "{:.1%}", "under": "{}", "over": "{}", "filler~slack r": "{:.2f}",
           "slope": "{:.2f}"}


def summary(items: list[dict]) -> dict[str, float]:
    """The row of COLUMNS for well-formed own-budget responses (dicts with budget, length, filler_tokens)."""
    budgets = [item["budget"] for item in items]
    needed = [item["length"] - item["filler_tokens"] for item in items]
    filler = [item["filler_tokens"] for item in items]
    slack = [b - n for b, n in zip(budgets, needed)]
    within = [abs(item["length"] - item["budget"]) <= 0.2 * item["budget"] for item in items]
    row = {
        "n": len(items),
        "within ±20%": sum(within) / len(items),
        "under": sum(not ok and item["length"] < item["budget"] for ok, item in zip(within, items)),
        "over": sum(not ok and item["length"] > item["budget"] for ok, item in zip(within, items)),
        "budget": statistics.fmean(budgets),
        "needed": statistics.fmean(needed),
        "filler": statistics.fmean(filler),
    }
    constant = len(set(slack)) < 2 or len(set(filler)) < 2
    row["filler~slack r"] = float("nan") if constant else statistics.correlation(slack, filler)
    row["slope"] = float("nan") if constant else statistics.linear_regression(slack, filler).slope
    return row


def own_budget_items(folder: Path) -> list[dict]:
    """The well-formed responses to the model's own budget in an evaluation folder."""
    items = load_records(folder)
    if items and "filler_tokens" not in items[0]:
        raise UserError(f"{folder}: no filler_tokens; this reads evaluations on the embedded task")
    return [item for item in items if item.get("prefill_budget") is None and item["format_ok"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("evals", nargs="+", type=Path, help="`selfbudgeter eval` output folders")
    args = parser.parse_args()
    for folder in args.evals:
        try:
            items = own_budget_items(folder)
        except UserError as error:
            parser.error(str(error))
        if not items:
            print(f"\n{folder}: no well-formed response to the model's own budget")
            continue
        levels = defaultdict(list)
        for item in items:
            levels[item["difficulty"]].append(item)
        print(f"\n{folder}")
        print("| steps | " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * (1 + len(COLUMNS)))
        for label, group in [*sorted(levels.items()), ("all", items)]:
            row = summary(group)
            cells = [FORMATS.get(name, "{:.1f}").format(row[name]) for name in COLUMNS]
            print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
