"""Evaluation metrics over per-item records (one dict per graded response, as written to `items.jsonl`).

Record schema:

    id, difficulty (number | None), gold, response (full text), prefill_budget (int | None),
    control_multiplier (float | None), budget (int | None: parsed or prefilled), length (int: solution
    tokens; whole-response tokens when the format is broken), format_ok (bool), format_error (str | None),
    correct (bool), grading_error (str | None), predicted (str | None), sample (int), finish_reason (str:
    "stop", or "length" when the generation cap cut the response; missing on hand-made records), decoder (str:
    "model" when the model wrote the response alone, else the decode-time budget option that shaped it:
    "cap", "extend", "cap_extend"; missing means "model"), forced (bool: the decoder changed the
    response), on control records min_solution_tokens (int | None: tokens of the question's reference
    solution, the least a correct answer needs; None when the dataset has none), and on a task's records
    `<part>_tokens` for each part of the solution the task measures (int | None: `data.Task.measures`; the
    embedded task's filler_tokens, tokens of the solution's filler lines)

Records with a `control_multiplier` come from user-budget control runs (the budget was prefilled at a
multiple of the model's own estimate); they feed only the `control*` metrics. Everything else is computed
on the other records. Budget adherence uses well-formed records only: a broken response has no budget.

Records of a decoder other than "model" never enter the top-level metrics, which describe the model
alone; each decoder gets the same summary of its own records under `decoders`.

User control (METHOD.md, "User control, how we measure it"), on control records:
1. `control_slope`: per question, the least-squares slope of log(length) on log(user budget) over its
   well-formed records (at least two distinct budgets); the median over questions. 1 means the length
   follows the budget, 0 that it ignores it. One regression pooled over all questions is not reported: it
   reads ~0.06 for a model that ignores the budget, from the spread of its own estimates alone.
2. `control_within_20`: the share of records with |length - budget| <= 0.2 budget, over reachable budgets
   only (budget >= min_solution_tokens; every budget when that is unknown). A broken response is a miss.
3. `control_accuracy`: per multiplier, accuracy (broken responses are wrong), accuracy on the hardest
   third of the control questions by difficulty (ties at the cut included), mean length and within_20.

`cut_rate` is the share of responses the generation cap cut (finish_reason "length"): a model that loops
until the cap shows here (None when no record says how it ended).

Every value returned is plain Python (float, int, str, None, list, dict), NaN becomes None: JSON-ready.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Record = Mapping[str, Any]

# Quantiles reported for the relative budget error (length - budget) / budget.
QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
# Tolerances of the "within x%" adherence metrics; the paper reports within 50%.
WITHIN = (10, 20, 50)
FAILURE_EXAMPLES = 5
EXAMPLE_CHARS = 300


def _clean(value: Any) -> Any:
    """numpy scalars to Python, NaN and infinities to None, recursively."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


MODEL = "model"  # the decoder of a response the model wrote alone


def decoder(record: Record) -> str:
    """Which decoder made the record: "model" (the model alone) or a decode-time budget option."""
    return record.get("decoder") or MODEL


def by_decoder(records: Iterable[Record]) -> dict[str, list[Record]]:
    """Records grouped by decoder, the model alone first, then the others by name."""
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(decoder(r), []).append(r)
    return {name: groups[name] for name in sorted(groups, key=lambda name: (name != MODEL, name))}


def main_records(records: Iterable[Record], decoded_by: str = MODEL) -> list[Record]:
    """The records of the ordinary evaluation (not user-budget control runs) made by one decoder."""
    return [r for r in records if r.get("control_multiplier") is None and decoder(r) == decoded_by]


def control_records(records: Iterable[Record], decoded_by: str = MODEL) -> list[Record]:
    """The user-budget control records made by one decoder (the model alone unless told otherwise)."""
    return [r for r in records if r.get("control_multiplier") is not None and decoder(r) == decoded_by]


def budgeted(records: Iterable[Record]) -> list[Record]:
    """Well-formed records with a budget: the ones budget adherence is measured on."""
    return [r for r in records if r.get("format_ok") and r.get("budget") is not None]


def accuracy(records: Sequence[Record]) -> float | None:
    return _mean([bool(r["correct"]) for r in records])


def mean_length(records: Sequence[Record]) -> float | None:
    return _mean([r["length"] for r in records])


def median_length(records: Sequence[Record]) -> float | None:
    return float(np.median([r["length"] for r in records])) if records else None


def compression(mean_tokens: float | None, baseline_mean_tokens: float | None) -> float | None:
    """1 - mean / baseline: the fraction of the baseline's tokens saved (0.61 is the paper's 61%)."""
    if mean_tokens is None or baseline_mean_tokens is None or baseline_mean_tokens <= 0:
        return None
    return 1.0 - mean_tokens / baseline_mean_tokens


def relative_errors(records: Iterable[Record]) -> list[float]:
    """(length - budget) / budget of each well-formed record: 0 on budget, +0.2 is 20% over."""
    return [(r["length"] - r["budget"]) / r["budget"] for r in budgeted(records)]


# METHOD.md's tolerance for keeping a budget: |length - budget| <= 0.2 budget, "within ±20%".
TOLERANCE = 0.2


def within_tolerance(length: float, budget: float, tolerance: float = TOLERANCE) -> bool:
    """Whether a solution of `length` tokens kept `budget` within ±tolerance (the boundary is inside): the one
    test of "within ±20%" for evaluation, the report and training logs alike."""
    # The epsilon keeps an exact boundary (length 120 for budget 100 at 0.2) inside despite rounding.
    return abs(length - budget) <= tolerance * budget + 1e-12


def within(records: Iterable[Record], percent: float) -> float | None:
    """Fraction of well-formed records whose length is within percent% of their budget."""
    return _mean([within_tolerance(r["length"], r["budget"], percent / 100) for r in budgeted(records)])


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """Least-squares slope of y on x and Pearson r; None where x has fewer than 2 distinct values."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(np.unique(xs)) < 2:
        return None, None
    slope = float(np.polyfit(xs, ys, 1)[0])
    pearson = float(np.corrcoef(xs, ys)[0, 1]) if np.std(ys) > 0 else None
    return slope, pearson


def length_budget_fit(records: Iterable[Record]) -> tuple[float | None, float | None]:
    """Slope and Pearson r of solution length on the budget (the paper reports slope ~1.03 on MATH500)."""
    rows = budgeted(records)
    return linear_fit([r["budget"] for r in rows], [r["length"] for r in rows])


def spearman_budget_difficulty(records: Iterable[Record]) -> float | None:
    """Rank correlation of the budget with the question's difficulty; None without variation in either."""
    rows = [r for r in budgeted(records) if r.get("difficulty") is not None]
    budgets = [r["budget"] for r in rows]
    difficulties = [r["difficulty"] for r in rows]
    if len(set(budgets)) < 2 or len(set(difficulties)) < 2:
        return None
    from scipy import stats

    return _clean(float(stats.spearmanr(difficulties, budgets).statistic))


def adherence(records: Iterable[Record]) -> dict[str, Any]:
    """Budget adherence of well-formed records: relative error quantiles, within x%, length-on-budget fit."""
    records = list(records)
    errors = relative_errors(records)
    slope, pearson = length_budget_fit(records)
    out: dict[str, Any] = {
        "n_budgeted": len(errors),
        "relative_error_quantiles": (
            {f"q{round(q * 100):02d}": float(np.quantile(errors, q)) for q in QUANTILES} if errors else {}
        ),
        "mean_relative_error": _mean(errors),
        "length_budget_slope": slope,
        "length_budget_pearson": pearson,
    }
    for percent in WITHIN:
        out[f"within_{percent}"] = within(records, percent)
    return out


# The share of control questions, hardest first, that `accuracy_hard` is measured on.
HARD_SHARE = 1 / 3


def _control_budget(record: Record) -> int | None:
    return record.get("prefill_budget") or record.get("budget")


def reachable(record: Record) -> bool:
    """Whether a control record's user budget is at least the question's minimal correct solution length
    (`min_solution_tokens`); every budget is reachable when that length is unknown."""
    need = record.get("min_solution_tokens")
    budget = _control_budget(record)
    return budget is not None and (need is None or budget >= need)


def met_budget(record: Record) -> bool:
    """A well-formed response whose length is within ±20% of its user budget; a broken one is a miss."""
    budget = _control_budget(record)
    return bool(record.get("format_ok") and budget) and within_tolerance(record["length"], budget)


def question_slopes(records: Iterable[Record], decoded_by: str = MODEL) -> dict[str, float]:
    """Per question id: the least-squares slope of log(length) on log(user budget) over its well-formed
    control records; questions with fewer than two distinct budgets have none."""
    points: dict[str, list[tuple[float, float]]] = {}
    for r in control_records(records, decoded_by):
        budget = _control_budget(r)
        if r.get("format_ok") and budget:
            points.setdefault(str(r["id"]), []).append((math.log(budget), math.log(max(r["length"], 1))))
    slopes = {}
    for qid, pairs in points.items():
        slope, _ = linear_fit([x for x, _ in pairs], [y for _, y in pairs])
        if slope is not None:
            slopes[qid] = slope
    return slopes


def control_slope(records: Iterable[Record], decoded_by: str = MODEL) -> float | None:
    """The median over questions of the per-question slope (1: the length follows the budget, 0: ignores it)."""
    slopes = list(question_slopes(records, decoded_by).values())
    return float(np.median(slopes)) if slopes else None


def control_within(records: Iterable[Record], decoded_by: str = MODEL) -> float | None:
    """The share of control records over reachable budgets whose length is within ±20% of the budget."""
    return _mean([met_budget(r) for r in control_records(records, decoded_by) if reachable(r)])


def hardest_questions(records: Iterable[Record], share: float = HARD_SHARE) -> set[str]:
    """Ids of the hardest `share` of the questions by difficulty (ties at the cut included; none without
    difficulties)."""
    difficulty = {str(r["id"]): r["difficulty"] for r in records if r.get("difficulty") is not None}
    if not difficulty:
        return set()
    ranked = sorted(difficulty.values(), reverse=True)
    cut = ranked[max(1, round(share * len(ranked))) - 1]
    return {qid for qid, value in difficulty.items() if value >= cut}


def control_curve(records: Iterable[Record], decoded_by: str = MODEL) -> list[dict[str, Any]]:
    """The user-budget control table of one decoder: one row per multiplier of the model's own estimate.

    `length_over_estimate` is mean(length / own estimate), own estimate = prefill budget / multiplier;
    perfect control puts it on the multiplier itself. `within_20` counts reachable budgets only (of which
    there are `n_reachable`); `accuracy_hard` is the accuracy on the hardest third of the control questions.
    """
    control = control_records(records, decoded_by)
    hard = hardest_questions(control)
    by_multiplier: dict[float, list[Record]] = {}
    for r in control:
        by_multiplier.setdefault(float(r["control_multiplier"]), []).append(r)
    rows = []
    for multiplier in sorted(by_multiplier):
        group = by_multiplier[multiplier]
        ok = [r for r in group if r.get("format_ok") and _control_budget(r)]
        reachable_group = [r for r in group if reachable(r)]
        rows.append(
            {
                "multiplier": multiplier,
                "n": len(group),
                "mean_budget": _mean([_control_budget(r) for r in group if _control_budget(r)]),
                "mean_length": mean_length(group),
                "length_over_estimate": _mean([r["length"] * multiplier / _control_budget(r) for r in ok]),
                "n_reachable": len(reachable_group),
                "within_20": _mean([met_budget(r) for r in reachable_group]),
                "accuracy": accuracy(group),
                "accuracy_hard": accuracy([r for r in group if str(r["id"]) in hard]),
                "format_ok_rate": _mean([bool(r.get("format_ok")) for r in group]),
                "forced_rate": _mean([bool(r.get("forced")) for r in group]),
            }
        )
    return rows


CONTROL_ACCURACY_KEYS = ("multiplier", "accuracy", "accuracy_hard", "mean_length", "within_20")


PART_SUFFIX = "_tokens"
# Record keys that end in PART_SUFFIX without being a part a task measured.
NOT_PARTS = ("min_solution_tokens",)


def solution_parts(records: Iterable[Record]) -> list[str]:
    """The parts of the solution that the records' task measured (`<part>_tokens`: the embedded task's filler)."""
    return sorted({key[: -len(PART_SUFFIX)] for r in records for key in r
                   if key.endswith(PART_SUFFIX) and key not in NOT_PARTS})


def part_share(records: Sequence[Record], part: str) -> tuple[float | None, float | None]:
    """(mean tokens of the part, its share of all solution tokens) over the records that measured it."""
    key = f"{part}{PART_SUFFIX}"
    rows = [r for r in records if r.get(key) is not None]
    if not rows:
        return None, None
    total = sum(r["length"] for r in rows)
    return _mean([r[key] for r in rows]), (sum(r[key] for r in rows) / total if total else None)


def part_metrics(records: Sequence[Record]) -> dict[str, float | None]:
    """`mean_<part>_tokens` and `<part>_share` of every part the records' task measured (none: {})."""
    out: dict[str, float | None] = {}
    for part in solution_parts(records):
        out[f"mean_{part}{PART_SUFFIX}"], out[f"{part}_share"] = part_share(records, part)
    return out


def format_failures(records: Sequence[Record], examples: int = FAILURE_EXAMPLES) -> dict[str, Any]:
    """Broken responses grouped by FormatError reason: a count and up to `examples` shortened examples."""
    out: dict[str, Any] = {}
    for r in records:
        if r.get("format_ok"):
            continue
        reason = r.get("format_error") or "unknown"
        entry = out.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < examples:
            response = str(r.get("response", ""))
            if len(response) > EXAMPLE_CHARS:
                response = response[:EXAMPLE_CHARS] + " ..."
            entry["examples"].append({"id": r.get("id"), "response": response})
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["count"]))


def _summary(records: Sequence[Record], baseline_mean_tokens: float | None, decoded_by: str) -> dict[str, Any]:
    """The metrics of the records one decoder made (see the module docstring)."""
    main = main_records(records, decoded_by)
    mean_tokens = mean_length(main)
    curve = control_curve(records, decoded_by)
    return {
        "n": len(main),
        "n_control": len(control_records(records, decoded_by)),
        "accuracy": accuracy(main),
        "mean_tokens": mean_tokens,
        "median_tokens": median_length(main),
        "compression": compression(mean_tokens, baseline_mean_tokens),
        **adherence(main),
        "spearman_budget_difficulty": spearman_budget_difficulty(main),
        "control_slope": control_slope(records, decoded_by),
        "control_within_20": control_within(records, decoded_by),
        "control": curve,
        "control_accuracy": [{key: row[key] for key in CONTROL_ACCURACY_KEYS} for row in curve],
        **part_metrics(main),
        "format_failure_rate": _mean([not r.get("format_ok") for r in main]),
        "format_failures": format_failures(main),
        "cut_rate": _mean([r["finish_reason"] == "length" for r in main if r.get("finish_reason")]),
    }


def summarize(records: Iterable[Record], baseline_mean_tokens: float | None = None) -> dict[str, Any]:
    """Every metric of one evaluation run as a flat, JSON-ready dict (see the module docstring).

    The top level describes the model alone; `decoders` maps each decode-time budget option present to the
    same summary of its own records, plus `forced_rate` (the share of its main records it changed).
    """
    records = list(records)
    groups = by_decoder(records)
    summary = _summary(groups.get(MODEL, []), baseline_mean_tokens, MODEL)
    summary["decoders"] = {
        name: {
            **_summary(rows, baseline_mean_tokens, name),
            "forced_rate": _mean([bool(r.get("forced")) for r in main_records(rows, name)]),
        }
        for name, rows in groups.items()
        if name != MODEL
    }
    # All records, control runs and decoders included: any grading failure deserves a look.
    summary["grading_failures"] = sum(r.get("grading_error") is not None for r in records)
    return _clean(summary)
