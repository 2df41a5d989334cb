"""Reward tests: scalar helpers with plain numbers, then the TRL reward functions with literal completions.

Run: .venv/bin/python -m pytest -q tests/test_rewards.py
"""

from __future__ import annotations

import itertools
import logging
import math
import pickle
import subprocess
import sys
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from selfbudgeter.core import grading
from selfbudgeter.training import rewards
from selfbudgeter.core.errors import UserError
from selfbudgeter.core.format import render_prefill, render_response
from selfbudgeter.training.rewards import (
    REWARDS,
    RewardConfig,
    alpha_at,
    budget_penalty,
    build_reward_funcs,
    cosine_kernel,
    make_reward_funcs,
    precise_budget_score,
    selfbudgeter_reward,
)

CFG = RewardConfig()


@pytest.fixture(scope="module")
def tokenizer():
    """One token per whitespace-separated word: 'w w w' is 3 tokens. Built in memory, never downloaded."""
    model = WordLevel({"[UNK]": 0, "w": 1}, unk_token="[UNK]")
    tok = Tokenizer(model)
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def solution(n_tokens: int, answer: str = "42") -> str:
    """A solution of exactly n_tokens words whose last word is the boxed answer."""
    return " ".join(["w"] * (n_tokens - 1) + [f"\\boxed{{{answer}}}"])


def call_all(funcs, completions, **columns):
    n = len(completions)
    columns.setdefault("answer", ["42"] * n)
    columns.setdefault("trainer_state", None)
    prompts = columns.pop("prompts", ["q"] * n)
    return [f(prompts=prompts, completions=completions, completion_ids=None, **columns) for f in funcs]


def total(funcs, completions, **columns):
    parts = call_all(funcs, completions, **columns)
    return [sum(p[i] for p in parts) for i in range(len(completions))]


# --- RewardConfig -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, constant",
    [
        ({"budget_penalty": -1.5}, "budget_penalty"),  # 0.5 - 1.5 < -0.5: wrong would beat correct
        ({"wrong_max": 0.2}, "budget_penalty"),
        ({"correct_min": -0.2}, "budget_penalty"),
        ({"budget_penalty": 0.3}, "budget_penalty"),
        ({"format_penalty": -1.5}, "format_penalty"),  # equals wrong_min + budget_penalty: not below
        ({"format_penalty": -1.0}, "format_penalty"),
        ({"correct_min": 1.2}, "correct_min"),
        ({"wrong_min": -0.4}, "wrong_min"),
        ({"alpha_end": -0.1}, "alpha_end"),
        ({"max_budget": 0}, "max_budget"),
        ({"alpha_steps": 0}, "alpha_steps"),
        ({"alpha_steps": -5}, "alpha_steps"),
    ],
)
def test_config_rejects_constants_that_break_the_spec(overrides, constant):
    with pytest.raises(ValueError, match=constant):
        RewardConfig(**overrides)


def test_config_defaults_are_the_spec():
    assert (CFG.format_penalty, CFG.budget_penalty) == (-2.0, -0.5)
    assert (CFG.correct_min, CFG.correct_max, CFG.wrong_min, CFG.wrong_max) == (0.5, 1.0, -1.0, -0.5)
    assert (CFG.alpha_start, CFG.alpha_end) == (6.0, 0.1)


# --- scalar helpers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length, target, width, expected",
    [
        (50, 50, 10, 1.0),
        (55, 50, 10, 0.5),
        (45, 50, 10, 0.5),
        (60, 50, 10, 0.0),
        (500, 50, 10, 0.0),
        (50, 50, 0, 1.0),  # zero width: 1 exactly at the target
        (51, 50, 0, 0.0),
        (0, 0, 0, 1.0),
    ],
)
def test_cosine_kernel(length, target, width, expected):
    assert cosine_kernel(length, target, width) == pytest.approx(expected)


def test_cosine_kernel_rejects_negative_width():
    with pytest.raises(ValueError):
        cosine_kernel(1, 1, -1)


@pytest.mark.parametrize(
    "correct, length, budget, alpha, expected",
    [
        # correct: t = (1 - 0.5) * 100 = 50, w = 50
        (True, 50, 100, 0.5, 1.0),
        (True, 75, 100, 0.5, 0.75),
        (True, 25, 100, 0.5, 0.75),
        (True, 100, 100, 0.5, 0.5),
        (True, 400, 100, 0.5, 0.5),
        # wrong: t = 150, w = 50
        (False, 150, 100, 0.5, -0.5),
        (False, 125, 100, 0.5, -0.75),
        (False, 100, 100, 0.5, -1.0),
        (False, 10, 100, 0.5, -1.0),
        # alpha 6: the correct target clamps to 0, w = 600
        (True, 0, 100, 6.0, 1.0),
        (True, 300, 100, 6.0, 0.75),
        (True, 600, 100, 6.0, 0.5),
        (False, 700, 100, 6.0, -0.5),
        # alpha 0: only the exact budget scores (correct) or nothing does (wrong at b)
        (True, 100, 100, 0.0, 1.0),
        (True, 99, 100, 0.0, 0.5),
    ],
)
def test_precise_budget_score(correct, length, budget, alpha, expected):
    assert precise_budget_score(correct, length, budget, alpha, CFG) == pytest.approx(expected)


ALPHAS = [0.1, 0.3, 0.5, 0.9, 1.0, 1.5, 3.0, 6.0]
BUDGETS = [1, 7, 50, 100, 1000]


@pytest.mark.parametrize("alpha, budget", list(itertools.product(ALPHAS, BUDGETS)))
def test_score_peaks_under_budget_when_correct_and_over_when_wrong(alpha, budget):
    step = alpha * budget / 16  # the kernel's width is alpha * budget: sample it finely whatever the scale
    lengths = [i * step for i in range(int((3 + alpha) * budget / step))]
    correct_peak = max(lengths, key=lambda l: precise_budget_score(True, l, budget, alpha, CFG))
    wrong_peak = max(lengths, key=lambda l: precise_budget_score(False, l, budget, alpha, CFG))
    assert correct_peak == pytest.approx(max(0.0, (1 - alpha) * budget), abs=step)
    assert wrong_peak == pytest.approx((1 + alpha) * budget, abs=step)
    assert precise_budget_score(True, max(0.0, (1 - alpha) * budget), budget, alpha, CFG) == CFG.correct_max
    assert precise_budget_score(False, (1 + alpha) * budget, budget, alpha, CFG) == CFG.wrong_max


@pytest.mark.parametrize(
    "budget, b_max, expected",
    [
        (100, None, 0.0),
        (10**6, None, 0.0),
        (100, float("nan"), 0.0),
        (100, math.inf, 0.0),
        (100, 100, 0.0),
        (100, 250.5, 0.0),
        (101, 100, -0.5),
        (5000, 100, -0.5),
    ],
)
def test_budget_penalty(budget, b_max, expected):
    assert budget_penalty(budget, b_max, CFG) == expected


@pytest.mark.parametrize(
    "step, total_steps, expected",
    [
        (0, 100, 6.0),
        (100, 100, 0.1),
        (50, 100, 3.05),
        (25, 100, 6.0 - 5.9 / 4),
        (150, 100, 0.1),  # past the end: clamped
        (-10, 100, 6.0),
        (5, 0, 0.1),  # no schedule length: the tight end
        (5, -1, 0.1),
    ],
)
def test_alpha_schedule(step, total_steps, expected):
    assert alpha_at(step, total_steps, 6.0, 0.1) == pytest.approx(expected)


def test_correct_always_beats_wrong_even_over_budget():
    lengths = [0, 1, 5, 50, 99, 100, 101, 150, 500, 5000, 10**5]
    budgets = [1, 10, 100, 1000, 10**5]
    alphas = [0.0, 0.1, 0.5, 1.0, 2.0, 6.0]
    b_maxes = [None, 1, 100, 10**6]
    grid = list(itertools.product(lengths, budgets, b_maxes, alphas))
    worst_correct = min(selfbudgeter_reward(True, l, b, m, a, CFG) for l, b, m, a in grid)
    best_wrong = max(selfbudgeter_reward(False, l, b, m, a, CFG) for l, b, m, a in grid)
    assert worst_correct >= best_wrong
    assert worst_correct == pytest.approx(CFG.correct_min + CFG.budget_penalty)
    assert best_wrong == pytest.approx(CFG.wrong_max)
    assert CFG.format_penalty < min(worst_correct, CFG.wrong_min + CFG.budget_penalty)


# --- TRL reward functions ---------------------------------------------------------------------------------


def test_factory_returns_three_named_functions(tokenizer):
    funcs = make_reward_funcs(tokenizer)
    assert [f.__name__ for f in funcs] == ["format_reward", "budget_penalty_reward", "precise_budget_reward"]
    restored = pickle.loads(pickle.dumps(funcs))  # TRL's async rollout worker pickles reward functions
    assert [f.__name__ for f in restored] == [f.__name__ for f in funcs]


BROKEN = [
    ("<budget>0</budget><solution>\\boxed{42}</solution>", "budget 0"),
    ("<budget>-5</budget><solution>\\boxed{42}</solution>", "negative budget"),
    ("<budget>1000000000000</budget><solution>\\boxed{42}</solution>", "budget over the cap"),
    ("<budget>abc</budget><solution>\\boxed{42}</solution>", "non-numeric budget"),
    ("<budget>5.0</budget><solution>\\boxed{42}</solution>", "decimal budget"),
    ("<budget>" + "9" * 5000 + "</budget><solution>\\boxed{42}</solution>", "5000-digit budget"),
    ("\\boxed{42}", "no budget"),
    ("<budget>10</budget>\\boxed{42}", "no solution"),
    ("<budget>10</budget><solution>\\boxed{42}", "unclosed solution"),
    ("thinking <budget>10</budget><solution>\\boxed{42}</solution>", "text before the budget"),
    ("", "empty"),
]


@pytest.mark.parametrize("completion, why", BROKEN, ids=[why for _, why in BROKEN])
def test_broken_format_gets_the_format_penalty_only(tokenizer, completion, why):
    fmt, pb, s = call_all(make_reward_funcs(tokenizer), [completion], b_max=[1.0])
    assert (fmt, pb, s) == ([CFG.format_penalty], [0.0], [0.0])


def test_broken_format_is_the_worst(tokenizer):
    funcs = make_reward_funcs(tokenizer)
    grid = itertools.product((1, 10, 500), (1, 10, 900), ("42", "7"))
    completions = [render_response(b, solution(l, answer)) for b, l, answer in grid]
    completions.append(BROKEN[0][0])
    rewards_ = total(funcs, completions, b_max=[5.0] * len(completions))
    assert rewards_[-1] == CFG.format_penalty
    assert min(rewards_[:-1]) > CFG.format_penalty


@pytest.mark.parametrize(
    "length, budget, answer, b_max, step, max_steps",
    [
        (50, 100, "42", 80.0, 50, 100),  # correct, over b_max
        (50, 100, "42", None, 50, 100),  # correct, unconstrained
        (100, 100, "42", 100.0, 0, 100),  # correct at budget, alpha 6
        (160, 100, "7", 200.0, 50, 100),  # wrong, over budget
        (10, 100, "7", float("nan"), 100, 100),  # wrong, short, alpha 0.1
        (99, 100, "42", 1.0, 99, 100),
    ],
)
def test_three_functions_sum_to_the_reward(tokenizer, length, budget, answer, b_max, step, max_steps):
    completion = render_response(budget, solution(length, answer))
    state = SimpleNamespace(global_step=step, max_steps=max_steps)
    parts = call_all(make_reward_funcs(tokenizer), [completion], b_max=[b_max], trainer_state=state)
    alpha = alpha_at(step, max_steps, CFG.alpha_start, CFG.alpha_end)
    expected = selfbudgeter_reward(answer == "42", length, budget, b_max, alpha, CFG)
    assert sum(p[0] for p in parts) == pytest.approx(expected)
    assert parts[0] == [0.0]
    assert parts[1] == [budget_penalty(budget, b_max, CFG)]


def test_one_value_per_completion(tokenizer):
    completions = [render_response(20, solution(n)) for n in (5, 20, 40)] + [b for b, _ in BROKEN]
    for values in call_all(make_reward_funcs(tokenizer), completions):
        assert len(values) == len(completions)
        assert all(isinstance(v, float) for v in values)


@pytest.mark.parametrize(
    "step, max_steps, alpha_steps, expected",
    [
        (0, 100, None, 6.0),
        (50, 100, None, 6.0 - 5.9 * 0.5),
        (100, 100, None, 0.1),
        (0, 100, 40, 6.0),
        (20, 100, 40, 6.0 - 5.9 * 0.5),  # the schedule ends at step 40, not at max_steps
        (40, 100, 40, 0.1),
        (90, 100, 40, 0.1),  # after it alpha stays at alpha_end
    ],
)
def test_alpha_schedule_follows_alpha_steps(step, max_steps, alpha_steps, expected):
    scorer = rewards.SelfBudgeterScorer(None, RewardConfig(alpha_steps=alpha_steps))
    state = SimpleNamespace(global_step=step, max_steps=max_steps)
    assert scorer.alpha(state) == pytest.approx(expected)


def test_without_trainer_state_alpha_is_alpha_start(tokenizer):
    completion = render_response(100, solution(100))
    [value] = total(make_reward_funcs(tokenizer), [completion])
    # alpha 6: correct target 0, width 600, l = 100 -> k = (1 + cos(pi/6)) / 2
    assert value == pytest.approx(0.5 + 0.5 * (1 + math.cos(math.pi / 6)) / 2)


def test_b_max_column_may_be_absent(tokenizer):
    completion = render_response(10**5, solution(3))
    parts = call_all(make_reward_funcs(tokenizer), [completion])
    assert parts[1] == [0.0]


def test_prefill_is_scored_with_the_prefilled_budget(tokenizer):
    funcs = make_reward_funcs(tokenizer)
    state = SimpleNamespace(global_step=100, max_steps=100)  # alpha 0.1: correct peak at 90 tokens
    completion = solution(90) + "</solution>"
    parts = call_all(funcs, [completion] * 2, prefill_budget=[100, None], b_max=[50.0] * 2, trainer_state=state)
    assert [p[0] for p in parts] == [0.0, -0.5, 1.0]  # the prefilled budget 100 is over b_max
    assert [p[1] for p in parts] == [CFG.format_penalty, 0.0, 0.0]  # without the prefill there is no budget
    full = render_prefill(100) + completion
    assert total(make_reward_funcs(tokenizer), [full], b_max=[50.0], trainer_state=state) == [pytest.approx(0.5)]


def test_prefill_with_a_second_budget_is_broken(tokenizer):
    completion = "<budget>5</budget><solution>\\boxed{42}</solution>"
    parts = call_all(make_reward_funcs(tokenizer), [completion], prefill_budget=[100])
    assert parts[0] == [CFG.format_penalty]


def test_chat_completions_are_supported(tokenizer):
    text = render_response(10, solution(9))
    chat = [[{"role": "assistant", "content": text}]]
    assert total(make_reward_funcs(tokenizer), chat) == total(make_reward_funcs(tokenizer), [text])


def test_wrong_answer_scores_below_correct(tokenizer):
    correct, wrong = total(make_reward_funcs(tokenizer), [render_response(10, solution(9))] * 2, answer=["42", "41"])
    assert correct > 0 > wrong


def test_missing_answer_column_is_a_user_error(tokenizer):
    with pytest.raises(UserError, match="answer"):
        make_reward_funcs(tokenizer)[0](prompts=["q"], completions=["x"], trainer_state=None)


def test_bad_prefill_budget_is_a_user_error(tokenizer):
    with pytest.raises(UserError, match="prefill_budget"):
        call_all(make_reward_funcs(tokenizer), ["x</solution>"], prefill_budget=[0])


def test_each_completion_is_graded_once_per_batch(tokenizer, monkeypatch):
    calls = []
    real = grading.grade

    def counting(text, gold, **kwargs):
        calls.append(text)
        return real(text, gold, **kwargs)

    monkeypatch.setattr(grading, "grade", counting)
    completions = [render_response(10, solution(n)) for n in (3, 6, 9)]
    call_all(make_reward_funcs(tokenizer), completions)
    assert len(calls) == 3


def test_grading_error_counts_as_wrong_and_is_logged(tokenizer, monkeypatch, caplog):
    failed = SimpleNamespace(correct=True, predicted="42", error="timeout")
    monkeypatch.setattr(grading, "grade", lambda text, gold, **kwargs: failed)
    completions = [render_response(10, solution(9))] * 2
    with caplog.at_level(logging.WARNING, logger="selfbudgeter.training.rewards"):
        values = total(make_reward_funcs(tokenizer), completions, b_max=[100.0] * 2)
    assert all(v <= CFG.wrong_max for v in values)
    assert "2 of 2 completions could not be graded" in caplog.text


def test_batch_metrics_are_logged_through_trl(tokenizer):
    logged = {}
    completions = [render_response(10, solution(10)), render_response(10, solution(30)), "broken"]
    call_all(make_reward_funcs(tokenizer), completions, log_metric=lambda name, value: logged.setdefault(name, value))
    assert logged["selfbudgeter/format_ok"] == pytest.approx(2 / 3)
    assert logged["selfbudgeter/within_20"] == pytest.approx(0.5)
    assert logged["selfbudgeter/mean_budget"] == 10
    assert logged["selfbudgeter/accuracy"] == pytest.approx(2 / 3)  # both well-formed answers are right


def test_training_logs_use_the_one_tolerance_test(tokenizer, monkeypatch):
    # within_20 in the GRPO logs is metrics.within_tolerance, the same test evaluation and the report use
    seen = []
    monkeypatch.setattr(rewards, "within_tolerance", lambda length, budget: seen.append((length, budget)) or True)
    logged = {}
    completions = [render_response(10, solution(10)), render_response(10, solution(30))]
    call_all(make_reward_funcs(tokenizer), completions, log_metric=lambda name, value: logged.setdefault(name, value))
    assert len(seen) == 2 and all(budget == 10 for _, budget in seen)
    assert logged["selfbudgeter/within_20"] == 1.0


# --- baselines --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("so the answer is \\boxed{42}", "42", 1.0),
        ("\\boxed{41}", "42", 0.0),
        ("no answer at all", "42", 0.0),
        (render_response(5, "\\boxed{42}"), "42", 1.0),  # the format is not required, nor is it in the way
    ],
)
def test_accuracy_reward(completion, gold, expected):
    [func] = REWARDS["accuracy"](None, None)
    assert func.__name__ == "accuracy_reward"
    assert func(prompts=["q"], completions=[completion], answer=[gold]) == [expected]


def test_kimi_length_reward_per_group():
    [func] = REWARDS["kimi_length"](None, None)
    assert func.__name__ == "kimi_length_reward"
    right, wrong = "\\boxed{42}", "\\boxed{7}"
    prompts = ["p1"] * 4 + ["p2"] * 2
    completions = [right, wrong, right, wrong, right, wrong]
    ids = [[0] * n for n in (100, 100, 300, 500, 10, 10)]
    values = func(prompts=prompts, completions=completions, completion_ids=ids, answer=["42"] * 6)
    # p1: min 100, max 500 -> lambda = 0.5, 0.5, 0.0, -0.5; p2: equal lengths carry no signal
    assert values == pytest.approx([0.5, 0.0, 0.0, -0.5, 0.0, 0.0])


def test_kimi_length_reward_measures_text_without_completion_ids(tokenizer):
    [func] = REWARDS["kimi_length"](tokenizer, None)
    completions = [solution(2), solution(4), solution(6)]
    values = func(prompts=["p"] * 3, completions=completions, completion_ids=None, answer=["42"] * 3)
    assert values == pytest.approx([0.5, 0.0, -0.5])


def test_registry_entries_are_factories():
    for name, factory in REWARDS.items():
        funcs = factory(None, RewardConfig())
        assert funcs and all(callable(f) and f.__name__ for f in funcs), name
    names = [f.__name__ for f in build_reward_funcs(["accuracy", "kimi_length"], None)]
    assert names == ["accuracy_reward", "kimi_length_reward"]
    with pytest.raises(UserError, match="nonsense"):
        build_reward_funcs(["accuracy", "nonsense"], None)


def test_importing_rewards_does_not_import_torch():
    code = "import sys, selfbudgeter.training.rewards; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_follow_term_has_a_slope_at_every_length_under_a_user_budget(tokenizer):
    """The follow term rewards a correct answer under a user budget for landing on it, linearly (L1-style), and
    stays off without a user budget, for wrong answers, and by default (follow_penalty 0 is the SPEC)."""
    from selfbudgeter.training.rewards import RewardConfig, follow_score, make_reward_funcs

    cfg = RewardConfig(follow_penalty=-0.5)
    on, near, far, farther = (follow_score(True, n, 100, cfg) for n in (100, 90, 40, 250))
    assert on == 0.0 and on > near > far > farther == -0.5
    assert follow_score(False, 10, 100, cfg) == 0.0
    assert follow_score(True, 10, None, cfg) == 0.0
    assert follow_score(True, 10, 100, RewardConfig()) == 0.0
    assert len(make_reward_funcs(tokenizer)) == 3
    funcs = make_reward_funcs(tokenizer, cfg)
    assert [f.__name__ for f in funcs][-1] == "follow_reward"
    with pytest.raises(ValueError, match="follow_penalty"):
        RewardConfig(follow_penalty=-0.6)
    strong = RewardConfig(follow_penalty=-1.5, follow_over_accuracy=True)  # L1-style: may outweigh accuracy
    assert CFG.correct_min + follow_score(True, 400, 100, strong) < CFG.wrong_max
    assert follow_score(False, 400, 100, strong) == -1.5 and follow_score(False, 100, 100, strong) == 0.0
    with pytest.raises(ValueError, match="follow_penalty"):
        RewardConfig(follow_penalty=0.1)


def test_prefill_alpha_scores_user_budgets_with_a_fixed_alpha(tokenizer):
    """With prefill_alpha, a response under a user budget is scored at that alpha whatever the schedule's: at
    step 0 (alpha 6) the schedule pays a correct answer under a user budget of 100 more for 30 tokens than for
    90; prefill_alpha 0.1 pays 90 (its peak) fully and 30 at the minimum. Own budgets keep the schedule's alpha."""
    from selfbudgeter.training.rewards import RewardConfig, make_reward_funcs

    state = SimpleNamespace(global_step=0, max_steps=100)

    def s_of(cfg, length, prefill=True):
        text = solution(length) + "</solution>" if prefill else render_response(100, solution(length))
        parts = call_all(make_reward_funcs(tokenizer, cfg), [text], prefill_budget=[100 if prefill else None],
                         b_max=[200.0], trainer_state=state)
        return parts[2][0]  # format, budget penalty, S

    schedule, fixed = RewardConfig(), RewardConfig(prefill_alpha=0.1)
    assert s_of(schedule, 30) > s_of(schedule, 90)
    assert s_of(fixed, 90) == pytest.approx(CFG.correct_max) and s_of(fixed, 30) == pytest.approx(CFG.correct_min)
    assert s_of(fixed, 30, prefill=False) == pytest.approx(s_of(schedule, 30, prefill=False))
    with pytest.raises(ValueError, match="prefill_alpha"):
        RewardConfig(prefill_alpha=1.0)
