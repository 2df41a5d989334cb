"""Evaluation metrics over per-item records (one dict per graded response, as written to `items.jsonl`).

Record schema:

    id, difficulty (number | None), gold, response (full text), prefill_budget (int | None),
    control_multiplier (float | None), budget (int | None: parsed or prefilled), length (int: solution
    tokens; whole-response tokens when the format is broken), format_ok (bool), format_error (str | None),
    correct (bool), grading_error (str | None), predicted (str | None), sample (int), and on the embedded
    task filler_tokens (int | None: tokens of the solution's filler lines, `task.split_filler`)

Records with a `control_multiplier` come from user-budget control runs (the budget was prefilled at a
multiple of the model's own estimate); they feed only the `control*` metrics. Everything else is computed
on the other records. Budget adherence uses well-formed records only: a broken response has no budget.

Every value returned is plain Python (float, int, str, None, list, dict), NaN becomes None: JSON-ready.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

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


def main_records(records: Iterable[Record]) -> list[Record]:
    """The records of the ordinary evaluation: not user-budget control runs."""
    return [r for r in records if r.get("control_multiplier") is None]


def control_records(records: Iterable[Record]) -> list[Record]:
    return [r for r in records if r.get("control_multiplier") is not None]


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


def within(records: Iterable[Record], percent: float) -> float | None:
    """Fraction of well-formed records whose length is within percent% of their budget."""
    errors = relative_errors(records)
    # The small epsilon keeps an exact boundary (length 120 for budget 100 at 20%) inside despite rounding.
    return _mean([abs(e) <= percent / 100 + 1e-12 for e in errors])


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


def _control_budget(record: Record) -> int | None:
    return record.get("prefill_budget") or record.get("budget")


def control_curve(records: Iterable[Record]) -> list[dict[str, Any]]:
    """The user-budget control table: one row per multiplier of the model's own estimate.

    `length_over_estimate` is mean(length / own estimate), own estimate = prefill budget / multiplier;
    perfect control puts it on the multiplier itself.
    """
    by_multiplier: dict[float, list[Record]] = {}
    for r in control_records(records):
        by_multiplier.setdefault(float(r["control_multiplier"]), []).append(r)
    rows = []
    for multiplier in sorted(by_multiplier):
        group = by_multiplier[multiplier]
        ok = [r for r in group if r.get("format_ok") and _control_budget(r)]
        ratios = [r["length"] * multiplier / _control_budget(r) for r in ok]
        rows.append(
            {
                "multiplier": multiplier,
                "n": len(group),
                "mean_budget": _mean([_control_budget(r) for r in group if _control_budget(r)]),
                "mean_length": mean_length(group),
                "length_over_estimate": _mean(ratios),
                "within_20": _mean([abs(r["length"] - _control_budget(r)) <= 0.2 * _control_budget(r) for r in ok]),
                "accuracy": accuracy(group),
                "format_ok_rate": _mean([bool(r.get("format_ok")) for r in group]),
            }
        )
    return rows


def control_fit(records: Iterable[Record]) -> tuple[float | None, float | None]:
    """Slope of length on the prefilled budget across all well-formed control records, and within 20%."""
    rows = [r for r in control_records(records) if r.get("format_ok") and _control_budget(r)]
    slope, _ = linear_fit([_control_budget(r) for r in rows], [r["length"] for r in rows])
    within_20 = _mean([abs(r["length"] - _control_budget(r)) <= 0.2 * _control_budget(r) for r in rows])
    return slope, within_20


def filler(records: Sequence[Record]) -> tuple[float | None, float | None]:
    """(mean filler tokens, filler share of all solution tokens) over records that measured their filler."""
    rows = [r for r in records if r.get("filler_tokens") is not None]
    if not rows:
        return None, None
    total = sum(r["length"] for r in rows)
    return _mean([r["filler_tokens"] for r in rows]), (sum(r["filler_tokens"] for r in rows) / total if total else None)


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


def summarize(records: Iterable[Record], baseline_mean_tokens: float | None = None) -> dict[str, Any]:
    """Every metric of one evaluation run as a flat, JSON-ready dict (see the module docstring)."""
    records = list(records)
    main = main_records(records)
    mean_tokens = mean_length(main)
    control_slope, control_within_20 = control_fit(records)
    mean_filler, filler_share = filler(main)
    summary: dict[str, Any] = {
        "n": len(main),
        "n_control": len(records) - len(main),
        "accuracy": accuracy(main),
        "mean_tokens": mean_tokens,
        "median_tokens": median_length(main),
        "compression": compression(mean_tokens, baseline_mean_tokens),
        **adherence(main),
        "spearman_budget_difficulty": spearman_budget_difficulty(main),
        "control_slope": control_slope,
        "control_within_20": control_within_20,
        "control": control_curve(records),
        "mean_filler_tokens": mean_filler,
        "filler_share": filler_share,
        "format_failure_rate": _mean([not r.get("format_ok") for r in main]),
        "format_failures": format_failures(main),
        # All records, control runs included: any grading failure deserves a look.
        "grading_failures": sum(r.get("grading_error") is not None for r in records),
    }
    return _clean(summary)
