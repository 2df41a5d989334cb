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
    """`benchmarks/NAME.py` (a tool users run, never an experiment) imported as module NAME, once per session."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up in sys.modules while the class is created
        spec.loader.exec_module(module)
    return sys.modules[name]


SHARED_BENCHMARKS = ("gsm8k", "math500", "aime24", "aime25", "amc23")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The benchmark copies in ../shared/data. CI has them, so a missing copy fails every test that reads it
    (never a skip: a green run means the real-data tests ran)."""
    missing = [name for name in SHARED_BENCHMARKS if not (SHARED_DATA / name / "test.jsonl").is_file()]
    if missing:
        pytest.fail(f"benchmark copies {', '.join(missing)} not found in {SHARED_DATA} (the shared/ folder must "
                    "sit beside the repository)", pytrace=False)
    return SHARED_DATA


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The shipped base model's tokenizer (the one every embedded length is counted in)."""
    from transformers import AutoTokenizer

    from selfbudgeter.embedded.model import BASE_MODEL_DIR

    return AutoTokenizer.from_pretrained(BASE_MODEL_DIR)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_tokenizer) -> Path:
    """A randomly initialised, very small Llama with the embedded tokenizer, saved as a HF directory."""
    from selfbudgeter.embedded.model import BaseTrainConfig, build_model

    out = tmp_path_factory.mktemp("tiny-model")
    cfg = BaseTrainConfig(hidden_size=32, layers=2, heads=2, intermediate_size=64, max_positions=512)
    build_model(embedded_tokenizer, cfg).save_pretrained(out)
    embedded_tokenizer.save_pretrained(out)
    return out
