"""The embedded task: deterministic splits, difficulty labels, traces that grade correct, filler split."""

import random

import pytest

from conftest import benchmark_script
from selfbudgeter import task
from selfbudgeter.format import render_response
from selfbudgeter.grading import is_correct


def test_splits_are_deterministic_and_disjoint():
    task._cached.cache_clear()
    first = {s: [r.to_dict() for r in task.load_split(s)] for s in task.SPLITS}
    task._cached.cache_clear()
    again = {s: [r.to_dict() for r in task.load_split(s)] for s in task.SPLITS}
    assert first == again
    questions = {s: {r["question"] for r in rows} for s, rows in first.items()}
    assert not questions["train"] & (questions["test"] | questions["validation"])
    assert [len(first[s]) for s in task.SPLITS] == [size for size, _ in task.SPLITS.values()]


@pytest.mark.parametrize("split", ["validation", "test"])
def test_held_out_difficulty_is_balanced(split):
    levels = [r.difficulty for r in task.load_split(split)]
    assert sorted(set(levels)) == list(range(task.MIN_STEPS, task.MAX_STEPS + 1))
    assert len(set(levels.count(d) for d in set(levels))) == 1


@pytest.mark.parametrize("row", task.load_split("test")[::37])
def test_rows_agree_with_their_problem(row):
    problem = task.parse_question(row.question)
    assert problem.steps == row.difficulty
    assert str(problem.answer) == row.answer
    assert all(0 <= v <= 9 for v in problem.values())
    assert is_correct(row.solution, row.answer)
    # the minimal solution grows with the difficulty: one line per step, plus the answer
    assert len(row.solution.splitlines()) == row.difficulty + 1


@pytest.mark.parametrize("seed", range(20))
def test_traces_are_correct_and_filler_splits_off(seed):
    row = task.load_split("test")[seed * 19]
    problem = task.parse_question(row.question)
    trace = task.render_trace(problem, random.Random(seed), filler_tokens=1 + seed)
    assert is_correct(trace, row.answer)
    essential, filler = task.split_filler(trace)
    assert filler  # a trace with a filler budget overthinks
    if "not" not in trace:  # no slip: what remains is exactly the minimal solution
        assert essential == task.minimal_solution(problem)


def test_filler_amount_ignores_difficulty():
    rng = random.Random(0)
    mean_filler = {}
    for steps in (1, 8):
        rows = [r for r in task.load_split("train") if r.difficulty == steps][:200]
        sizes = [len(task.split_filler(task.render_trace(task.parse_question(r.question), rng))[1]) for r in rows]
        mean_filler[steps] = sum(sizes) / len(sizes)
    assert mean_filler[8] == pytest.approx(mean_filler[1], rel=0.25)


def test_filler_amount_ranges_from_none_to_a_lot():
    rng = random.Random(0)
    problem = task.parse_question(task.load_split("test")[5].question)
    sizes = [task._rough_tokens(task.split_filler(task.render_trace(problem, rng))[1]) for _ in range(400)]
    assert min(sizes) <= 10 and max(sizes) >= task.FILLER_TOKENS[1] - 5
    assert task.render_trace(problem, rng, filler_tokens=0).count("Check step") == 0


@pytest.mark.parametrize("bad", ["", "What is 2+3?", "Start with 3 apples. What now?"])
def test_parse_question_rejects_other_text(bad):
    with pytest.raises(ValueError, match="not an embedded-task question"):
        task.parse_question(bad)


def test_filler_tokens_counts_only_filler_lines(embedded_tokenizer):
    problem = task.parse_question(task.load_split("test")[7].question)
    minimal = task.minimal_solution(problem)
    assert task.filler_tokens(embedded_tokenizer, minimal) == 0
    steps, answer = minimal.rsplit("\n", 1)
    padded = f"{steps}\nHmm, is that correct?\n{answer}"
    assert task.filler_tokens(embedded_tokenizer, padded) == len(
        embedded_tokenizer("Hmm, is that correct?", add_special_tokens=False)["input_ids"]
    )


# Start with 3: +4 -> 7, -5 -> 2, +6 -> 8.
_PROBLEM = task.Problem(3, (("+", 4), ("-", 5), ("+", 6)))


@pytest.mark.parametrize(
    "response, kind",
    [
        ("1) 3+4=7\n2) 7-5=2\n3) 2+6=8\nSo the answer is \\boxed{8}.", None),
        ("1) 3+4=7\n2) 7-6=1\n3) 1+6=7\nSo the answer is \\boxed{7}.", "operand"),  # step 3's operand in step 2
        ("1) 3+4=7\n2) 7+5=12\n3) 2+6=8\nSo the answer is \\boxed{8}.", "operand"),  # + for subtract
        ("1) 3+4=7\n2) 8-5=3\n3) 3+6=9\nSo the answer is \\boxed{9}.", "carry"),
        ("1) 3+4=7\n2) 7-5=3\n3) 3+6=9\nSo the answer is \\boxed{9}.", "arithmetic"),
        ("1) 3+4=7\n2) 7-5=2\nSo the answer is \\boxed{2}.", "missing step"),
        ("1) 3+4=7\n2) 7-5=2\n3) 2+6=8\nSo the answer is \\boxed{6}.", "final answer"),
        ("1) 3+4=7\n2) 7-5=2\n3) 2+6=8\nno box", "final answer"),
        ("", "missing step"),
    ],
)
def test_first_error_names_what_went_wrong_first(response, kind):
    assert task.first_error(_PROBLEM, response) == kind
    assert kind is None or kind in task.ERROR_KINDS


def test_first_error_of_rendered_traces():
    """A trace without a slip has no error; one with a slip starts with an arithmetic error it repairs."""
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        problem = task.sample_problem(rng, rng.randint(task.SLIP_MIN_STEPS, task.MAX_STEPS))
        trace = task.render_trace(problem, rng)
        kind = task.first_error(problem, trace)
        assert kind == (None if "Wait, let me check step" not in trace else "arithmetic")
        seen.add(kind)
    assert seen == {None, "arithmetic"}


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
    assert benchmark_script("embedded_errors").error_kind(_PROBLEM.question(), response) == kind


def test_budget_misses_separates_filler_that_follows_the_budget_from_filler_that_does_not():
    summary = benchmark_script("budget_misses").summary
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
    targets = benchmark_script("targets")
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
