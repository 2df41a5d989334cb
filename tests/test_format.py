"""The budget format: render, strict parse, streaming parse. Run: .venv/bin/python -m pytest tests/test_format.py"""

from __future__ import annotations

import pytest

from selfbudgeter.core.format import (
    DEFAULT_MAX_BUDGET,
    TAGS,
    BudgetEvent,
    FormatError,
    FormatErrorEvent,
    ParsedResponse,
    SolutionEndEvent,
    StreamParser,
    TextEvent,
    parse_response,
    render_prefill,
    render_response,
    token_length,
    try_parse,
    validate_budget,
)

SOLUTIONS = [
    "2+3=5, so \\boxed{5}",
    "",
    "   leading and trailing spaces   ",
    "line one\nline two\n\\boxed{\\frac{1}{2}}",
    "a < b and b > c; html <b>bold</b>; almost a tag </solutio n",
    "ü, 中文, emoji 🙂 and \\boxed{x^2}",
    "The answer is 42.",
]


# --- render and parse round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [1, 7, 300, DEFAULT_MAX_BUDGET])
@pytest.mark.parametrize("solution", SOLUTIONS)
def test_round_trip(budget, solution):
    parsed = parse_response(render_response(budget, solution))
    assert parsed.budget == budget
    assert parsed.solution == solution


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<budget>5</budget><solution>so \\boxed{5}</solution>", ParsedResponse(5, "so \\boxed{5}", "5")),
        ("<budget>5</budget><solution>no answer</solution>", ParsedResponse(5, "no answer", None)),
        # whitespace around the response and between the two tags is allowed
        ("\n  <budget>12</budget>\n<solution>x</solution>\n\n", ParsedResponse(12, "x", None)),
        ("<budget>012</budget><solution>x</solution>", ParsedResponse(12, "x", None)),
    ],
)
def test_parse_response(text, expected):
    assert parse_response(text) == expected


def test_render_prefill():
    assert render_prefill(300) == "<budget>300</budget><solution>"
    assert render_response(300, "x") == render_prefill(300) + "x</solution>"


@pytest.mark.parametrize("budget", [0, -1, DEFAULT_MAX_BUDGET + 1, 2.5, True, None, "abc"])
def test_render_rejects_bad_budgets(budget):
    with pytest.raises(FormatError):
        render_prefill(budget)


# --- validate_budget ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, max_budget, expected",
    [
        (5, None, 5),
        ("5", None, 5),
        ("0005", None, 5),
        (DEFAULT_MAX_BUDGET, None, DEFAULT_MAX_BUDGET),
        ("100", 100, 100),
    ],
)
def test_validate_budget_accepts(value, max_budget, expected):
    assert validate_budget(value, max_budget) == expected


@pytest.mark.parametrize(
    "value, max_budget, reason",
    [
        # not a plain ASCII integer
        ("abc", None, "budget_not_integer"),
        ("5.0", None, "budget_not_integer"),
        ("+5", None, "budget_not_integer"),
        ("10**12", None, "budget_not_integer"),
        ("1e3", None, "budget_not_integer"),
        ("٣", None, "budget_not_integer"),  # Arabic-Indic three
        ("５", None, "budget_not_integer"),  # fullwidth five
        ("", None, "budget_not_integer"),
        (" 5", None, "budget_not_integer"),
        ("5 ", None, "budget_not_integer"),
        ("1,000", None, "budget_not_integer"),
        ("--5", None, "budget_not_integer"),
        (5.0, None, "budget_not_integer"),
        (True, None, "budget_not_integer"),
        (None, None, "budget_not_integer"),
        # not positive
        ("0", None, "budget_not_positive"),
        ("000", None, "budget_not_positive"),
        (0, None, "budget_not_positive"),
        ("-5", None, "budget_not_positive"),
        (-5, None, "budget_not_positive"),
        # over the cap
        (str(10**12), None, "budget_over_cap"),
        (10**12, None, "budget_over_cap"),
        (str(DEFAULT_MAX_BUDGET + 1), None, "budget_over_cap"),
        ("1" * 5000, None, "budget_over_cap"),  # longer than int() accepts: must not crash
        ("101", 100, "budget_over_cap"),
    ],
)
def test_validate_budget_rejects(value, max_budget, reason):
    with pytest.raises(FormatError) as info:
        validate_budget(value, max_budget)
    assert info.value.reason == reason


# --- every FormatError reason of the strict parser -------------------------------------------------------------

# (text, reason of parse_response, reason of StreamParser). The stream decides "no budget first" at the first
# character that cannot start `<budget>`, so it reports text before a budget tag as missing_budget.
MALFORMED = [
    # no budget first
    ("the answer is 5", "missing_budget", "missing_budget"),
    ("<solution>x</solution>", "missing_budget", "missing_budget"),
    ("I think <budget>5</budget><solution>x</solution>", "late_budget", "missing_budget"),
    # budget tag problems
    ("<budget>5<budget>6</budget><solution>x</solution>", "duplicate_budget", "duplicate_budget"),
    ("<budget>5</budget><budget>6</budget><solution>x</solution>", "duplicate_budget", "duplicate_budget"),
    ("<budget>5</budget><solution>x<budget>6</budget></solution>", "duplicate_budget", "duplicate_budget"),
    ("<budget>5</budget><solution>x</budget></solution>", "duplicate_budget", "duplicate_budget"),
    ("<budget>5", "unclosed_budget", "unclosed_budget"),
    ("<budget>5<solution>x</solution>", "unclosed_budget", "unclosed_budget"),
    # the budget value
    ("<budget>abc</budget><solution>x</solution>", "budget_not_integer", "budget_not_integer"),
    ("<budget>5.0</budget><solution>x</solution>", "budget_not_integer", "budget_not_integer"),
    ("<budget>+5</budget><solution>x</solution>", "budget_not_integer", "budget_not_integer"),
    ("<budget>10**12</budget><solution>x</solution>", "budget_not_integer", "budget_not_integer"),
    ("<budget>٣٠٠</budget><solution>x</solution>", "budget_not_integer", "budget_not_integer"),
    ("<budget></budget><solution>x</solution>", "budget_not_integer", "budget_not_integer"),
    ("<budget>0</budget><solution>x</solution>", "budget_not_positive", "budget_not_positive"),
    ("<budget>-5</budget><solution>x</solution>", "budget_not_positive", "budget_not_positive"),
    ("<budget>1000000000000</budget><solution>x</solution>", "budget_over_cap", "budget_over_cap"),
    # solution tag problems
    ("<budget>5</budget>", "missing_solution", "missing_solution"),
    ("<budget>5</budget>just text", "missing_solution", "missing_solution"),
    ("<budget>5</budget><solution>unfinished", "unclosed_solution", "unclosed_solution"),
    ("<budget>5</budget><solution>almost</solution", "unclosed_solution", "unclosed_solution"),
    ("<budget>5</budget><solution>a<solution>b</solution>", "duplicate_solution", "duplicate_solution"),
    ("<budget>5</budget><solution>a</solution> and more", "text_after_solution", "text_after_solution"),
    ("<budget>5</budget><solution>a</solution></solution>", "text_after_solution", "text_after_solution"),
]


@pytest.mark.parametrize("text, reason, _", MALFORMED)
def test_parse_response_reasons(text, reason, _):
    with pytest.raises(FormatError) as info:
        parse_response(text)
    assert info.value.reason == reason
    assert isinstance(try_parse(text), FormatError) and try_parse(text).reason == reason


def test_every_reason_is_tested():
    assert {reason for _, reason, _ in MALFORMED} == set(FormatError.REASONS)


def test_custom_cap():
    text = render_response(500, "x")
    assert parse_response(text, max_budget=500).budget == 500
    assert try_parse(text, max_budget=499).reason == "budget_over_cap"


def test_unknown_reason_is_a_bug():
    with pytest.raises(AssertionError):
        FormatError("no_such_reason")


def test_token_length_excludes_special_tokens():
    class Tokenizer:
        def encode(self, text, add_special_tokens=True):
            ids = [ord(c) for c in text]
            return [0, *ids, 1] if add_special_tokens else ids

    assert token_length(Tokenizer(), "hello") == 5
    assert token_length(Tokenizer(), "") == 0


# --- streaming ----------------------------------------------------------------------------------------------

VALID = [render_response(budget, solution) for budget, solution in zip([5, 300, 1, 131072, 42, 9, 77], SOLUTIONS)] + [
    "  \n<budget>12</budget>\n <solution>spaced\\boxed{1}</solution>\n",
    "<budget>8</budget><solution>a</solution>",
]


def stream(chunks, max_budget=None):
    parser = StreamParser(max_budget)
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.close()
    return parser, events


def splits(text):
    """Every way to cut the text in two, plus the whole text and one character at a time."""
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]


def check_valid_stream(text, chunks):
    parser, events = stream(chunks)
    expected = parse_response(text)
    budgets = [e for e in events if isinstance(e, BudgetEvent)]
    assert budgets == [BudgetEvent(expected.budget)]
    assert events[0] == budgets[0]
    assert not [e for e in events if isinstance(e, FormatErrorEvent)]
    assert events[-1] == SolutionEndEvent()
    assert sum(isinstance(e, SolutionEndEvent) for e in events) == 1
    texts = [e.text for e in events if isinstance(e, TextEvent)]
    assert all(texts)  # no empty text events
    assert "".join(texts) == expected.solution
    assert parser.done and parser.budget == expected.budget and parser.error is None


@pytest.mark.parametrize("text", VALID)
def test_stream_every_split(text):
    for chunks in splits(text):
        check_valid_stream(text, chunks)


def test_stream_every_three_way_split():
    text = "<budget>3</budget><solution>a<b</solution>"
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            check_valid_stream(text, [text[:i], text[i:j], text[j:]])


@pytest.mark.parametrize("text", VALID)
def test_stream_reports_budget_as_soon_as_it_closes(text):
    prefix = text[: text.index("</budget>") + len("</budget>")]
    parser = StreamParser()
    events = [e for chunk in prefix for e in parser.feed(chunk)]
    assert events == [BudgetEvent(parse_response(text).budget)]


@pytest.mark.parametrize("text", VALID)
def test_stream_never_leaks_tag_characters(text):
    # Fed one character at a time, no text event may hold any piece of a tag that belongs to the format.
    _, events = stream(list(text))
    for event in events:
        if isinstance(event, TextEvent):
            assert not any(tag in event.text for tag in TAGS)


@pytest.mark.parametrize("text, _, reason", MALFORMED)
def test_stream_malformed_every_split(text, _, reason):
    for chunks in splits(text):
        parser, events = stream(chunks)
        errors = [e for e in events if isinstance(e, FormatErrorEvent)]
        assert [e.reason for e in errors] == [reason], chunks
        assert parser.error == errors[0]


def test_stream_passes_text_through_after_an_error():
    text = "no budget here, just an answer: 5"
    for chunks in splits(text):
        _, events = stream(chunks)
        assert events[0] == FormatErrorEvent("missing_budget", events[0].detail)
        assert "".join(e.text for e in events if isinstance(e, TextEvent)) == text


def test_stream_keeps_the_solution_after_a_bad_budget():
    _, events = stream(list("<budget>0</budget><solution>still shown</solution>"))
    assert [type(e) for e in events][0] is FormatErrorEvent
    assert "".join(e.text for e in events if isinstance(e, TextEvent)) == "still shown"
    assert events[-1] == SolutionEndEvent()


def test_stream_unfinished_solution_keeps_its_text():
    _, events = stream(["<budget>5</budget><solution>partial ans", "wer </sol"])
    assert events[0] == BudgetEvent(5)
    assert "".join(e.text for e in events if isinstance(e, TextEvent)) == "partial answer "
    assert [e.reason for e in events if isinstance(e, FormatErrorEvent)] == ["unclosed_solution"]


def test_stream_empty():
    parser, events = stream([])
    assert [e.reason for e in events if isinstance(e, FormatErrorEvent)] == ["missing_budget"]
    assert parser.done


def test_stream_custom_cap():
    _, events = stream([render_response(600, "x")], max_budget=500)
    assert [e.reason for e in events if isinstance(e, FormatErrorEvent)] == ["budget_over_cap"]


def test_stream_gives_up_on_an_endless_budget_tag():
    # A model that never closes the tag is reported long before the stream ends.
    parser = StreamParser()
    events = parser.feed("<budget>") + [e for _ in range(100) for e in parser.feed("9")]
    assert [e.reason for e in events if isinstance(e, FormatErrorEvent)] == ["unclosed_budget"]
    assert parser.error is not None and not parser.done
