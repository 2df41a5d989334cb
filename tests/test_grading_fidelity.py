"""Grading fidelity on the real GSM8K and MATH500 test sets (benchmarks/grading_fidelity.py).

Run: .venv/bin/python -m pytest tests/test_grading_fidelity.py   (about 5 s: plain numbers skip math-verify)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import benchmark_script
from selfbudgeter.data import load_benchmark

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def _benchmark_module():
    return benchmark_script("grading_fidelity")


@pytest.mark.parametrize("name, rows", [("gsm8k", 1319), ("math500", 500)])
def test_fidelity(name, rows):
    if not (DATA_DIR / name / "test.jsonl").is_file():
        pytest.skip(f"benchmark copies not found at {DATA_DIR}")
    fidelity = _benchmark_module()
    result = fidelity.run(name, load_benchmark(name, data_dir=DATA_DIR), seed=0)
    assert result.own_total == rows
    assert result.other_total >= 0.95 * rows  # only a few pairs share an answer
    assert result.own_rate >= fidelity.TARGET, result.exceptions
    assert result.other_rate >= fidelity.TARGET, result.exceptions


def test_derangement_has_no_fixed_point():
    fidelity = _benchmark_module()
    for n in (2, 3, 10, 500):
        order = fidelity.derangement(n, seed=1)
        assert sorted(order) == list(range(n))
        assert all(order[i] != i for i in range(n))
    assert fidelity.derangement(50, seed=1) == fidelity.derangement(50, seed=1)
