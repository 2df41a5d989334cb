"""The word-problem task: deterministic disjoint splits, answers recomputed from the question text, difficulty
labels, varied phrasing, non-negative answers, and the dataset name `word-problems`."""

import re

import pytest

from selfbudgeter.core.grading import is_correct
from selfbudgeter.data import Row, TASKS, load_benchmark
from selfbudgeter.data import word_problems as wp

SPLITS = ("train", "validation", "test")

# Read independently of the generator's templates: how each sentence of a question changes the count.
_OPENING = re.compile(r"^(?:\w+ (?:has|owns|starts the day with)|There are) (\d+) ")
_OPERATIONS = [
    (re.compile(r"\b(?:buys|finds) (\d+) more\b"), lambda v, k: v + k),
    (re.compile(r"\bgets (\d+) more from a friend\b"), lambda v, k: v + k),
    (re.compile(r"\bA friend gives (?:him|her) (\d+) more\b"), lambda v, k: v + k),
    (re.compile(r"\bpicks up another (\d+)\b"), lambda v, k: v + k),
    (re.compile(r"\bgives (\d+) to a friend\b"), lambda v, k: v - k),
    (re.compile(r"\b(?:loses|sells|uses up) (\d+)\b"), lambda v, k: v - k),
    (re.compile(r"\b(?:doubles?)\b()"), lambda v, _: v * 2),
    (re.compile(r"\b(?:triples?)\b()"), lambda v, _: v * 3),
]


def recompute(question: str) -> tuple[int, int]:
    """(answer, number of operations) of a question, read from its text."""
    value = int(_OPENING.match(question).group(1))
    found = []
    for pattern, apply in _OPERATIONS:
        for match in pattern.finditer(question):
            found.append((match.start(), apply, int(match.group(1) or 0)))
    for _, apply, k in sorted(found, key=lambda item: item[0]):
        value = apply(value, k)
    return value, len(found)


def all_rows():
    return {split: wp.load_split(split) for split in SPLITS}


def test_splits_are_deterministic():
    first = {s: [r.to_dict() for r in rows] for s, rows in all_rows().items()}
    wp._cached.cache_clear()
    wp.split_problems.cache_clear()
    again = {s: [r.to_dict() for r in rows] for s, rows in all_rows().items()}
    assert first == again
    assert [len(first[s]) for s in SPLITS] == [size for size, _ in wp.SPLITS.values()]
    assert first["test"][0]["id"] == "word-problems-test-0"


def test_splits_share_no_question_and_no_multi_step_problem():
    problems = {s: wp.split_problems(s) for s in SPLITS}
    questions = {s: {p.question() for p in ps} for s, ps in problems.items()}
    for s in SPLITS:
        assert len(questions[s]) == len(problems[s])  # no question twice within a split either
    assert not questions["train"] & questions["validation"]
    assert not questions["train"] & questions["test"]
    assert not questions["validation"] & questions["test"]
    multi = {s: {(p.start, p.ops) for p in ps if p.steps >= 2} for s, ps in problems.items()}
    assert not multi["train"] & (multi["validation"] | multi["test"])
    assert not multi["validation"] & multi["test"]


@pytest.mark.parametrize("split", SPLITS)
def test_answers_recomputed_from_the_text_and_difficulty_is_the_number_of_operations(split):
    for row in wp.load_split(split):
        answer, operations = recompute(row.question)
        assert row.answer == str(answer), row.question
        assert row.difficulty == operations, row.question
        assert int(row.answer) >= 0
        assert row.source == "word-problems"


@pytest.mark.parametrize("split", SPLITS)
def test_difficulty_levels_are_balanced(split):
    levels = [row.difficulty for row in wp.load_split(split)]
    assert sorted(set(levels)) == [1, 2, 3]
    assert levels.count(1) == levels.count(2) == levels.count(3)


def test_solutions_are_worked_and_grade_correct():
    for row in wp.load_split("test"):
        *lines, last = row.solution.splitlines()
        assert len(lines) == row.difficulty
        previous = None
        for line in lines:
            a, op, k, result = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)", line).groups()
            assert previous is None or int(a) == previous
            assert int(result) == {"+": int(a) + int(k), "-": int(a) - int(k), "*": int(a) * int(k)}[op]
            previous = int(result)
        assert str(previous) == row.answer
        assert is_correct(row.solution, row.answer)


def test_numbers_stay_small_and_non_negative():
    for rows in all_rows().values():
        for row in rows:
            numbers = [int(n) for n in re.findall(r"\d+", row.question)]
            assert numbers[0] <= 20 and all(0 < n <= 60 for n in numbers)
            assert 0 <= int(row.answer) <= 60


def test_phrasings_are_varied():
    rows = wp.load_split("test")
    openings = {re.sub(r" \d+ .*", "", r.question.split(" ", 1)[1]) for r in rows}
    assert openings >= {"has", "owns", "starts the day with", "are"}
    for ending in ("have now?", "end up with?", "in the end?", "What is the number of"):
        assert any(ending in r.question for r in rows), ending
    for pattern, _ in _OPERATIONS:
        assert any(pattern.search(r.question) for r in rows), pattern.pattern
    assert any(" and " in r.question.split(". ")[0] for r in rows)  # "Tom has 6 apples and buys 6 more."
    assert len({r.question.split()[0] for r in rows}) >= 8
    nouns = {noun for r in rows for noun in re.findall(r"How many ([a-z ]+?) does", r.question)}
    assert len(nouns) >= 10


def test_loads_as_the_dataset_word_problems():
    assert "word-problems" in TASKS
    rows = load_benchmark("word-problems", "validation")
    assert rows == wp.load_split("validation")
    assert all(isinstance(r, Row) for r in rows)
    assert load_benchmark("word-problems", "test", limit=5) == wp.load_split("test")[:5]


def test_unknown_split_is_refused():
    with pytest.raises(ValueError):
        wp.load_split("dev")
