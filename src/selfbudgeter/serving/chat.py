"""`selfbudgeter chat`: ask a model a question and see its token budget, and so the wait, at once.

Interactive use shows the budget and ETA as soon as the model states it and asks whether to continue
(generation goes on meanwhile, so saying yes costs no time); the solution then streams under a progress
bar of tokens used against the budget. Ctrl-C once asks for the answer now, twice stops. Without
`--question` it is a loop over questions until end of input; `--question TEXT --json` prints one JSON
object for scripts.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from ..core.errors import UserError
from ..core.grading import BOXED, EXTRACTION_HELP, EXTRACTIONS

FINISH_TEXT = {
    "finished": "the model finished its solution",
    "stopped": "stopped",
    "answered_early": "answered early (reasoning cut short)",
    "length": "hit the token limit",
    "format_error": "the response broke the budget format",
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfbudgeter chat",
        description="Ask a self-budgeting model a question: its budget and ETA come first; Ctrl-C once answers "
        "now, twice stops.",
    )
    parser.add_argument("--model", required=True, help="model directory, hub id, or 'embedded'")
    # A string, validated by the budget grammar: argparse's int() would print usage on "abc" and accept "+5".
    parser.add_argument("--budget", help="set the token budget yourself instead of letting the model estimate it")
    parser.add_argument("--yes", action="store_true", help="continue without asking once the budget is known")
    parser.add_argument("--question", help="ask this one question and exit (no loop)")
    parser.add_argument("--json", action="store_true", help="with --question: print one JSON object, nothing else")
    parser.add_argument("--enforce", action="store_true", help="answer by itself at budget x (1 + slack) tokens")
    parser.add_argument("--slack", type=float, default=0.2, help="overrun allowed by --enforce (default 0.2)")
    parser.add_argument("--answer-cap", type=int, default=32, help="max tokens of an answer forced early (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="hard cap on generated tokens")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 for greedy (default 0.6)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--answer-extraction", "--answer_extraction", dest="answer_extraction", default=BOXED,
                        choices=EXTRACTIONS, help=EXTRACTION_HELP)
    return parser


def _budget_arg(text: str | None) -> int | None:
    if text is None:
        return None
    from ..core.format import DEFAULT_MAX_BUDGET, FormatError, validate_budget

    try:
        return validate_budget(text)
    except FormatError as err:
        why = {
            "budget_not_positive": "a budget must be at least 1 token",
            "budget_over_cap": f"a budget can be at most {DEFAULT_MAX_BUDGET} tokens",
        }.get(err.reason, "a budget is a whole number of tokens, like 300")
        raise UserError(f"invalid --budget {text[:24]!r}: {why}") from None


def _request(args: argparse.Namespace, question: str, budget: int | None):
    from .generator import GenerationRequest

    return GenerationRequest(
        question=question,
        budget=budget,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        enforce_budget=args.enforce,
        slack=args.slack,
        answer_cap=args.answer_cap,
    )


def _json_result(final, question: str, budget_event) -> dict[str, Any]:
    return {
        "question": question,
        "budget": final.budget,
        "budget_source": final.budget_source,
        "eta_seconds": None if budget_event is None else round(budget_event.eta_seconds, 4),
        "seconds_to_budget": final.seconds_to_budget,
        "seconds_total": final.seconds_total,
        "used_tokens": final.used_tokens,
        "generated_tokens": final.generated_tokens,
        "within_budget": final.within_budget,
        "answer": final.answer,
        "finish_reason": final.finish_reason,
        "format_error": final.format_error,
        "solution": final.solution,
    }


def _ask_continue(console) -> bool:
    """Continue? [Y/n]; end of input counts as yes (nobody there to say no)."""
    while True:
        try:
            reply = console.input("Continue? [Y/n] ").strip().lower()
        except EOFError:
            return True
        if reply in ("", "y", "yes"):
            return True
        if reply in ("n", "no"):
            return False
        console.print("Please answer y or n.")


class _Interrupts:
    """Ctrl-C while a solution streams: the first asks for the answer now, the second stops."""

    def __init__(self, handle, console):
        self.handle, self.console, self.count = handle, console, 0

    def __call__(self, signum, frame) -> None:
        self.count += 1
        if self.count == 1:
            self.handle.answer_now()
            self.console.print("[yellow]Answering now (Ctrl-C again to stop)…[/yellow]")
        else:
            self.handle.stop()

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)


def _budget_line(event) -> str:
    who = "your budget" if event.source == "user" else "model's estimate"
    return f"Budget: {event.budget} tokens ({who}) · ETA {event.eta_seconds:.1f} s"


def run_interactive(generator, args: argparse.Namespace, question: str, budget: int | None, console) -> Any:
    """Ask one question with budget line, confirmation, streamed solution and summary; returns the FinalEvent."""
    from .generator import BudgetEvent, FinalEvent

    handle = generator.submit(_request(args, question, budget))
    events = iter(handle)
    final = None
    budget_event = None
    try:
        for event in events:  # up to the budget (or the end, for a model that never states one)
            if isinstance(event, BudgetEvent):
                budget_event = event
                console.print(_budget_line(event), markup=False, highlight=False)
                break
            if isinstance(event, FinalEvent):
                final = event
                break
        if final is None and budget_event is None:
            console.print("The model did not state a budget.")
        if final is None and budget_event is not None and budget_event.source == "model" and not args.yes:
            if not _ask_continue(console):
                handle.stop()
    except KeyboardInterrupt:
        handle.stop()
    if final is None:
        final = _stream(handle, events, budget_event, console)
    elif final.solution:
        console.print(final.solution, markup=False, highlight=False)
    _summary(final, console)
    return final


def _stream(handle, events, budget_event, console):
    """The solution as it streams, above a bar of tokens used against the budget; returns the FinalEvent."""
    from rich.console import Group
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.text import Text

    from .generator import FinalEvent, TextEvent

    total = budget_event.budget if budget_event is not None else None
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.fields[budget]} tokens"),
        TextColumn("ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
        console=console,
    )
    task = progress.add_task("solving", total=total, budget=total or "?", eta="?")
    solution = ""
    final = None

    def view():
        # Only the tail fits on screen while streaming; the whole solution is printed once it is done.
        tail = solution[-console.width * 8 :]
        return Group(Text(tail), progress)

    with _Interrupts(handle, console), Live(view(), console=console, transient=True, refresh_per_second=12) as live:
        for event in events:
            if isinstance(event, TextEvent):
                solution += event.text
                eta = "-" if event.eta_seconds is None else f"{event.eta_seconds:.1f}s"
                description = "answering" if event.phase == "answer" else "solving"
                progress.update(task, completed=event.used_tokens, eta=eta, description=description)
                live.update(view())  # drawn by Live's own timer: a fast model must not flood the terminal
            elif isinstance(event, FinalEvent):
                final = event
    console.print(final.solution, markup=False, highlight=False)
    return final


def _summary(final, console) -> None:
    console.print(f"Answer: {final.answer if final.answer is not None else '(none found)'}", markup=False)
    if final.budget is not None:
        # used_tokens is the solution's length as training measured it (format.token_length), not the
        # running count the bar showed: that one also counts the solution tags.
        verdict = "within budget" if final.within_budget else "over budget"
        console.print(f"Used {final.used_tokens} of {final.budget} budget tokens ({verdict})", markup=False)
    else:
        console.print(f"Generated {final.generated_tokens} tokens (no budget)", markup=False)
    why = FINISH_TEXT.get(final.finish_reason, final.finish_reason)
    if final.format_error:
        why += f": {final.format_error}"
    console.print(f"Ended: {why} · {final.seconds_total:.1f} s", markup=False)


def _questions(console):
    while True:
        try:
            text = console.input("[bold]Question>[/bold] ")
        except EOFError:
            console.print()
            return
        if text.strip():
            yield text


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    budget = _budget_arg(args.budget)
    if args.json and args.question is None:
        raise UserError("--json needs --question (it prints the result of one question)")
    if args.question is not None and not args.question.strip():
        raise UserError("the question is empty")
    from .generator import check_request

    # Seeds, temperatures and the like fail here, in one line, before the model loads.
    check_request(_request(args, args.question or "a question", budget))
    from ..core.models import resolve

    resolve(args.model)  # a missing path fails here, before torch is imported

    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from .generator import BudgetGenerator

    hf_logging.disable_progress_bar()
    # In JSON mode stdout carries the one object; anything human goes to stderr.
    console = Console(stderr=args.json, highlight=False)
    with BudgetGenerator.from_pretrained(args.model, device=args.device,
                                         answer_extraction=args.answer_extraction) as generator:
        if args.json:
            handle = generator.submit(_request(args, args.question, budget))
            final = handle.result()
            print(json.dumps(_json_result(final, args.question, handle.budget)))
            return 0
        if args.question is not None:
            run_interactive(generator, args, args.question, budget, console)
            return 0
        console.print("Ask a question (Ctrl-D to quit). Ctrl-C while it answers: once = answer now, twice = stop.")
        try:
            for question in _questions(console):
                run_interactive(generator, args, question, budget, console)
        except KeyboardInterrupt:
            console.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
