"""Checks of the experiment scripts' own arithmetic. Not part of `make test` (its testpaths are tests/):

    .venv/bin/python -m pytest -q experiments/test_experiments.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from selfbudgeter.embedded import task
from selfbudgeter.core.format import render_response

HERE = Path(__file__).resolve().parent
_PROBLEM = task.Problem(3, (("+", 4), ("-", 5), ("+", 6)))


def script(name: str) -> ModuleType:
    """`experiments/NAME.py` imported as module NAME (the scripts are not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up in sys.modules while the class is created
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.parametrize(
    "response, kind",
    [
        # budget format: the first step shares its line with the tags and must still be read as step 1
        (render_response(30, "1) 3+4=7\n2) 7-5=3\n3) 3+6=9\nSo the answer is \\boxed{9}."), "arithmetic"),
        (render_response(30, "1) 3+4=7\n2) 7-6=1\n3) 1+6=7\nSo the answer is \\boxed{7}."), "operand"),
        (render_response(30, "1) 3+4=7\n2) 7-5=2\n3) 2+6=8\nSo the answer is \\boxed{6}."), "final answer"),
        ("1) 3+4=7\n2) 8-5=3\n3) 3+6=9\nSo the answer is \\boxed{9}.", "carry"),  # no tags (a base model)
        ("<budget>30</budget><solution>1) 3+4=7\nSo the answer", "broken format"),
    ],
)
def test_embedded_errors_reads_the_solution_inside_the_tags(response, kind):
    assert script("embedded_errors").error_kind(_PROBLEM.question(), response) == kind


def test_budget_misses_separates_filler_that_follows_the_budget_from_filler_that_does_not():
    summary = script("budget_misses").summary
    # Needed steps are 20 tokens; each budget leaves a slack of 0, 10 or 20 tokens.
    budgets = [20, 30, 40] * 2
    follows = [{"budget": b, "length": b, "filler_tokens": b - 20} for b in budgets]
    ignores = [{"budget": b, "length": 30, "filler_tokens": 10} for b in budgets[:3]]
    ignores += [{"budget": b, "length": 20 + f, "filler_tokens": f} for b, f in zip(budgets[3:], (20, 10, 0))]
    planned, unplanned = summary(follows), summary(ignores)
    assert planned["within ±20%"] == 1.0 and planned["slope"] == pytest.approx(1.0)
    assert planned["filler~slack r"] == pytest.approx(1.0)
    assert unplanned["slope"] < 0 and unplanned["filler~slack r"] < 0
    # 30 and 40 tokens written to a budget of 20 are over it; 30 and 20 written to a budget of 40 are under it
    assert (unplanned["under"], unplanned["over"]) == (2, 2) and unplanned["within ±20%"] == pytest.approx(2 / 6)
    assert unplanned["needed"] == pytest.approx(20.0) and unplanned["filler"] == pytest.approx(10.0)


def test_targets_check_each_bound_in_its_direction():
    targets = script("targets")
    base = {"accuracy": 0.96, "mean_tokens": 160.0, "n": 1600}
    model = {"accuracy": 0.951, "mean_tokens": 64.0, "within_20": 0.9, "spearman_budget_difficulty": 0.79, "n": 1600}
    checked = targets.check(base, model)
    assert checked["length vs base"] == (pytest.approx(0.4), True)  # at the bound: met
    assert checked["accuracy - base"][1] is True  # 0.9 points under the base: met
    at_bound = {**base, "accuracy": 391 / 400}
    assert targets.check(at_bound, {**model, "accuracy": 387 / 400})["accuracy - base"][1] is True
    assert checked["within ±20%"][1] is True and checked["Spearman budget~difficulty"][1] is False
    worse = {**model, "accuracy": 0.949, "mean_tokens": 64.2, "within_20": None}
    assert [met for _, met in targets.check(base, worse).values()] == [False, False, False, False]
    lines = targets.table({"pooled": (base, worse)}).splitlines()
    assert lines[2].startswith("| pooled | 1600 | 96.00% | 94.90% |") and lines[2].count("NOT met") == 4


def test_own_spread_rows_keep_the_shortest_median_and_longest_correct_answer(tmp_path):
    import json

    from selfbudgeter.embedded.model import BASE_MODEL_DIR
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BASE_MODEL_DIR)
    steps = task.render(_PROBLEM, task.stepwise_plan(_PROBLEM))
    texts = [task.minimal_solution(_PROBLEM), steps, steps + "\nThat seems right.",
             steps + "\nThat seems right.\nHmm, is that correct?"]
    samples = [{"id": "q", "response": t, "correct": True} for t in texts]
    samples += [{"id": "q", "response": "1-3) 3+4-5+6=9\nSo the answer is \\boxed{9}.", "correct": False},
                {"id": "q", "response": steps, "correct": True}]  # a duplicate counts once
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (tmp_path / "questions.jsonl").write_text(json.dumps({"id": "q", "question": _PROBLEM.question()}) + "\n")
    rows = script("following_capacity").own_spread_rows(tok, tmp_path)
    kept = [row["completion"] for row in rows]
    assert [render_response(row["budget"], t) for row, t in zip(rows, (texts[0], texts[2], texts[3]))] == kept
    assert rows[0]["budget"] < rows[1]["budget"] < rows[2]["budget"]


def test_without_filler_keeps_the_first_pass_checks_repair_and_answer():
    steps = task.render(_PROBLEM, task.Plan(chunks=(2, 1), checks=1, preamble="Okay, let me work slowly."))
    noisy = steps.replace("Check 1)", "Hmm, is that correct?\nCheck 1)").replace("So the", "That seems right.\nSo the")
    clean = script("following_capacity").without_filler(noisy)
    assert clean == task.render(_PROBLEM, task.Plan(chunks=(2, 1), checks=1))
    assert "Hmm" not in clean and "Okay" not in clean and clean.endswith("\\boxed{8}.")


@pytest.mark.parametrize(
    "response, want",
    [
        ("1) 3+4=7\n2) 7-5=2\n3) 2+6=8\nCheck 1) 3+4=7\nCheck 2) 7-5=2\nCheck 3) 2+6=8", (3, 0)),
        # a check that copies another step's operation ("Check 3) 2-5=..." is step 2's) and a step out of range
        ("1-3) 3+4-5+6=8\nCheck 1) 3+4=7\nCheck 3) 2-5=-3\nCheck 4) 8+1=9", (3, 2)),
        # each line checked right below it (`task.Plan.check_each_line`), the second check wrong
        ("1) 3+4=7\nCheck 1) 3+4=7\n2) 7-5=2\nCheck 2) 7-5=3", (2, 1)),
        ("1) 3+4=7\n2) 7-5=2\n3) 2+6=8", (0, 0)),
    ],
)
def test_strategy_accuracy_counts_wrong_check_lines(response, want):
    assert script("strategy_accuracy").check_lines(_PROBLEM, response) == want


def test_strategy_accuracy_names_the_way_of_solving():
    way = script("strategy_accuracy").way
    assert way("1) 3+4=7\n2) 7-5=2\n3) 2+6=8\nSo the answer is \\boxed{8}.") == ("one per line", "unchecked")
    assert way("1-2) 3+4-5=2\n3) 2+6=8\nCheck 1) 3+4=7\nSo the answer is \\boxed{8}.") == ("combined", "checked")
