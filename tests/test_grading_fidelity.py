"""Grading fidelity on the real GSM8K and MATH500 test sets (benchmarks/grading_fidelity.py).

Run: .venv/bin/python -m pytest tests/test_grading_fidelity.py   (about 5 s: plain numbers skip math-verify)
"""

from __future__ import annotations

import pytest

from conftest import benchmark_script
from selfbudgeter.data import load_benchmark


@pytest.mark.parametrize("name, rows", [("gsm8k", 1319), ("math500", 500)])
def test_fidelity(shared_data, name, rows):
    fidelity = benchmark_script("grading_fidelity")
    result = fidelity.run(name, load_benchmark(name, data_dir=shared_data), seed=0)
    assert result.own_total == rows
    assert result.other_total >= 0.95 * rows  # only a few pairs share an answer
    assert result.own_rate >= fidelity.TARGET, result.exceptions
    assert result.other_rate >= fidelity.TARGET, result.exceptions


def test_derangement_has_no_fixed_point():
    fidelity = benchmark_script("grading_fidelity")
    for n in (2, 3, 10, 500):
        order = fidelity.derangement(n, seed=1)
        assert sorted(order) == list(range(n))
        assert all(order[i] != i for i in range(n))
    assert fidelity.derangement(50, seed=1) == fidelity.derangement(50, seed=1)
