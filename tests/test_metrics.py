"""Metric tests on hand-made records whose expected values are worked out by hand in the comments.

Run: .venv/bin/python -m pytest -q tests/test_metrics.py
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from selfbudgeter.core import metrics
from selfbudgeter.core.metrics import compression, linear_fit, spearman_budget_difficulty, summarize


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
    **extra,
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
        **extra,
    }


MAIN = [
    rec("r1", 100, 100, True, difficulty=1),  # relative error 0
    rec("r2", 100, 120, True, difficulty=1),  # +0.2: on the 20% boundary
    rec("r3", 200, 150, False, difficulty=2, grading_error="timeout"),  # -0.25
    rec("r4", 400, 600, True, difficulty=3, finish_reason="stop"),  # +0.5
    rec("r5", None, 1000, False, difficulty=3, format_error="missing_budget", response="x" * 400,
        finish_reason="length"),
]
# Own estimates 100 (question a, difficulty 1) and 200 (question b, difficulty 3), prefilled at 0.5x and 2x.
CONTROL = [
    rec("a", None, 50, True, multiplier=0.5, prefill=50, difficulty=1),
    rec("b", None, 150, False, multiplier=0.5, prefill=100, difficulty=3),
    rec("a", None, 220, True, multiplier=2.0, prefill=200, difficulty=1),
    rec("b", None, 900, False, multiplier=2.0, prefill=400, difficulty=3, format_error="unclosed_solution",
        grading_error="x"),
]


@pytest.fixture(scope="module")
def summary():
    return summarize(MAIN + CONTROL, baseline_mean_tokens=788)


# x = budgets [100, 100, 200, 400], y = lengths [100, 120, 150, 600]: means 200 and 242.5,
# Sxy = 100*142.5 + 100*122.5 + 0 + 200*357.5 = 98000, Sxx = 60000, Syy = 171675.
SLOPE = 98000 / 60000
PEARSON = 98000 / math.sqrt(60000 * 171675)
# Control: question a alone has two well-formed budgets, 50 -> 50 and 200 -> 220 (b's second one is broken).
CONTROL_SLOPE = math.log(220 / 50) / math.log(200 / 50)


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
        ("control_within_20", 2 / 4),  # 50 of 50 and 220 of 200 yes, 150 of 100 no, the broken one a miss
        ("format_failure_rate", 1 / 5),
        ("cut_rate", 1 / 2),  # of the two records that say how they ended, r5 ran to the cap
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
            "n_reachable": 2,
            "within_20": 0.5,
            "accuracy": 0.5,
            "accuracy_hard": 0.0,  # the hardest third of two questions is b
            "format_ok_rate": 1.0,
            "forced_rate": 0.0,
        }
    )
    assert high == pytest.approx(
        {
            "multiplier": 2.0,
            "n": 2,
            "mean_budget": 300,
            "mean_length": 560,
            "length_over_estimate": 220 / 100,  # the broken response has no length to compare
            "n_reachable": 2,
            "within_20": 0.5,  # a broken response does not meet the user's budget
            "accuracy": 0.5,
            "accuracy_hard": 0.0,
            "format_ok_rate": 0.5,
            "forced_rate": 0.0,
        }
    )
    assert summary["control_accuracy"] == [
        {key: row[key] for key in ("multiplier", "accuracy", "accuracy_hard", "mean_length", "within_20")}
        for row in (low, high)
    ]


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


@pytest.mark.parametrize(
    "length, budget, tolerance, inside",
    [
        (100, 100, 0.2, True),
        (120, 100, 0.2, True),  # the boundaries are inside
        (80, 100, 0.2, True),
        (121, 100, 0.2, False),
        (79, 100, 0.2, False),
        (12, 10, 0.2, True),
        (7, 5, 0.2, False),
        (110, 100, 0.1, True),
        (111, 100, 0.1, False),
        (150, 100, 0.5, True),
    ],
)
def test_within_tolerance_is_the_one_test_of_keeping_a_budget(length, budget, tolerance, inside):
    assert metrics.within_tolerance(length, budget, tolerance) is inside
    control = {"format_ok": True, "length": length, "prefill_budget": budget, "control_multiplier": 1.0}
    if tolerance == metrics.TOLERANCE:
        assert metrics.met_budget(control) is inside
        assert metrics.within([rec("q", budget, length)], 100 * tolerance) == float(inside)


def test_within_counts_the_boundary_in():
    records = [rec("a", 100, 110), rec("b", 100, 90), rec("c", 100, 111), rec("d", 10, 8)]
    assert metrics.within(records, 10) == pytest.approx(2 / 4)
    assert metrics.within(records, 20) == pytest.approx(4 / 4)


def test_importing_metrics_does_not_import_torch_or_scipy():
    # Light enough for the reward's training logs to call `within_tolerance`.
    code = "import sys, selfbudgeter.core.metrics; sys.exit('torch' in sys.modules or 'scipy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_task_measured_part_counts_only_records_that_measured_it():
    records = [
        {**rec("a", 100, 100, True), "filler_tokens": 60},
        {**rec("b", 50, 50, True), "filler_tokens": 0},
        {**rec("c", 80, 90, False), "filler_tokens": None},  # a broken response: no solution to split
        rec("d", 70, 70, True),  # another dataset: not measured
    ]
    summary = summarize(records)
    assert summary["mean_filler_tokens"] == 30
    assert summary["filler_share"] == pytest.approx(60 / 150)
    # Whatever part a task names gets the same two metrics; a dataset without a task has none.
    steps = summarize([{**r, "steps_tokens": r["length"] // 2} for r in MAIN])
    assert steps["steps_share"] == 0.5 and "filler_share" not in steps
    assert not {key for key in summarize(MAIN) if key.endswith("_share")}
    control = [{**rec("a", 100, 100, True, multiplier=1.0), "min_solution_tokens": 50}]
    assert "mean_min_solution_tokens" not in summarize(control)


# --- user control (METHOD.md, "User control, how we measure it") --------------------------------------------

MULTIPLIERS = (0.5, 0.75, 1.0, 1.5, 2.0)
# Own estimates of six questions, difficulty rising with them (as a model that sizes its effort would).
ESTIMATES = {"q1": 40, "q2": 60, "q3": 80, "q4": 120, "q5": 160, "q6": 240}


def control_run(length_of, *, correct_of=lambda qid, m: True, need=None, decoded_by=None, forced=False):
    """Control records of ESTIMATES at MULTIPLIERS: `length_of(estimate, budget)` is the length written."""
    records = []
    for k, (qid, estimate) in enumerate(ESTIMATES.items(), 1):
        for m in MULTIPLIERS:
            budget = round(m * estimate)
            extra = {"min_solution_tokens": None if need is None else need[qid]}
            if decoded_by is not None:
                extra.update(decoder=decoded_by, forced=forced)
            records.append(rec(qid, None, length_of(estimate, budget), correct_of(qid, m), multiplier=m,
                               prefill=budget, difficulty=k, **extra))
    return records


def test_a_model_that_ignores_the_budget_scores_slope_zero():
    ignores = control_run(lambda estimate, budget: estimate)  # writes its own length whatever the user says
    summary = summarize(ignores)
    assert summary["control_slope"] == pytest.approx(0.0, abs=1e-9)
    assert list(metrics.question_slopes(ignores).values()) == [pytest.approx(0.0, abs=1e-9)] * len(ESTIMATES)
    # Only the 1x budgets are met (0.75x and 1.5x are 25% and 33% away).
    assert summary["control_within_20"] == pytest.approx(1 / 5)
    # The pooled regression this replaces reads well above 0 here, from the spread of the estimates alone.
    pooled, _ = linear_fit([r["budget"] for r in ignores], [r["length"] for r in ignores])
    assert pooled > 0.3


@pytest.mark.parametrize("factor", [1.0, 0.9, 1.15])
def test_a_model_that_follows_the_budget_scores_slope_one(factor):
    follows = control_run(lambda estimate, budget: round(factor * budget))
    summary = summarize(follows)
    assert summary["control_slope"] == pytest.approx(1.0, abs=0.02)  # rounding to whole tokens only
    assert summary["control_within_20"] == 1.0
    assert [row["within_20"] for row in summary["control_accuracy"]] == [1.0] * len(MULTIPLIERS)


def test_half_following_scores_half_and_the_median_ignores_outliers():
    half = control_run(lambda estimate, budget: round(estimate * (budget / estimate) ** 0.5))
    assert summarize(half)["control_slope"] == pytest.approx(0.5, abs=0.02)
    # One question that overreacts wildly moves the median by at most one rank.
    wild = [r if r["id"] != "q1" else {**r, "length": r["prefill_budget"] ** 3} for r in half]
    assert summarize(wild)["control_slope"] == pytest.approx(0.5, abs=0.02)


def test_unreachable_budgets_are_left_out_of_the_share():
    # Every question needs 70 tokens at least; a budget below that is unreachable, and the model writes 70.
    need = dict.fromkeys(ESTIMATES, 70)
    follows = control_run(lambda estimate, budget: max(budget, 70), need=need)
    unreachable = [r for r in follows if r["prefill_budget"] < 70]
    assert unreachable and not any(metrics.met_budget(r) for r in unreachable if r["prefill_budget"] < 58)
    assert summarize(follows)["control_within_20"] == 1.0  # every reachable budget was met
    everything = [{**r, "min_solution_tokens": None} for r in follows]
    assert summarize(everything)["control_within_20"] < 1.0  # counting them in would blame the model
    rows = summarize(follows)["control"]
    assert [row["n_reachable"] for row in rows] == [
        sum(round(m * e) >= 70 for e in ESTIMATES.values()) for m in MULTIPLIERS
    ]


@pytest.mark.parametrize(
    "record, reachable",
    [
        ({"prefill_budget": 70, "min_solution_tokens": 70}, True),  # the boundary is reachable
        ({"prefill_budget": 69, "min_solution_tokens": 70}, False),
        ({"prefill_budget": 5, "min_solution_tokens": None}, True),  # no reference solution: count it
        ({"prefill_budget": 5}, True),
    ],
)
def test_reachable(record, reachable):
    assert metrics.reachable(record) is reachable


def test_accuracy_per_multiplier_and_on_the_hardest_third():
    # Easy questions are always right; the two hardest (q5, q6) only from 1.5x on.
    def correct(qid, m):
        return qid not in ("q5", "q6") or m >= 1.5

    rows = summarize(control_run(lambda e, b: b, correct_of=correct))["control_accuracy"]
    assert [row["multiplier"] for row in rows] == list(MULTIPLIERS)
    assert [row["accuracy"] for row in rows] == pytest.approx([4 / 6, 4 / 6, 4 / 6, 1.0, 1.0])
    assert [row["accuracy_hard"] for row in rows] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert [row["mean_length"] for row in rows] == pytest.approx(
        [sum(round(m * e) for e in ESTIMATES.values()) / 6 for m in MULTIPLIERS]
    )


@pytest.mark.parametrize(
    "difficulties, hard",
    [
        ({"a": 1, "b": 2, "c": 3}, {"c"}),
        ({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6}, {"e", "f"}),
        ({"a": 1, "b": 3, "c": 3, "d": 1, "e": 1, "f": 1}, {"b", "c"}),
        ({"a": 1, "b": 2, "c": 2, "d": 1}, {"b", "c"}),  # ties at the cut are all in
        ({"a": None, "b": None}, set()),
    ],
)
def test_hardest_questions(difficulties, hard):
    records = [rec(qid, 10, 10, difficulty=d) for qid, d in difficulties.items()]
    assert metrics.hardest_questions(records) == hard


def test_decoder_records_never_mix_into_the_model_alone_metrics():
    alone = control_run(lambda estimate, budget: estimate) + MAIN
    # A cap decoder makes every response fit the budget and forces an answer on the longer ones.
    capped = control_run(lambda estimate, budget: min(estimate, budget), decoded_by="cap", forced=True)
    capped += [{**r, "decoder": "cap", "forced": i % 2 == 0, "length": r["length"] // 2} for i, r in enumerate(MAIN)]
    both = summarize(alone + capped)
    shared = {"decoders", "grading_failures"}  # grading failures are counted over every record
    assert {k: v for k, v in both.items() if k not in shared} == {
        k: v for k, v in summarize(alone).items() if k not in shared
    }
    assert both["control_slope"] == pytest.approx(0.0, abs=1e-9)
    assert summarize(alone)["decoders"] == {}
    cap = both["decoders"]["cap"]
    assert cap["n"] == len(MAIN) and cap["n_control"] == len(ESTIMATES) * len(MULTIPLIERS)
    assert cap["forced_rate"] == pytest.approx(3 / 5)
    assert cap["mean_tokens"] == pytest.approx(sum(r["length"] // 2 for r in MAIN) / 5)
    assert 0.4 < cap["control_slope"] < 1.0  # below the estimate it follows, above it does not
    assert [row["forced_rate"] for row in cap["control"]] == [1.0] * len(MULTIPLIERS)
    assert [row["forced_rate"] for row in both["control"]] == [0.0] * len(MULTIPLIERS)
    assert metrics.by_decoder(capped + alone).keys() == {"model", "cap"}
    assert list(metrics.by_decoder(capped + alone)) == ["model", "cap"]  # the model alone first
