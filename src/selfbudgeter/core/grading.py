"""Answer extraction and grading: the one owner of "what is the final answer" and "is it right".

Extraction order: the last `\\boxed{...}` (nested braces), then GSM8K's `#### n`, then "the answer is ...".
This strict extraction (`extraction="boxed"`) is the default everywhere and the only one the paper's
benchmarks are graded with. `extraction="lenient"` (`extract_answer_lenient`) is opt-in, for models that
answer in prose without boxing: after the strict rules find nothing, it takes the result of the last "= N",
else the last number in the text.

Equivalence is math-verify's, always called as `verify(gold, prediction)` (the order matters: it is not
symmetric). Where this module departs from calling math-verify on the raw strings:

1. Bare LaTeX is wrapped in `$...$` first: math-verify parses a bare `\\frac{1}{2}` to nothing.
2. Plain numbers (`1,000`, `$18`, `18.0`, `-3`) are compared exactly, without math-verify, whenever the
   verdict is certain to be math-verify's own (equal values, or two different integers). This is the
   common case for GSM8K and the embedded task, and it is about a thousand times faster.
3. A number followed by plain words (`18 dollars`, from "the answer is 18 dollars") is read as the number:
   math-verify would read the words as a product of symbols.
4. math-verify's `signal.alarm` timeout is used only on the main thread (it raises anywhere else); off the
   main thread no timeout applies. Every failure of math-verify itself (an exception, a timeout, a gold
   answer it cannot parse) surfaces as `Grade.error` / `GradingError`, never as a silent "wrong".

math-verify (and sympy behind it) is imported on first use, so importing this module stays instant.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable

logger = logging.getLogger(__name__)

_BOXED = ("\\boxed{", "\\fbox{")
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.\s*)?$", re.IGNORECASE | re.MULTILINE)

# math-verify's own default, per comparison and per parse; only enforceable on the main thread.
DEFAULT_TIMEOUT_SECONDS = 5

# A plain decimal number, optionally with comma thousands separators ("1,000,000" but not "1,00" or "2,3").
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+", re.ASCII)
_NUMBER_THEN_WORDS = re.compile(rf"({_NUMBER.pattern})\s+[A-Za-z][A-Za-z ]*\.?", re.ASCII)
# Decoration around a number that never changes its value.
_DECORATION = re.compile(r"\\\$|\$|\\[,!; ]|^\\\(|\\\)$")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


# The answer extractions `grade` knows: strict (the default) and lenient (opt-in, never the paper's).
BOXED, LENIENT = "boxed", "lenient"
EXTRACTIONS = (BOXED, LENIENT)
# The help text of every command's answer-extraction option.
EXTRACTION_HELP = ("how the final answer is read: boxed (\\boxed{}, '#### n' or 'the answer is'; the paper's, the "
                   "default) or lenient (opt-in for a model that answers in prose: also the last '= N', else the "
                   "last number; docs/grading.md)")

# A number as prose writes it: a minus sign only where it cannot be subtraction ("10-5" is 10 and 5), comma
# thousands ("1,000"), decimals; not the digits inside a word ("H2O") or after a decimal point.
_PROSE_NUMBER = r"(?:(?<![\w)\].])-)?(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])"
_LAST_NUMBER = re.compile(_PROSE_NUMBER)
# "= 23", "= $1,000", "=-4": the first number after an equals sign (not "==", "<=", ">=", "!=").
_EQUALS_NUMBER = re.compile(r"(?<![=<>!])=(?!=)\s*(?:\\?\$\s*)?(" + _PROSE_NUMBER + ")")


class GradingError(RuntimeError):
    """Grading itself failed (math-verify raised, timed out, or could not read the gold answer)."""


@dataclass(frozen=True)
class Grade:
    correct: bool
    predicted: str | None  # the extracted final answer, None when the response has none
    error: str | None = None  # set when grading failed; `correct` is then False and must not be trusted


def _last_boxed(text: str) -> str | None:
    start = max(text.rfind(tag) for tag in _BOXED)
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # unbalanced: no answer rather than a truncated one


def extract_answer(text: str) -> str | None:
    """The final answer of a solution, or None when there is none."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    said = _ANSWER_IS.findall(text)
    if said:
        return said[-1].strip().rstrip(".")
    return None


def extract_answer_lenient(text: str) -> str | None:
    """The final answer of a response that may not box it, or None when it has no number at all. Opt-in only.

    First what `extract_answer` finds (a boxed answer, `#### n`, "the answer is ..."); else the result of the
    last "= N" ("so 9 + 14 = 23 apples" -> "23"); else the last number in the text ("Tom has 12 apples now."
    -> "12"). Numbers keep their sign where it cannot be a subtraction ("-4", but "10-5" ends in "5") and
    their comma thousands ("1,000", which grading reads as 1000).

    It grades a model that answers in prose, at a cost: any number can be taken for the answer, so it is
    looser than the strict extraction on purpose (docs/grading.md measures it on GSM8K's prose solutions).
    Never the default, and never used for the paper's benchmarks.
    """
    strict = extract_answer(text)
    if strict is not None:
        return strict
    equals = _EQUALS_NUMBER.findall(text)
    if equals:
        return equals[-1]
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1] if numbers else None


def check_extraction(extraction: str) -> str:
    """`extraction` when it is one of EXTRACTIONS, else a ValueError naming them."""
    if extraction not in EXTRACTIONS:
        raise ValueError(f"answer extraction must be one of {', '.join(EXTRACTIONS)}, not {extraction!r}")
    return extraction


def extractor(extraction: str) -> Callable[[str], str | None]:
    """The function `extraction` names: `extract_answer` (boxed) or `extract_answer_lenient`; else a ValueError."""
    return extract_answer if check_extraction(extraction) == BOXED else extract_answer_lenient


def gsm8k_answer(solution: str) -> str | None:
    """The gold answer of a GSM8K worked solution (the number after `####`), thousands commas removed."""
    hashes = _HASHES.findall(solution)
    if not hashes:
        return None
    answer = hashes[-1].strip()
    number = parse_number(answer)
    return _plain(number) if number is not None else answer


def parse_number(text: str) -> Decimal | None:
    """The value of `text` if it is a plain decimal number (commas, `$`, spaces allowed), else None."""
    body = _DECORATION.sub("", text).strip().rstrip(".").strip()
    if not _NUMBER.fullmatch(body):
        return None
    try:
        return Decimal(body.replace(",", ""))
    except InvalidOperation:
        return None


def _plain(number: Decimal) -> str:
    """Canonical text of a number: no exponent, no trailing zeros after the point ("18.50" -> "18.5")."""
    text = format(number, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "+0", "") else text


def _strip_unit_words(answer: str) -> str:
    match = _NUMBER_THEN_WORDS.fullmatch(answer.strip())
    return match.group(1) if match else answer


def _numbers_verdict(pred: str, gold: str) -> bool | None:
    """The verdict for two plain numbers when it is certain, else None (leave it to math-verify)."""
    a, b = parse_number(pred), parse_number(gold)
    if a is None or b is None:
        return None
    if a == b:
        return True
    if a == a.to_integral_value() and b == b.to_integral_value():
        return False
    # Two different decimals: math-verify rounds (0.333333 == 0.3333334), so its verdict is the rule.
    return None


def _wrap(latex: str) -> str:
    """Math mode for math-verify: bare LaTeX (`\\frac{1}{2}`) parses to nothing outside it."""
    if _UNESCAPED_DOLLAR.search(latex) or "\\(" in latex or "\\[" in latex:
        return latex
    return f"${latex}$"


def _timeout_here(timeout_seconds: int | None) -> int | None:
    # signal.alarm only works on the main thread of the main interpreter; math-verify raises elsewhere.
    if threading.current_thread() is threading.main_thread():
        return timeout_seconds
    return None


@functools.lru_cache(maxsize=8192)
def _parse(text: str, timeout_seconds: int | None) -> list:
    from math_verify import parse

    # Parsed values are immutable sympy objects, so sharing them between calls is safe. Golds repeat a lot
    # (every rollout of a prompt is graded against the same one); exceptions are not cached.
    return parse(text, parsing_timeout=timeout_seconds, raise_on_error=True)


def _math_verify(pred: str, gold: str, timeout_seconds: int | None) -> bool:
    from math_verify import verify
    from math_verify.errors import TimeoutException

    timeout = _timeout_here(timeout_seconds)
    try:
        gold_parsed = _parse(_wrap(gold), timeout)
        if not gold_parsed:
            raise GradingError(f"math-verify cannot read the gold answer {gold[:80]!r}")
        pred_parsed = _parse(_wrap(pred), timeout)
        if not pred_parsed:
            return False
        return verify(gold_parsed, pred_parsed, timeout_seconds=timeout, raise_on_error=True)
    except GradingError:
        raise
    # TimeoutException derives from BaseException, so `Exception` alone would let it escape.
    except (Exception, TimeoutException) as err:
        raise GradingError(f"math-verify failed on {pred[:80]!r} vs gold {gold[:80]!r}: {err!r}") from err


def answers_match(predicted: str, gold: str, *, timeout_seconds: int | None = DEFAULT_TIMEOUT_SECONDS) -> bool:
    """Whether an extracted answer equals the gold answer. Raises GradingError when grading fails."""
    gold = str(gold).strip()  # numeric dataset columns arrive as int or float
    if not gold:
        raise GradingError("empty gold answer")
    predicted = _strip_unit_words(predicted)
    if not predicted.strip():
        return False
    verdict = _numbers_verdict(predicted, gold)
    if verdict is not None:
        return verdict
    return _math_verify(predicted, gold, timeout_seconds)


def grade(response_text: str, gold: str, *, timeout_seconds: int | None = DEFAULT_TIMEOUT_SECONDS,
          extraction: str = BOXED) -> Grade:
    """Grade a response against a gold answer. Never raises for a grading failure: see `Grade.error`.

    `extraction` is "boxed" (the default: `extract_answer`) or "lenient" (opt-in: `extract_answer_lenient`);
    any other value is a ValueError.
    """
    predicted = extractor(extraction)(response_text)
    if not str(gold).strip():
        # Checked before extraction: a missing gold is a data problem even when the response has no answer.
        return Grade(correct=False, predicted=predicted, error="empty gold answer")
    if predicted is None:
        return Grade(correct=False, predicted=None)
    try:
        correct = answers_match(predicted, gold, timeout_seconds=timeout_seconds)
    except GradingError as err:
        logger.debug("grading failed: %s", err)
        return Grade(correct=False, predicted=predicted, error=str(err))
    return Grade(correct=correct, predicted=predicted)


def is_correct(response_text: str, gold: str, *, timeout_seconds: int | None = DEFAULT_TIMEOUT_SECONDS,
               extraction: str = BOXED) -> bool:
    """Whether a response's final answer equals the gold answer. Raises GradingError when grading fails."""
    result = grade(response_text, gold, timeout_seconds=timeout_seconds, extraction=extraction)
    if result.error is not None:
        raise GradingError(result.error)
    return result.correct
