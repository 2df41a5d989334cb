"""Process settings made by the `selfbudgeter` command at start: glibc's allocator thresholds.

Run: `.venv/bin/python -m pytest -q tests/test_runtime.py` (instant).
"""

import platform

import pytest

from selfbudgeter.core import runtime

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_thresholds_are_set_on_glibc(monkeypatch):
    for name in (*runtime._ENVIRONMENT, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    assert runtime.tune_allocator() is True


@pytest.mark.parametrize(
    "name, value",
    [
        ("MALLOC_MMAP_THRESHOLD_", "131072"),
        ("MALLOC_TRIM_THRESHOLD_", "131072"),
        ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072"),
    ],
)
def test_thresholds_the_user_set_are_left_alone(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert runtime.tune_allocator() is False
