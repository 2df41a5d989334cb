"""Shared fixtures: tiny local models built in-process (no network), and the shared benchmark data.

Run the fast suite with `make test`; the slow one (multi-process training, real pretrained models) with
`make test-slow`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def benchmark_script(name: str) -> ModuleType:
    """`benchmarks/NAME.py` imported as module NAME (the scripts are not a package), once per session."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up in sys.modules while the class is created
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"benchmark data not found at {SHARED_DATA} (the shared/ folder must sit beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The shipped base model's tokenizer (the one every embedded length is counted in)."""
    from transformers import AutoTokenizer

    from selfbudgeter.embedded import BASE_MODEL_DIR

    return AutoTokenizer.from_pretrained(BASE_MODEL_DIR)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_tokenizer) -> Path:
    """A randomly initialised, very small Llama with the embedded tokenizer, saved as a HF directory."""
    from selfbudgeter.embedded import BaseTrainConfig, build_model

    out = tmp_path_factory.mktemp("tiny-model")
    cfg = BaseTrainConfig(hidden_size=32, layers=2, heads=2, intermediate_size=64, max_positions=512)
    build_model(embedded_tokenizer, cfg).save_pretrained(out)
    embedded_tokenizer.save_pretrained(out)
    return out
