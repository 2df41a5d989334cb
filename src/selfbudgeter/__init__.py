"""SelfBudgeter: teach a reasoning model to state and keep its own token budget, and serve it.

The package, one room per job, from the bottom up:

    core/        the budget format, grading, metrics, configuration, model loading, errors
    data/        the row schema, benchmark loaders, JSONL helpers, the prompt
    training/    profile, build-sft, sft, the rewards, relabelling, grpo (recipes/ holds their settings)
    evaluation/  the seeded sampler, eval, report
    serving/     budget-first generation (transformers, vLLM), the server, chat, the web page
    embedded/    the embedded default: its task, its base model, inspect-base, the demo
    cli.py       `selfbudgeter <command>`

docs/layout.md lists every file and the imports that still reach up this list.
"""

from ._moved import install as _install_moved

_install_moved()  # the old flat module names (selfbudgeter.grpo, ...) for one release
