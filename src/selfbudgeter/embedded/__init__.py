"""The embedded default, small enough to run on a laptop: task (the arithmetic task), model (its tokenizer
and base reasoning model, shipped in assets/base), inspect (`selfbudgeter inspect-base`) and demo.

The names of the old module `selfbudgeter.embedded` (now `selfbudgeter.embedded.model`) still resolve here
for one release, with a DeprecationWarning.
"""

from __future__ import annotations

import warnings

_MODEL_NAMES = frozenset({"BASE_MODEL_DIR", "SPECIAL_TOKENS", "CHAT_TEMPLATE", "BaseTrainConfig", "build_tokenizer",
                          "build_model", "trace_dataset", "train_base", "make_parser", "main"})


def __getattr__(name: str):
    if name not in _MODEL_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import model

    warnings.warn(f"selfbudgeter.embedded.{name} moved to selfbudgeter.embedded.model.{name}", DeprecationWarning,
                  stacklevel=2)
    return getattr(model, name)
