"""Metric tests on hand-made records whose expected values are worked out by hand in the comments.

Run: .venv/bin/python -m pytest -q tests/test_metrics.py
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from selfbudgeter import metrics
from selfbudgeter.metrics import compression, linear_fit, spearman_budget_difficulty, summarize


def rec(
    id_,
    budget,
    length,
    correct=True,
    *,
    difficulty=None,
    format_error=None,
    multiplier=None,
    prefill=None,
    grading_error=None,
    response="...",
):
    return {
        "id": id_,
        "difficulty": difficulty,
        "gold": "1",
        "response": response,
        "prefill_budget": prefill,
        "control_multiplier": multiplier,
        "budget": prefill if prefill is not None else budget,
        "length": length,
        "format_ok": format_error is None,
        "format_error": format_error,
        "correct": correct,
        "grading_error": grading_error,
        "predicted": "1" if correct else "2",
        "sample": 0,
    }


MAIN = [
    rec("r1", 100, 100, True, difficulty=1),  # relative error 0
    rec("r2", 100, 120, True, difficulty=1),  # +0.2: on the 20% boundary
    rec("r3", 200, 150, False, difficulty=2, grading_error="timeout"),  # -0.25
    rec("r4", 400, 600, True, difficulty=3),  # +0.5
    rec("r5", None, 1000, False, difficulty=3, format_error="missing_budget", response="x" * 400),
]
# Own estimates 100 (question a) and 200 (question b), prefilled at 0.5x and 2x.
CONTROL = [
    rec("a", None, 50, True, multiplier=0.5, prefill=50),
    rec("b", None, 150, False, multiplier=0.5, prefill=100),
    rec("a", None, 220, True, multiplier=2.0, prefill=200),
    rec("b", None, 900, False, multiplier=2.0, prefill=400, format_error="unclosed_solution", grading_error="x"),
]


@pytest.fixture(scope="module")
def summary():
    return summarize(MAIN + CONTROL, baseline_mean_tokens=788)


# x = budgets [100, 100, 200, 400], y = lengths [100, 120, 150, 600]: means 200 and 242.5,
# Sxy = 100*142.5 + 100*122.5 + 0 + 200*357.5 = 98000, Sxx = 60000, Syy = 171675.
SLOPE = 98000 / 60000
PEARSON = 98000 / math.sqrt(60000 * 171675)
# Control: x = prefills [50, 100, 200], y = [50, 150, 220]: Sxy = 37500/3, Sxx = 105000/9.
CONTROL_SLOPE = 15 / 14


@pytest.mark.parametrize(
    "key, expected",
    [
        ("n", 5),
        ("n_control", 4),
        ("accuracy", 3 / 5),
        ("mean_tokens", (100 + 120 + 150 + 600 + 1000) / 5),
        ("median_tokens", 150),
        ("compression", 1 - 394 / 788),
        ("n_budgeted", 4),
        ("within_10", 1 / 4),
        ("within_20", 2 / 4),
        ("within_50", 4 / 4),
        ("mean_relative_error", (0 + 0.2 - 0.25 + 0.5) / 4),
        ("length_budget_slope", SLOPE),
        ("length_budget_pearson", PEARSON),
        ("spearman_budget_difficulty", 1.0),  # difficulties [1, 1, 2, 3] and budgets rank the same
        ("control_slope", CONTROL_SLOPE),
        ("control_within_20", 2 / 3),  # 50 of 50 and 220 of 200 yes, 150 of 100 no; the broken one is out
        ("format_failure_rate", 1 / 5),
        ("grading_failures", 2),  # one main, one control
    ],
)
def test_summary_values(summary, key, expected):
    assert summary[key] == pytest.approx(expected)


def test_relative_error_quantiles(summary):
    q = summary["relative_error_quantiles"]
    # sorted errors [-0.25, 0, 0.2, 0.5], linear interpolation: the median is 0.1, q25 is -0.25 + 0.75*0.25
    assert q["q50"] == pytest.approx(0.1)
    assert q["q25"] == pytest.approx(-0.0625)
    assert q["q05"] >= -0.25 and q["q95"] <= 0.5


def test_control_table(summary):
    low, high = summary["control"]
    assert low == pytest.approx(
        {
            "multiplier": 0.5,
            "n": 2,
            "mean_budget": 75,
            "mean_length": 100,
            "length_over_estimate": (50 / 100 + 150 / 200) / 2,  # own estimates 100 and 200
            "within_20": 0.5,
            "accuracy": 0.5,
            "format_ok_rate": 1.0,
        }
    )
    assert high == pytest.approx(
        {
            "multiplier": 2.0,
            "n": 2,
            "mean_budget": 300,
            "mean_length": 560,
            "length_over_estimate": 220 / 100,  # the broken response has no length to compare
            "within_20": 1.0,
            "accuracy": 0.5,
            "format_ok_rate": 0.5,
        }
    )


def test_format_failure_examples(summary):
    failures = summary["format_failures"]
    assert list(failures) == ["missing_budget"]  # the control run's failure is not a main-run failure
    [example] = failures["missing_budget"]["examples"]
    assert failures["missing_budget"]["count"] == 1
    assert example["id"] == "r5"
    assert len(example["response"]) < 400


def test_format_failure_examples_are_capped():
    records = [rec(str(i), None, 10, False, format_error="late_budget") for i in range(8)]
    records.append(rec("z", None, 10, False, format_error="budget_over_cap"))
    failures = metrics.format_failures(records)
    assert list(failures) == ["late_budget", "budget_over_cap"]  # most frequent first
    assert failures["late_budget"]["count"] == 8
    assert len(failures["late_budget"]["examples"]) == metrics.FAILURE_EXAMPLES


def test_summary_is_plain_json(summary):
    text = json.dumps(summary, allow_nan=False)

    def plain(value):
        if isinstance(value, dict):
            return all(plain(v) for v in value.values())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or type(value) in (bool, int, float, str)

    assert plain(json.loads(text)) and plain(summary)


def test_only_non_control_records_count_for_the_main_metrics():
    assert summarize(MAIN)["accuracy"] == summarize(MAIN + CONTROL)["accuracy"]
    assert summarize(MAIN)["control"] == []
    assert summarize(MAIN)["control_slope"] is None


def test_empty_and_budgetless_runs():
    empty = summarize([])
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["mean_tokens"] is None
    assert empty["within_20"] is None and empty["relative_error_quantiles"] == {}
    # A base model never writes budgets: adherence metrics are None, accuracy and length are not.
    base = summarize([rec(str(i), None, 100 * (i + 1), i % 2 == 0, format_error="missing_budget") for i in range(4)])
    assert base["accuracy"] == 0.5 and base["mean_tokens"] == 250
    assert base["format_failure_rate"] == 1.0
    for key in ("within_10", "length_budget_slope", "length_budget_pearson", "spearman_budget_difficulty"):
        assert base[key] is None, key
    json.dumps(empty, allow_nan=False)
    json.dumps(base, allow_nan=False)


@pytest.mark.parametrize(
    "mean, baseline, expected",
    [
        (394, 788, 0.5),
        (1232, 2865, 1 - 1232 / 2865),  # the paper's GSM8K, 1.5B
        (100, 100, 0.0),
        (150, 100, -0.5),  # longer than the baseline
        (10, None, None),
        (None, 10, None),
        (10, 0, None),
    ],
)
def test_compression(mean, baseline, expected):
    result = compression(mean, baseline)
    assert result == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    "x, y, slope, pearson",
    [
        ([1, 2, 3], [2, 4, 6], 2.0, 1.0),
        ([1, 2, 3], [6, 4, 2], -2.0, -1.0),
        ([1, 2, 3], [5, 5, 5], 0.0, None),  # a flat line has a slope but no correlation
        ([5, 5, 5], [1, 2, 3], None, None),  # one distinct budget: no fit
        ([7], [7], None, None),
        ([], [], None, None),
    ],
)
def test_linear_fit(x, y, slope, pearson):
    got_slope, got_pearson = linear_fit(x, y)
    assert got_slope == (None if slope is None else pytest.approx(slope))
    assert got_pearson == (None if pearson is None else pytest.approx(pearson))


@pytest.mark.parametrize(
    "pairs, expected",
    [
        ([(1, 100), (2, 200), (3, 300)], 1.0),
        ([(1, 300), (2, 200), (3, 100)], -1.0),
        ([(1, 100), (2, 300), (3, 200)], 0.5),  # ranks (1,2,3) vs (1,3,2): 1 - 6*2/(3*8)
        ([(1, 100), (1, 200)], None),  # one difficulty level
        ([(1, 100), (2, 100)], None),  # one budget
        ([(None, 100), (2, 200)], None),  # unknown difficulty is left out
    ],
)
def test_spearman_budget_difficulty(pairs, expected):
    records = [rec(str(i), b, b, difficulty=d) for i, (d, b) in enumerate(pairs)]
    result = spearman_budget_difficulty(records)
    assert result == (None if expected is None else pytest.approx(expected))


def test_within_counts_the_boundary_in():
    records = [rec("a", 100, 110), rec("b", 100, 90), rec("c", 100, 111), rec("d", 10, 8)]
    assert metrics.within(records, 10) == pytest.approx(2 / 4)
    assert metrics.within(records, 20) == pytest.approx(4 / 4)


def test_importing_metrics_does_not_import_torch():
    code = "import sys, selfbudgeter.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_filler_share_counts_only_records_that_measured_it():
    records = [
        {**rec("a", 100, 100, True), "filler_tokens": 60},
        {**rec("b", 50, 50, True), "filler_tokens": 0},
        {**rec("c", 80, 90, False), "filler_tokens": None},  # a broken response: no solution to split
        rec("d", 70, 70, True),  # another dataset: not measured
    ]
    summary = summarize(records)
    assert summary["mean_filler_tokens"] == 30
    assert summary["filler_share"] == pytest.approx(60 / 150)
    assert summarize(MAIN)["filler_share"] is None and summarize(MAIN)["mean_filler_tokens"] is None
