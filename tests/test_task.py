"""The embedded task: deterministic splits, difficulty labels, traces that grade correct, filler split."""

import random

import pytest

from selfbudgeter.embedded import task
from selfbudgeter.core.grading import is_correct


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
    # the reference solution is the minimal one: the whole chain on one line, then the answer
    assert row.solution.splitlines()[0].startswith("1) " if row.difficulty == 1 else f"1-{row.difficulty}) ")
    assert len(row.solution.splitlines()) == 2


def test_wording_varies_and_parses_back():
    rng = random.Random(0)
    problems = [task.sample_problem(rng, rng.randint(1, 8)) for _ in range(400)]
    questions = [p.question() for p in problems]
    assert len({q.split(".")[0].split(" ")[0] for q in questions}) >= 5  # several openings
    assert len({p.noun for p in problems}) >= 100  # listed and made-up object words
    for p, q in zip(problems, questions):
        back = task.parse_question(q)
        assert (back.start, back.ops, back.noun) == (p.start, p.ops, p.noun)


def test_unseen_objects_are_never_used():
    words = {task.parse_question(r.question).noun for s in task.SPLITS for r in task.load_split(s)}
    assert not words & set(task.UNSEEN_OBJECTS)
    rows = task.reworded(task.load_split("test")[:40])
    assert {task.parse_question(r.question).noun for r in rows} <= set(task.UNSEEN_OBJECTS)
    assert [r.answer for r in rows] == [r.answer for r in task.load_split("test")[:40]]


@pytest.mark.parametrize("seed", range(30))
def test_traces_are_correct_and_their_first_pass_is_right_unless_it_slipped(seed):
    rng = random.Random(seed)
    problem = task.sample_problem(rng, 1 + seed % 8)
    trace = task.render_trace(problem, rng)
    assert is_correct(trace, str(problem.answer))
    slipped = "Wait, the check gives" in trace
    assert task.first_error(problem, trace) == ("arithmetic" if slipped else None)


def test_plans_trade_length_for_granularity(embedded_tokenizer):
    """Direct < chunked < stepwise < verified, in tokens, for a long chain; every plan answers correctly."""
    problem = task.sample_problem(random.Random(3), 8)
    plans = [task.minimal_plan(problem), task.Plan(task.random_chunks(random.Random(0), 8, 3)),
             task.stepwise_plan(problem), task.Plan((1,) * 8, checks=1)]
    texts = [task.render(problem, plan) for plan in plans]
    lengths = [len(embedded_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert lengths == sorted(lengths) and len(set(lengths)) == 4
    assert all(is_correct(t, str(problem.answer)) for t in texts)
    assert lengths[-1] >= 2 * lengths[0]


def test_a_slip_is_repaired_by_the_verification_pass():
    problem = task.Problem(3, (("+", 4), ("-", 5), ("+", 6)))
    text = task.render(problem, task.Plan((3,), checks=1), random.Random(0), slip=True)
    first = text.splitlines()[0]
    assert first.startswith("1-3) 3+4-5+6=") and not first.endswith("=8")
    assert text.endswith("\\boxed{8}.")
    with pytest.raises(ValueError):
        task.render(problem, task.stepwise_plan(problem), slip=True)


def test_a_plan_can_check_each_line_right_after_it():
    """A check then reads its operations from the line above it, not from a line far up the chain."""
    problem = task.Problem(3, (("+", 4), ("-", 5), ("+", 6)))
    assert task.render(problem, task.Plan((2, 1), checks=1)).splitlines()[2] == "Check 1) 3+4=7"  # after the pass
    text = task.render(problem, task.Plan((2, 1), checks=1, check_each_line=True))
    assert text.splitlines() == ["1-2) 3+4-5=2", "Check 1) 3+4=7", "Check 2) 7-5=2", "3) 2+6=8", "Check 3) 2+6=8",
                                 "So the answer is \\boxed{8}."]
    twice = task.render(problem, task.Plan((1, 1, 1), checks=2, check_each_line=True)).splitlines()
    assert twice[:3] == ["1) 3+4=7", "Check 1) 3+4=7", "Check 1) 3+4=7"]
    slipped = task.render(problem, task.Plan((1, 2), checks=1, check_each_line=True), random.Random(0), slip=True)
    assert slipped.splitlines()[2].startswith("2-3) 7-5+6=") and not slipped.splitlines()[2].endswith("=8")
    assert slipped.splitlines()[3:6] == ["Check 2) 7-5=2", "Check 3) 2+6=8", "Wait, the check gives 8, not " +
                                         slipped.splitlines()[2].split("=")[-1] + "."]
    assert slipped.endswith("\\boxed{8}.")


def test_base_traces_overthink_easy_questions(embedded_tokenizer):
    """The base model's habits: on 1-3 step questions its traces average >= 2.5x the minimal solution."""
    rng = random.Random(0)
    ratios = []
    for row in [r for r in task.load_split("train") if r.difficulty <= 3][:300]:
        problem = task.parse_question(row.question)
        n = lambda t: len(embedded_tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
        ratios.append(n(task.render_trace(problem, rng)) / n(row.solution))
    assert sum(ratios) / len(ratios) >= 2.5


def test_filler_amount_ignores_difficulty():
    rng = random.Random(0)
    mean_filler = {}
    for steps in (1, 8):
        rows = [r for r in task.load_split("train") if r.difficulty == steps][:300]
        sizes = [task._rough_tokens("\n".join(line for line in task.split_filler(
            task.render_trace(task.parse_question(r.question), rng))[1].splitlines() if "Check" not in line))
            for r in rows]
        mean_filler[steps] = sum(sizes) / len(sizes)
    assert mean_filler[8] == pytest.approx(mean_filler[1], rel=0.3)


@pytest.mark.parametrize("bad", ["", "What is 2+3?", "Start with 3 apples. What now?",
                                 "Start with 3 apples. 2) add 4. How many apples now?"])
def test_parse_question_rejects_other_text(bad):
    with pytest.raises(ValueError, match="not an embedded-task question"):
        task.parse_question(bad)


def test_filler_tokens_counts_only_extra_lines(embedded_tokenizer):
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
        ("1-3) 3+4-5+6=8\nSo the answer is \\boxed{8}.", None),
        ("1-2) 3+4-5=2\n3) 2+6=8\nSo the answer is \\boxed{8}.", None),
        ("1-3) 3+4-5+6=9\nSo the answer is \\boxed{9}.", "arithmetic"),
        ("1-2) 3+4-6=1\n3) 1+6=7\nSo the answer is \\boxed{7}.", "operand"),
    ],
)
def test_first_error_names_what_went_wrong_first(response, kind):
    assert task.first_error(_PROBLEM, response) == kind
    assert kind is None or kind in task.ERROR_KINDS


def test_train_base_takes_the_check_placement_of_its_traces(embedded_tokenizer):
    from selfbudgeter.embedded.model import make_parser, trace_dataset

    assert make_parser().parse_args([]).check_each_line is False
    assert make_parser().parse_args(["--check-each-line"]).check_each_line is True
    checked = 0
    for trace in trace_dataset(embedded_tokenizer, 40, seed=0, check_each_line=True)["completion"]:
        lines = trace.splitlines()
        if "Check 1) " in trace:  # the first check stands right below the first line of the first pass
            first = next(i for i, line in enumerate(lines) if line.startswith(("1) ", "1-")))
            assert lines[first + 1].startswith("Check 1) ")
            checked += 1
    assert checked > 0
