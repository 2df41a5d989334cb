"""The budget format: the one module that knows `<budget>N</budget><solution>...</solution>`.

Every response of a self-budgeting model has the shape

    <budget>N</budget><solution> reasoning and final answer </solution>

where N is the number of tokens of the solution *content* (the text between the solution tags) in the
model's own tokenizer. Rendering, strict parsing, incremental (streaming) parsing and token counting live
here; data building, rewards, evaluation, the generator and the server call these functions and never
re-implement the grammar. No torch import: tokenizers are duck-typed (anything with `encode`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from .grading import extract_answer

BUDGET_OPEN = "<budget>"
BUDGET_CLOSE = "</budget>"
SOLUTION_OPEN = "<solution>"
SOLUTION_CLOSE = "</solution>"
TAGS = (BUDGET_OPEN, BUDGET_CLOSE, SOLUTION_OPEN, SOLUTION_CLOSE)

# B_cap of METHOD.md: a budget above it is a format failure. 2**17 covers every context length in use today.
DEFAULT_MAX_BUDGET = 131072

_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() would accept unicode digits such as "٣".
_NEGATIVE = re.compile(r"-[0-9]+")
# A budget tag that never closes is given up on after this many characters (a 6-digit budget needs 23).
_MAX_BUDGET_TAG_CHARS = 64


class FormatError(ValueError):
    """A response that does not follow the budget format. `reason` is a stable machine-readable code."""

    REASONS = (
        "missing_budget",  # no budget tag at all
        "late_budget",  # text before the budget tag
        "duplicate_budget",  # a second budget tag
        "unclosed_budget",  # `<budget>` without `</budget>`
        "budget_not_integer",  # "abc", "5.0", "+5", "10**12", unicode digits, empty
        "budget_not_positive",  # "0", "-5"
        "budget_over_cap",  # above max_budget
        "missing_solution",  # no `<solution>` right after the budget
        "unclosed_solution",  # `<solution>` without `</solution>`
        "duplicate_solution",  # a second solution tag inside the solution
        "text_after_solution",  # anything but whitespace after `</solution>`
    )

    def __init__(self, reason: str, detail: str = ""):
        assert reason in self.REASONS, reason
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class ParsedResponse:
    budget: int
    solution: str  # the text between the solution tags
    answer_text: str | None  # the final answer found in the solution (see grading.extract_answer)


def render_response(budget: int, solution: str) -> str:
    """A complete response: budget tag, then the solution wrapped in its tags."""
    return f"{render_prefill(budget)}{solution}{SOLUTION_CLOSE}"


def render_prefill(budget: int) -> str:
    """The start of an assistant turn whose budget was set by the user; the model continues the solution."""
    return f"{BUDGET_OPEN}{validate_budget(budget)}{BUDGET_CLOSE}{SOLUTION_OPEN}"


def validate_budget(budget: object, max_budget: int | None = None) -> int:
    """Check a budget given as an int or as the text inside a budget tag; return it as an int.

    Accepts only plain ASCII decimal integers in [1, max_budget]: no sign, no decimal point, no exponent,
    no unicode digits, no surrounding spaces. Raises FormatError with a specific reason otherwise.
    """
    cap = DEFAULT_MAX_BUDGET if max_budget is None else max_budget
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise FormatError("budget_not_integer", f"expected an integer, got {type(budget).__name__}")
    text = str(budget)
    if _NEGATIVE.fullmatch(text):
        raise FormatError("budget_not_positive", f"budget {text} is negative")
    if not _DIGITS.fullmatch(text):
        raise FormatError("budget_not_integer", f"budget {text[:20]!r} is not a plain integer")
    # Compare lengths first: int() of a huge digit string is slow (and refused past 4300 digits).
    if len(text.lstrip("0")) > len(str(cap)) or int(text) > cap:
        raise FormatError("budget_over_cap", f"budget {text[:20]} exceeds the cap of {cap}")
    value = int(text)
    if value == 0:
        raise FormatError("budget_not_positive", "budget 0 leaves no room for a solution")
    return value


def parse_response(text: str, max_budget: int | None = None) -> ParsedResponse:
    """Strictly parse a complete response. Leading and trailing whitespace is allowed, nothing else."""
    body = text.strip()
    start = body.find(BUDGET_OPEN)
    if start < 0:
        raise FormatError("missing_budget", "no <budget> tag")
    if start > 0:
        raise FormatError("late_budget", f"{start} characters before the <budget> tag")
    close = body.find(BUDGET_CLOSE)
    if close < 0:
        raise FormatError("unclosed_budget", "no </budget> tag")
    inner = body[len(BUDGET_OPEN) : close]
    if BUDGET_OPEN in inner:
        raise FormatError("duplicate_budget", "a second <budget> tag before </budget>")
    budget = validate_budget(inner, max_budget)
    rest = body[close + len(BUDGET_CLOSE) :]
    if BUDGET_OPEN in rest or BUDGET_CLOSE in rest:
        raise FormatError("duplicate_budget", "a second budget tag after the first")
    rest = rest.lstrip()
    if not rest.startswith(SOLUTION_OPEN):
        raise FormatError("missing_solution", "no <solution> tag after the budget")
    rest = rest[len(SOLUTION_OPEN) :]
    end = rest.find(SOLUTION_CLOSE)
    if end < 0:
        raise FormatError("unclosed_solution", "no </solution> tag")
    solution = rest[:end]
    if SOLUTION_OPEN in solution:
        raise FormatError("duplicate_solution", "a second <solution> tag inside the solution")
    if rest[end + len(SOLUTION_CLOSE) :].strip():
        raise FormatError("text_after_solution", "text after </solution>")
    return ParsedResponse(budget=budget, solution=solution, answer_text=extract_answer(solution))


def try_parse(text: str, max_budget: int | None = None) -> ParsedResponse | FormatError:
    """`parse_response` that returns the FormatError instead of raising it (for batch scoring)."""
    try:
        return parse_response(text, max_budget)
    except FormatError as err:
        return err


def token_length(tokenizer: Tokenizer, text: str) -> int:
    """Number of tokens of `text` in `tokenizer`, without BOS/EOS: the unit of every budget and length."""
    return len(tokenizer.encode(text, add_special_tokens=False))


# --- streaming -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetEvent:
    budget: int


@dataclass(frozen=True)
class TextEvent:
    text: str


@dataclass(frozen=True)
class SolutionEndEvent:
    """`</solution>` was seen: the response is complete."""


@dataclass(frozen=True)
class FormatErrorEvent:
    reason: str
    detail: str = ""


StreamEvent = BudgetEvent | TextEvent | SolutionEndEvent | FormatErrorEvent


def _partial_suffix(buffer: str, tag: str) -> int:
    """Length of the longest suffix of `buffer` that is a proper prefix of `tag` (text that may become it)."""
    for n in range(min(len(tag) - 1, len(buffer)), 0, -1):
        if buffer.endswith(tag[:n]):
            return n
    return 0


class StreamParser:
    """Incremental parser: feed decoded text pieces, get events.

    It reports the budget the moment `</budget>` is complete, then passes solution text through. Text that
    could still turn into a tag is held back, so tag characters never reach a TextEvent whatever the chunk
    boundaries. A response that breaks the format yields one FormatErrorEvent; the parser then passes the
    remaining text through as plain text (so a model that ignores the format is still readable).
    """

    def __init__(self, max_budget: int | None = None):
        self.max_budget = max_budget
        self.budget: int | None = None
        self.error: FormatErrorEvent | None = None
        self._state = "budget"  # budget -> gap -> solution -> done; or raw after an error
        self._buffer = ""

    @property
    def done(self) -> bool:
        return self._state == "done"

    def feed(self, text: str) -> list[StreamEvent]:
        self._buffer += text
        events: list[StreamEvent] = []
        while True:
            step = getattr(self, f"_step_{self._state}")(events)
            if not step:
                return events

    def close(self) -> list[StreamEvent]:
        """End of stream: flush what is held back and report an incomplete response."""
        events: list[StreamEvent] = []
        if self._state == "raw":
            if self._buffer:
                events.append(TextEvent(self._buffer))
        elif self._state == "budget":
            has_open = self._buffer.lstrip().startswith(BUDGET_OPEN)
            self._fail(events, "unclosed_budget" if has_open else "missing_budget", "stream ended")
            if self._buffer:
                events.append(TextEvent(self._buffer))
        elif self._state in ("gap", "solution"):
            # Whatever is held back in the solution is a partial closing tag: tag characters, never text.
            self._fail(events, "missing_solution" if self._state == "gap" else "unclosed_solution", "stream ended")
        self._buffer = ""
        self._state = "done"
        return events

    def _fail(self, events: list[StreamEvent], reason: str, detail: str) -> None:
        if self.error is None:
            self.error = FormatErrorEvent(reason, detail)
            events.append(self.error)

    def _step_budget(self, events: list[StreamEvent]) -> bool:
        head = self._buffer.lstrip()
        if not head:
            return False
        if not head.startswith(BUDGET_OPEN):
            if BUDGET_OPEN.startswith(head):
                return False  # a prefix of the tag: wait for more
            # Decided at the first character that cannot begin the tag, before any later `<budget>` can be
            # seen: "late_budget" here would depend on how the stream happens to be chunked.
            self._fail(events, "missing_budget", "the response does not start with <budget>")
            self._state = "raw"
            return True
        # Only a tag complete within the limit counts, whatever the chunking (the whole text in one piece or not).
        close = head.find(BUDGET_CLOSE, 0, _MAX_BUDGET_TAG_CHARS)
        if close < 0:
            if len(head) >= _MAX_BUDGET_TAG_CHARS:
                self._fail(events, "unclosed_budget", "no </budget> within the budget tag")
                self._state = "raw"
                return True
            return False
        try:
            inner = head[len(BUDGET_OPEN) : close]
            if BUDGET_OPEN in inner:
                raise FormatError("duplicate_budget", "a second <budget> tag before </budget>")
            self.budget = validate_budget(inner, self.max_budget)
        except FormatError as err:
            # A bad budget is reported, but the solution that follows is still parsed (tags stay hidden).
            self._fail(events, err.reason, err.detail)
            self._buffer = head[close + len(BUDGET_CLOSE) :]
            self._state = "gap"
            return True
        events.append(BudgetEvent(self.budget))
        self._buffer = head[close + len(BUDGET_CLOSE) :]
        self._state = "gap"
        return True

    def _step_gap(self, events: list[StreamEvent]) -> bool:
        head = self._buffer.lstrip()
        if not head:
            return False
        if head.startswith(SOLUTION_OPEN):
            self._buffer = head[len(SOLUTION_OPEN) :]
            self._state = "solution"
            return True
        if any(tag.startswith(head) for tag in (SOLUTION_OPEN, BUDGET_OPEN, BUDGET_CLOSE)):
            return False
        if head.startswith((BUDGET_OPEN, BUDGET_CLOSE)):
            self._fail(events, "duplicate_budget", "a second budget tag after the first")
        else:
            self._fail(events, "missing_solution", "no <solution> after the budget")
        self._state = "raw"
        return True

    def _step_solution(self, events: list[StreamEvent]) -> bool:
        # Any tag ends the solution text: `</solution>` properly, the others as the errors parse_response
        # reports for them; either way no tag reaches a TextEvent.
        found = [(i, tag) for tag in TAGS if (i := self._buffer.find(tag)) >= 0]
        if found:
            end, tag = min(found)
            if self._buffer[:end]:
                events.append(TextEvent(self._buffer[:end]))
            if tag != SOLUTION_CLOSE:
                reason = "duplicate_solution" if tag == SOLUTION_OPEN else "duplicate_budget"
                self._fail(events, reason, f"{tag} inside the solution")
                self._buffer = self._buffer[end:]
                self._state = "raw"
                return True
            events.append(SolutionEndEvent())
            self._buffer = self._buffer[end + len(SOLUTION_CLOSE) :]
            self._state = "done"
            return True
        hold = max(_partial_suffix(self._buffer, tag) for tag in TAGS)
        ready = self._buffer[: len(self._buffer) - hold]
        if ready:
            events.append(TextEvent(ready))
        self._buffer = self._buffer[len(ready) :]
        return False

    def _step_done(self, events: list[StreamEvent]) -> bool:
        if self._buffer.strip():
            self._fail(events, "text_after_solution", "text after </solution>")
        self._buffer = ""
        return False

    def _step_raw(self, events: list[StreamEvent]) -> bool:
        if self._buffer:
            events.append(TextEvent(self._buffer))
            self._buffer = ""
        return False
