"""GRPO rewards: SelfBudgeter's budget-guided reward and the two baselines', on TRL's reward contract.

The SelfBudgeter reward of one completion (METHOD.md, SPEC) with parsed budget b, solution length l in tokens,
correctness C and the question's b_max:

    R = r_fmt                                   if the format is broken
    R = S(C, l, b, alpha) + PB(b, b_max)        otherwise
    PB = 0 if b <= b_max else r_b
    S  = sC_min + (sC_max - sC_min) * k(l; t=max(0, (1-alpha) b), w=alpha b)    if C
    S  = sW_min + (sW_max - sW_min) * k(l; t=(1+alpha) b,         w=alpha b)    if not C
    k(l; t, w) = (1 + cos(pi min(1, |l - t| / w))) / 2

The arithmetic lives in scalar helpers (`cosine_kernel`, `precise_budget_score`, `budget_penalty`,
`alpha_at`, `selfbudgeter_reward`). `make_reward_funcs` wraps them as three TRL reward functions whose sum
is R, so TRL logs the format, budget-penalty and precise-budget parts separately.

Where this deviates from, or adds to, the paper:
1. The paper's four reward parts are folded into three functions: accuracy enters through S (its range
   depends on C), so a separate accuracy term would count correctness twice.
2. A prompt may end with a user budget (`prefill_budget` column); the response is then scored as
   `render_prefill(b) + completion`, so S also trains following budgets the model did not choose.
3. `b_max` missing or NaN means infinity (no correct base sample: the question is not constrained).

No torch import: TRL converts the returned floats itself.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core import grading
from ..core.errors import UserError
from ..core.format import DEFAULT_MAX_BUDGET, FormatError, render_prefill, token_length, try_parse
from ..core.metrics import within_tolerance

logger = logging.getLogger(__name__)

RewardFunc = Callable[..., list[float | None]]


@dataclass
class RewardConfig:
    """Every constant of the SPEC reward; defaults are METHOD.md's (alpha schedule from the paper)."""

    format_penalty: float = -2.0  # r_fmt
    budget_penalty: float = -0.5  # r_b
    correct_min: float = 0.5  # sC_min
    correct_max: float = 1.0  # sC_max
    wrong_min: float = -1.0  # sW_min
    wrong_max: float = -0.5  # sW_max
    alpha_start: float = 6.0
    alpha_end: float = 0.1
    # Beyond the paper: the step at which alpha reaches alpha_end; later steps keep it (a run can go on at the
    # final alpha, e.g. with a lower learning rate). None: the whole run (max_steps), the paper's schedule.
    alpha_steps: int | None = None
    max_budget: int = DEFAULT_MAX_BUDGET  # B_cap
    # Beyond the paper (L1/LCPO's linear length term): a correct answer under a *user* budget b also gets
    # follow_penalty * min(1, |l - b| / b). S's kernel pays nothing beyond alpha * b of its target, and alpha is
    # loose (target near 0) for most of the schedule, so it teaches following only at the end, and only for
    # budgets near the policy's own length; this term has a slope at every length. 0: the SPEC reward alone.
    follow_penalty: float = 0.0
    # Beyond the paper: alpha for a response under a *user* budget (None: the schedule's). The schedule's alpha
    # is loose for most of a run, so S pays a correct answer for being short whatever budget the user set; a
    # fixed small alpha pays meeting that budget from the first step.
    prefill_alpha: float | None = None
    # Beyond the paper (L1-style): let the follow term outweigh accuracy, so that a wrong answer that meets the
    # user's budget can score above a correct one far from it; the term then applies to wrong answers too.
    # Off: the SPEC's ordering, correct above wrong.
    follow_over_accuracy: bool = False
    # How the final answer is read (`grading.EXTRACTIONS`): "boxed", the paper's strict `\\boxed{}`, or the opt-in
    # "lenient" (the last "= N", else the last number) for models that answer in prose. Never lenient by default.
    answer_extraction: str = "boxed"

    def __post_init__(self) -> None:
        grading.check_extraction(self.answer_extraction)
        if self.correct_min > self.correct_max:
            raise ValueError(f"correct_min ({self.correct_min}) must not exceed correct_max ({self.correct_max})")
        if self.wrong_min > self.wrong_max:
            raise ValueError(f"wrong_min ({self.wrong_min}) must not exceed wrong_max ({self.wrong_max})")
        if self.budget_penalty > 0:
            raise ValueError(f"budget_penalty ({self.budget_penalty}) is a penalty: it must be <= 0")
        if self.follow_penalty > 0:
            raise ValueError(f"follow_penalty ({self.follow_penalty}) is a penalty: it must be <= 0")
        outweighed = self.correct_min + self.budget_penalty + self.follow_penalty < self.wrong_max
        if outweighed and not self.follow_over_accuracy:
            raise ValueError(
                f"follow_penalty ({self.follow_penalty}) lets a wrong answer beat a correct one: correct_min + "
                f"budget_penalty + follow_penalty must be >= wrong_max ({self.wrong_max}), or set "
                "follow_over_accuracy"
            )
        if self.correct_min + self.budget_penalty < self.wrong_max:
            raise ValueError(
                f"budget_penalty ({self.budget_penalty}) lets a wrong answer beat a correct one over budget: "
                f"correct_min + budget_penalty must be >= wrong_max ({self.correct_min} + {self.budget_penalty} "
                f"< {self.wrong_max})"
            )
        lowest = self.wrong_min + self.budget_penalty
        if not self.format_penalty < lowest:
            raise ValueError(
                f"format_penalty ({self.format_penalty}) must be below every other reward, "
                f"the lowest of which is wrong_min + budget_penalty = {lowest}"
            )
        if self.alpha_start < 0 or self.alpha_end < 0:
            raise ValueError(f"alpha_start ({self.alpha_start}) and alpha_end ({self.alpha_end}) must be >= 0")
        if self.prefill_alpha is not None and not 0 <= self.prefill_alpha < 1:
            raise ValueError(f"prefill_alpha ({self.prefill_alpha}) must be in [0, 1), or null for the schedule's")
        if self.alpha_steps is not None and (isinstance(self.alpha_steps, bool) or self.alpha_steps < 1):
            raise ValueError(f"alpha_steps ({self.alpha_steps}) must be >= 1, or null for the whole run")
        if self.max_budget < 1:
            raise ValueError(f"max_budget ({self.max_budget}) must be >= 1")


def cosine_kernel(length: float, target: float, width: float) -> float:
    """k(l; t, w) = (1 + cos(pi * min(1, |l - t| / w))) / 2: 1 at the target, 0 at distance >= w.

    A zero width is the limit of a narrowing kernel: 1 exactly at the target, 0 anywhere else.
    """
    if width < 0:
        raise ValueError(f"kernel width must be >= 0, got {width}")
    distance = abs(length - target)
    if width == 0:
        return 1.0 if distance == 0 else 0.0
    return (1.0 + math.cos(math.pi * min(1.0, distance / width))) / 2.0


def precise_budget_score(
    correct: bool, length: float, budget: float, alpha: float, cfg: RewardConfig | None = None
) -> float:
    """S: peaks at (1 - alpha) b (at least 0) when correct, at (1 + alpha) b when wrong ("think more")."""
    cfg = cfg or RewardConfig()
    width = alpha * budget
    if correct:
        kernel = cosine_kernel(length, max(0.0, (1.0 - alpha) * budget), width)
        return cfg.correct_min + (cfg.correct_max - cfg.correct_min) * kernel
    kernel = cosine_kernel(length, (1.0 + alpha) * budget, width)
    return cfg.wrong_min + (cfg.wrong_max - cfg.wrong_min) * kernel


def follow_score(correct: bool, length: float, user_budget: float | None, cfg: RewardConfig | None = None) -> float:
    """The follow term: follow_penalty x min(1, |l - b| / b) for a correct answer under a user budget b (for any
    answer with follow_over_accuracy, as in L1, so that a wrong answer cannot escape it), else 0."""
    cfg = cfg or RewardConfig()
    if not (correct or cfg.follow_over_accuracy) or user_budget is None or cfg.follow_penalty == 0:
        return 0.0
    return cfg.follow_penalty * min(1.0, abs(length - user_budget) / user_budget)


def is_missing(value: Any) -> bool:
    """Whether a dataset cell is empty: None, or the NaN a pandas column puts in place of a null."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def budget_penalty(budget: float, b_max: float | None, cfg: RewardConfig | None = None) -> float:
    """PB: r_b when the budget exceeds what the base model needed (b_max); None or NaN b_max is infinity."""
    cfg = cfg or RewardConfig()
    if is_missing(b_max) or budget <= b_max:
        return 0.0
    return cfg.budget_penalty


def alpha_at(step: float, total_steps: float, start: float = 6.0, end: float = 0.1) -> float:
    """Linear schedule alpha = start - (start - end) * step / total_steps, clamped between end and start."""
    if total_steps <= 0:
        return end
    alpha = start - (start - end) * step / total_steps
    return min(max(alpha, min(start, end)), max(start, end))


def selfbudgeter_reward(
    correct: bool,
    length: float,
    budget: float,
    b_max: float | None,
    alpha: float,
    cfg: RewardConfig | None = None,
) -> float:
    """R = S + PB for a well-formed completion (a broken one gets cfg.format_penalty instead)."""
    cfg = cfg or RewardConfig()
    return precise_budget_score(correct, length, budget, alpha, cfg) + budget_penalty(budget, b_max, cfg)


@dataclass(frozen=True)
class ScoredResponse:
    """What the reward needs to know about one response: format, budget, length, correctness."""

    format_ok: bool
    format_error: str | None  # FormatError.reason when the format is broken
    budget: int | None
    length: int  # solution tokens; whole-response tokens when the format is broken
    correct: bool
    predicted: str | None
    grading_error: str | None


def score_response(tokenizer: Any, response: str, gold: Any, max_budget: int | None = None, *,
                   extraction: str = grading.BOXED) -> ScoredResponse:
    """Parse, measure and grade one full response (budget tag included). Never raises on model output.

    A broken format is never graded: the answer must sit in a closed solution to count. `extraction` is
    `grading.grade`'s (strict "boxed" unless "lenient" is asked for).
    """
    parsed = try_parse(response, max_budget)
    if isinstance(parsed, FormatError):
        return ScoredResponse(False, parsed.reason, None, token_length(tokenizer, response), False, None, None)
    grade = grading.grade(parsed.solution, _gold_text(gold), extraction=extraction)
    return ScoredResponse(
        format_ok=True,
        format_error=None,
        budget=parsed.budget,
        length=token_length(tokenizer, parsed.solution),
        correct=bool(grade.correct) and grade.error is None,
        predicted=grade.predicted,
        grading_error=grade.error,
    )


def _gold_text(gold: Any) -> str:
    # Integer golds come from numeric dataset columns; a missing gold becomes "", which grades as an error.
    return "" if is_missing(gold) else str(gold)


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string, or a chat list `[{"role": "assistant", "content": ...}]`."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content") if isinstance(message, dict) else message
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}]
            parts.extend(block.get("text", "") for block in content if isinstance(block, dict))
    return "".join(parts)


def read_prefill(value: Any) -> int | None:
    """A row's `prefill_budget` cell as the user budget it carries, or None; anything but a positive integer is
    a UserError. The one reader of the column for the reward, relabelling and GRPO."""
    if is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():  # an int column with nulls read through pandas
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"prefill_budget must be a positive integer or null, got {value!r}")
    return value


def _prefill(budget: int) -> str:
    try:
        return render_prefill(budget)
    except FormatError as err:
        raise UserError(f"prefill_budget {budget} cannot be written into a prompt: {err}") from err


def _column(kwargs: dict[str, Any], name: str, n: int) -> list[Any]:
    values = kwargs.get(name)
    if values is None:
        return [None] * n
    if len(values) != n:
        raise UserError(f"column {name!r} has {len(values)} values for {n} completions")
    return list(values)


def _gold_column(kwargs: dict[str, Any], n: int) -> list[Any]:
    if kwargs.get("answer") is None:
        raise UserError("the training dataset needs an 'answer' column (the gold answer) for the reward")
    return _column(kwargs, "answer", n)


def _cache_key(text: str, gold: Any) -> tuple[str, str]:
    return text, repr(gold)


class _BoundedCache:
    """Least-recently-stored entries are dropped first. Pickles empty (a cache is not state)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def __reduce__(self):
        return type(self), (self.size,)

    def get(self, key: Any) -> Any:
        return self._items.get(key)

    def put(self, key: Any, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


@dataclass(frozen=True)
class _Parts:
    format: list[float]
    budget_penalty: list[float]
    precise_budget: list[float]
    follow: list[float]


class SelfBudgeterScorer:
    """Scores a TRL batch once and hands each of the three reward functions its part.

    TRL calls every reward function on the same batch; parsing, token counting and grading are cached on
    (response text, gold) so they run once per completion however many parts ask.
    """

    # A GRPO batch rarely holds more completions than this; older entries are dropped first.
    CACHE_SIZE = 4096

    def __init__(self, tokenizer: Any, cfg: RewardConfig | None = None):
        self.tokenizer = tokenizer
        self.cfg = cfg or RewardConfig()
        self._cache = _BoundedCache(self.CACHE_SIZE)

    def alpha(self, trainer_state: Any) -> float:
        if trainer_state is None:
            return self.cfg.alpha_start
        total = self.cfg.alpha_steps or trainer_state.max_steps
        return alpha_at(trainer_state.global_step, total, self.cfg.alpha_start, self.cfg.alpha_end)

    def score(self, response: str, gold: Any) -> ScoredResponse:
        key = _cache_key(response, gold)
        scored = self._cache.get(key)
        if scored is None:
            scored = score_response(self.tokenizer, response, gold, self.cfg.max_budget,
                                    extraction=self.cfg.answer_extraction)
            self._cache.put(key, scored)
        return scored

    def batch(self, completions: Sequence[Any], trainer_state: Any = None, **kwargs: Any) -> list[ScoredResponse]:
        n = len(completions)
        golds = _gold_column(kwargs, n)
        prefills = [read_prefill(v) for v in _column(kwargs, "prefill_budget", n)]
        responses = [
            completion_text(c) if b is None else _prefill(b) + completion_text(c) for c, b in zip(completions, prefills)
        ]
        return [self.score(r, g) for r, g in zip(responses, golds)]

    def parts(self, completions: Sequence[Any], trainer_state: Any = None, **kwargs: Any) -> _Parts:
        scored = self.batch(completions, **kwargs)
        b_maxes = _column(kwargs, "b_max", len(completions))
        prefills = [read_prefill(v) for v in _column(kwargs, "prefill_budget", len(completions))]
        alpha = self.alpha(trainer_state)
        fmt, pb, s, follow = [], [], [], []
        for item, b_max, user_budget in zip(scored, b_maxes, prefills):
            if not item.format_ok:
                fmt.append(self.cfg.format_penalty)
                pb.append(0.0)
                s.append(0.0)
                follow.append(0.0)
                continue
            fmt.append(0.0)
            pb.append(budget_penalty(item.budget, b_max, self.cfg))
            fixed = user_budget is not None and self.cfg.prefill_alpha is not None
            s.append(precise_budget_score(item.correct, item.length, item.budget,
                                          self.cfg.prefill_alpha if fixed else alpha, self.cfg))
            follow.append(follow_score(item.correct, item.length, user_budget, self.cfg))
        return _Parts(fmt, pb, s, follow)


def _warn_grading_failures(errors: Sequence[str | None]) -> None:
    """One warning per batch for the completions whose grading failed (they count as wrong)."""
    failed = [e for e in errors if e is not None]
    if failed:
        logger.warning(
            "%d of %d completions could not be graded and count as wrong (first error: %s)",
            len(failed),
            len(errors),
            failed[0],
        )


class _SelfBudgeterPart:
    """One of the three SelfBudgeter reward functions; a class, not a closure, so TRL can pickle it."""

    def __init__(self, scorer: SelfBudgeterScorer, part: str, name: str, reports: bool = False):
        self.scorer = scorer
        self.part = part
        self.__name__ = name
        # One of the three logs the batch's statistics, so they are not counted three times.
        self.reports = reports

    def __call__(self, prompts: Sequence[Any] = (), completions: Sequence[Any] = (), **kwargs: Any) -> list[float]:
        parts = self.scorer.parts(completions, **kwargs)
        if self.reports:
            scored = self.scorer.batch(completions, **kwargs)
            _warn_grading_failures([item.grading_error for item in scored])
            log_metric = kwargs.get("log_metric")
            if log_metric is not None and scored:
                _log_budget_metrics(log_metric, scored, self.scorer.alpha(kwargs.get("trainer_state")))
        return getattr(parts, self.part)


def _log_budget_metrics(log_metric: Callable[[str, float], None], scored: Sequence[ScoredResponse], alpha: float):
    ok = [s for s in scored if s.format_ok]
    log_metric("selfbudgeter/alpha", alpha)
    log_metric("selfbudgeter/format_ok", len(ok) / len(scored))
    log_metric("selfbudgeter/accuracy", sum(s.correct for s in scored) / len(scored))
    if ok:
        log_metric("selfbudgeter/mean_budget", sum(s.budget for s in ok) / len(ok))
        within = sum(within_tolerance(s.length, s.budget) for s in ok)
        log_metric("selfbudgeter/within_20", within / len(ok))


def make_reward_funcs(tokenizer: Any, cfg: RewardConfig | None = None) -> list[RewardFunc]:
    """The SelfBudgeter reward as three TRL reward functions whose per-completion sum is R.

    `format_reward` is r_fmt for a broken format and 0 otherwise; `budget_penalty_reward` is PB and
    `precise_budget_reward` is S for a well-formed completion, 0 otherwise; with a follow_penalty, `follow_reward`
    is the follow term. Dataset columns used: `answer`
    (gold, required), `b_max` (optional), `prefill_budget` (optional). alpha follows `trainer_state`
    (global_step / max_steps, or / cfg.alpha_steps); without one it is alpha_start.
    """
    scorer = SelfBudgeterScorer(tokenizer, cfg)
    funcs = [
        _SelfBudgeterPart(scorer, "format", "format_reward", reports=True),
        _SelfBudgeterPart(scorer, "budget_penalty", "budget_penalty_reward"),
        _SelfBudgeterPart(scorer, "precise_budget", "precise_budget_reward"),
    ]
    if scorer.cfg.follow_penalty != 0:
        funcs.append(_SelfBudgeterPart(scorer, "follow", "follow_reward"))
    return funcs


class _Grader:
    CACHE_SIZE = 4096

    def __init__(self, extraction: str = grading.BOXED) -> None:
        self.extraction = grading.check_extraction(extraction)
        self._cache = _BoundedCache(self.CACHE_SIZE)

    def grade(self, text: str, gold: Any) -> grading.Grade:
        key = _cache_key(text, gold)
        result = self._cache.get(key)
        if result is None:
            result = grading.grade(text, _gold_text(gold), extraction=self.extraction)
            self._cache.put(key, result)
        return result

    def correct(self, completions: Sequence[Any], kwargs: dict[str, Any]) -> list[bool]:
        golds = _gold_column(kwargs, len(completions))
        grades = [self.grade(completion_text(c), g) for c, g in zip(completions, golds)]
        _warn_grading_failures([g.error for g in grades])
        return [bool(g.correct) and g.error is None for g in grades]


class AccuracyReward:
    """GRPO's plain accuracy reward: 1.0 when the completion's final answer is right, else 0.0.

    No format requirement: the whole completion text is graded.
    """

    __name__ = "accuracy_reward"

    def __init__(self, extraction: str = grading.BOXED) -> None:
        self._grader = _Grader(extraction)

    def __call__(self, prompts: Sequence[Any] = (), completions: Sequence[Any] = (), **kwargs: Any) -> list[float]:
        return [1.0 if ok else 0.0 for ok in self._grader.correct(completions, kwargs)]


class KimiLengthReward:
    """Kimi k1.5's length reward (arXiv 2501.12599, section 2.3.3), to be added to an accuracy reward.

    Within a group of completions sharing a prompt, with lengths len(i) in tokens,

        lambda(i) = 0.5 - (len(i) - min_len) / (max_len - min_len)
        reward(i) = lambda(i)          if completion i is correct
        reward(i) = min(0, lambda(i))  if it is wrong

    so short correct answers are rewarded and long answers penalised whether right or wrong, while a short
    wrong answer is never rewarded. A group whose lengths are all equal carries no length signal: 0 for all.
    Lengths come from `completion_ids` when TRL passes them, otherwise from the tokenizer. Groups are formed
    from the completions TRL hands this process; with several processes a group may be split between them.
    """

    __name__ = "kimi_length_reward"

    def __init__(self, tokenizer: Any = None, extraction: str = grading.BOXED) -> None:
        self.tokenizer = tokenizer
        self._grader = _Grader(extraction)

    def _lengths(self, completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None) -> list[int]:
        if completion_ids is not None:
            return [len(ids) for ids in completion_ids]
        if self.tokenizer is None:
            raise UserError("kimi_length_reward needs completion_ids or a tokenizer to measure lengths")
        return [token_length(self.tokenizer, completion_text(c)) for c in completions]

    def __call__(
        self,
        prompts: Sequence[Any] = (),
        completions: Sequence[Any] = (),
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        correct = self._grader.correct(completions, kwargs)
        lengths = self._lengths(completions, completion_ids)
        prompts = list(prompts) if prompts else [None] * len(completions)
        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(repr(prompt), []).append(i)
        rewards = [0.0] * len(completions)
        for members in groups.values():
            low = min(lengths[i] for i in members)
            high = max(lengths[i] for i in members)
            if high == low:
                continue
            for i in members:
                lam = 0.5 - (lengths[i] - low) / (high - low)
                rewards[i] = lam if correct[i] else min(0.0, lam)
        return rewards


def make_accuracy_reward(tokenizer: Any = None, cfg: RewardConfig | None = None) -> list[RewardFunc]:
    return [AccuracyReward(cfg.answer_extraction if cfg else grading.BOXED)]


def make_kimi_length_reward(tokenizer: Any = None, cfg: RewardConfig | None = None) -> list[RewardFunc]:
    return [KimiLengthReward(tokenizer, cfg.answer_extraction if cfg else grading.BOXED)]


# Recipes name rewards by these keys; each value is a factory (tokenizer, cfg) -> reward functions. The
# Kimi baseline names both: [accuracy, kimi_length].
REWARDS: dict[str, Callable[[Any, RewardConfig | None], list[RewardFunc]]] = {
    "selfbudgeter": make_reward_funcs,
    "accuracy": make_accuracy_reward,
    "kimi_length": make_kimi_length_reward,
}


def build_reward_funcs(names: Sequence[str], tokenizer: Any, cfg: RewardConfig | None = None) -> list[RewardFunc]:
    """The reward functions of the named registry entries, in order."""
    unknown = [name for name in names if name not in REWARDS]
    if unknown:
        raise UserError(f"unknown reward(s) {', '.join(unknown)}; choose from: {', '.join(REWARDS)}")
    if not names:
        raise UserError(f"no reward named; choose from: {', '.join(REWARDS)}")
    return [func for name in names for func in REWARDS[name](tokenizer, cfg)]
