"""Answer extraction and grading. Run: .venv/bin/python -m pytest tests/test_grading.py"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from decimal import Decimal

import pytest

from selfbudgeter.core import grading
from selfbudgeter.core.grading import (
    Grade,
    GradingError,
    answers_match,
    extract_answer,
    grade,
    gsm8k_answer,
    is_correct,
    parse_number,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        # boxed: the last one wins, nested braces kept whole
        ("so \\boxed{5}", "5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{ \\left( 3, \\frac{\\pi}{2} \\right) }", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\fbox{7}", "7"),
        ("\\boxed{}", ""),
        # boxed beats the other forms wherever it is
        ("\\boxed{3}\n#### 4", "3"),
        ("The answer is 9. Check: \\boxed{8}", "8"),
        # unbalanced boxed: no answer rather than a truncated one (and no fallback to an earlier form)
        ("\\boxed{\\frac{1}{2}", None),
        # GSM8K
        ("She pays 3*6=<<3*6=18>>18.\n#### 18", "18"),
        ("#### 1,000", "1,000"),
        ("#### 1\n#### 2", "2"),
        # "the answer is"
        ("The answer is 42.", "42"),
        ("So the answer is: $\\frac{3}{4}$", "\\frac{3}{4}"),
        ("the answer is 18 dollars", "18 dollars"),
        # nothing
        ("I do not know", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "solution, expected",
    [
        ("2+2=<<2+2=4>>4\n#### 4", "4"),
        ("#### 1,000", "1000"),
        ("#### -5", "-5"),
        ("#### 0.50", "0.5"),
        ("#### 18.0", "18"),
        ("#### $18", "18"),
        ("#### 3/4", "3/4"),  # not a plain number: kept as written
        ("no hashes", None),
    ],
)
def test_gsm8k_answer(solution, expected):
    assert gsm8k_answer(solution) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("18", Decimal(18)),
        ("1,000", Decimal(1000)),
        ("1,234,567.5", Decimal("1234567.5")),
        ("$18", Decimal(18)),
        ("\\$18.00", Decimal(18)),
        ("-3", Decimal(-3)),
        ("+3", Decimal(3)),
        (".5", Decimal("0.5")),
        (" 42. ", Decimal(42)),
        ("10\\,000", Decimal(10000)),
        # not plain numbers
        ("1,00", None),
        ("2,3", None),
        ("1e5", None),
        ("\\frac{1}{2}", None),
        ("5\\%", None),
        ("x", None),
        ("", None),
        ("٣", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    "response, gold, correct",
    [
        # plain numbers (the fast path)
        ("\\boxed{18}", "18", True),
        ("\\boxed{1,000}", "1000", True),
        ("\\boxed{1000}", "1,000", True),
        ("\\boxed{\\$18.00}", "18", True),
        ("\\boxed{18.0}", "18", True),
        ("#### 72", "72", True),
        ("The answer is 18 dollars.", "18", True),
        ("\\boxed{17}", "18", False),
        ("\\boxed{-18}", "18", False),
        ("\\boxed{27}", "27.0", True),  # AMC golds are written as floats
        ("\\boxed{0.5}", "0.50", True),
        # LaTeX (math-verify)
        ("\\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{\\dfrac12}", "\\frac{1}{2}", True),
        ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
        ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
        ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
        ("\\boxed{x = 5}", "5", True),
        ("\\boxed{18 \\text{ dollars}}", "18", True),
        ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", True),
        ("The answer is $\\frac{3}{4}$.", "0.75", True),
        # no answer: wrong, not an error
        ("I give up", "18", False),
        ("\\boxed{}", "18", False),
    ],
)
def test_grade(response, gold, correct):
    result = grade(response, gold)
    assert result.error is None
    assert result.correct is correct
    assert is_correct(response, gold) is correct


def test_grade_reports_prediction():
    assert grade("so \\boxed{17}", "18") == Grade(correct=False, predicted="17", error=None)
    assert grade("nothing", "18") == Grade(correct=False, predicted=None, error=None)


def test_gold_goes_first_to_math_verify():
    # math-verify compares a set prediction with a relation gold, not the other way round.
    assert answers_match("(1,2)", "1<x<2") is True
    assert answers_match("1<x<2", "(1,2)") is False


# Plain-number pairs whose verdict the fast path decides must agree with math-verify's.
@pytest.mark.parametrize(
    "pred, gold",
    [
        ("18", "18"),
        ("18.0", "18"),
        ("18.00", "18.0"),
        ("1,000", "1000"),
        ("012", "12"),
        ("-3", "-3"),
        ("+3", "3"),
        ("17", "18"),
        ("-18", "18"),
        ("0", "1"),
        ("100000000000000000001", "100000000000000000000"),
        ("1.5", "1.50"),
        ("3.0", "4"),
    ],
)
def test_fast_path_agrees_with_math_verify(pred, gold):
    fast = grading._numbers_verdict(pred, gold)
    assert fast is not None
    assert fast == grading._math_verify(pred, gold, grading.DEFAULT_TIMEOUT_SECONDS)


@pytest.mark.parametrize("pred, gold", [("0.3333334", "0.333333"), ("3.0000001", "3"), ("5\\%", "5"), ("2,3", "2")])
def test_fast_path_leaves_doubtful_pairs_to_math_verify(pred, gold):
    assert grading._numbers_verdict(pred, gold) is None


def test_math_verify_failure_is_an_error_not_wrong(monkeypatch):
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("sympy blew up")

    monkeypatch.setattr(math_verify, "verify", broken)
    result = grade("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}")
    assert result.correct is False
    assert result.predicted == "\\frac{1}{2}"
    assert "sympy blew up" in result.error
    with pytest.raises(GradingError, match="sympy blew up"):
        is_correct("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}")
    # The fast path does not need math-verify, so plain numbers still grade.
    assert is_correct("\\boxed{18}", "18")


def test_timeout_is_an_error(monkeypatch):
    import math_verify
    from math_verify.errors import TimeoutException

    def slow(*args, **kwargs):
        raise TimeoutException("Operation timed out!")

    grading._parse.cache_clear()
    monkeypatch.setattr(math_verify, "parse", slow)
    try:
        result = grade("\\boxed{\\sqrt{7}}", "\\sqrt{7}")
    finally:
        grading._parse.cache_clear()
    assert result.correct is False
    assert result.error is not None and "Timeout" in result.error


def test_unreadable_gold_is_an_error():
    # math-verify extracts nothing at all from a lone line break; most junk comes back as a string instead.
    result = grade("\\boxed{5}", "\\\\")
    assert result.error is not None and "gold" in result.error
    with pytest.raises(GradingError):
        is_correct("\\boxed{5}", "\\\\")


@pytest.mark.parametrize("response", ["\\boxed{5}", "no answer at all"])
def test_empty_gold_is_an_error(response):
    assert grade(response, "  ").error == "empty gold answer"
    with pytest.raises(GradingError, match="empty gold"):
        is_correct(response, "")


@pytest.mark.parametrize("gold, correct", [(18, True), (18.0, True), (27.5, False), (7, False)])
def test_numeric_gold(gold, correct):
    assert is_correct("\\boxed{18}", gold) is correct


# Cases that need math-verify itself (not the numeric fast path), so a broken timeout shows up.
CONCURRENT_CASES = [
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", True),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    ("\\boxed{\\sqrt{3}}", "2\\sqrt{2}", False),
    ("\\boxed{18}", "18", True),
]


def _grade_case(case):
    response, gold, _ = case
    return grade(response, gold)


def test_grading_in_threads():
    grading._parse.cache_clear()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(_grade_case, CONCURRENT_CASES * 2))
    assert [r.error for r in results] == [None] * len(results)
    assert [r.correct for r in results] == [c for _, _, c in CONCURRENT_CASES * 2]


def test_grading_in_spawned_processes():
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        results = list(pool.map(_grade_case, CONCURRENT_CASES))
    assert [r.error for r in results] == [None] * len(results)
    assert [r.correct for r in results] == [c for _, _, c in CONCURRENT_CASES]


def test_import_is_light():
    code = "import sys, selfbudgeter.core.grading; print('sympy' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# --- lenient extraction (opt-in) -------------------------------------------------------------------------------

LENIENT_CASES = [
    ("so 9 + 14 = 23 apples", "23"),  # the result of the last "= N"
    ("Tom has 6 + 6 = 12 apples. Then he eats 2, so 12 - 2 = 10.", "10"),
    ("Tom has 12 apples now.", "12"),  # no "=": the last number
    ("First 3 apples, then 4 more, so 7", "7"),
    ("The temperature is -4 degrees.", "-4"),  # a negative number
    ("x = -4.", "-4"),
    ("10-5", "5"),  # a minus between numbers is subtraction, not a sign
    ("The total is $1,250 in all.", "1,250"),  # comma thousands
    ("so 400 + 850 = 1,250", "1,250"),
    ("It costs 3.5 dollars.", "3.5"),
    ("a == 3 then 7", "7"),  # "==" is not an equals sign to read
    ("H2O is water", None),  # digits inside a word are not a number
    ("I do not know.", None),  # no number: no answer
    ("", None),
    ("so 3 + 4 = 7 \\boxed{8}", "8"),  # a boxed answer still wins
    ("the answer is 5 = 6", "5 = 6"),  # as do the strict rules' "the answer is ..."
]


@pytest.mark.parametrize("text, expected", LENIENT_CASES)
def test_lenient_extraction(text, expected):
    assert grading.extract_answer_lenient(text) == expected


def test_lenient_is_opt_in_and_never_the_default():
    prose = "Tom has 9 apples and buys 14 more, so 9 + 14 = 23 apples."
    assert extract_answer(prose) is None
    assert grade(prose, "23") == Grade(correct=False, predicted=None)
    assert grade(prose, "23", extraction="lenient") == Grade(correct=True, predicted="23")
    assert grade("so 9 + 14 = 22", "23", extraction="lenient").correct is False
    assert grade("The total is $1,250 in all.", "1250", extraction="lenient").correct is True
    assert grade("It is -4.", "-4", extraction="lenient").correct is True
    assert grade("No idea.", "4", extraction="lenient") == Grade(correct=False, predicted=None)
    assert grading.is_correct("so 2 + 2 = 4", "4", extraction="lenient")
    with pytest.raises(ValueError, match="boxed, lenient"):
        grade("\\boxed{4}", "4", extraction="last-number")


def test_lenient_is_an_option_of_eval_profile_and_rewards_whose_default_is_boxed():
    from selfbudgeter.core.errors import UserError
    from selfbudgeter.evaluation.evaluate import EvalConfig
    from selfbudgeter.training.profile import SAMPLING_KEYS, ProfileConfig
    from selfbudgeter.training.rewards import AccuracyReward, RewardConfig, make_accuracy_reward, score_response

    assert EvalConfig().answer_extraction == ProfileConfig().answer_extraction == "boxed"
    assert RewardConfig().answer_extraction == "boxed"
    assert "answer_extraction" in SAMPLING_KEYS  # a resumed profile is graded one way throughout
    for config in (EvalConfig, ProfileConfig):
        with pytest.raises(UserError, match="answer_extraction"):
            config(answer_extraction="last")
    with pytest.raises(ValueError):
        RewardConfig(answer_extraction="last")

    class Chars:  # a tokenizer of one token per character, enough for score_response
        def encode(self, text, add_special_tokens=False):
            return list(text)

    response = "<budget>20</budget><solution>9 + 14 = 23</solution>"
    assert score_response(Chars(), response, "23").correct is False
    assert score_response(Chars(), response, "23", extraction="lenient").correct is True
    completions = ["so 9 + 14 = 23"]
    assert AccuracyReward()(completions=completions, answer=["23"]) == [0.0]
    lenient = make_accuracy_reward(None, RewardConfig(answer_extraction="lenient"))[0]
    assert lenient(completions=completions, answer=["23"]) == [1.0]
