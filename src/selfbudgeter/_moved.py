"""The modules that moved into subpackages, importable by their old names for one release.

`import selfbudgeter.grpo` (or `from selfbudgeter import grpo`) still works: it gives the module
`selfbudgeter.training.grpo` itself, the same object, and warns once with a DeprecationWarning naming the new
path. `selfbudgeter/__init__.py` installs the finder; it answers only for the names in `MOVED`, after every
other finder, so a real module of that name would always win.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

# old module -> new module
MOVED = {
    f"selfbudgeter.{old}": f"selfbudgeter.{new}"
    for old, new in {
        "config": "core.config", "convert": "core.convert", "errors": "core.errors", "format": "core.format",
        "grading": "core.grading", "metrics": "core.metrics", "models": "core.models", "runtime": "core.runtime",
        "grpo": "training.grpo", "profile": "training.profile", "relabel": "training.relabel",
        "rewards": "training.rewards", "sft": "training.sft", "sft_data": "training.sft_data",
        "evaluate": "evaluation.evaluate", "generation": "evaluation.generation", "report": "evaluation.report",
        "chat": "serving.chat", "generator": "serving.generator", "server": "serving.server",
        "vllm_generator": "serving.vllm_generator",
        "demo": "embedded.demo", "embedded_profile": "embedded.inspect", "task": "embedded.task",
    }.items()
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        return importlib.machinery.ModuleSpec(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import that instead", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the new module ran when it was imported


def install() -> None:
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
