"""The package layout: rooms by job, the old flat module names still importable for one release, package data
where the code looks for it and where the wheel ships it."""

from __future__ import annotations

import fnmatch
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import selfbudgeter
from selfbudgeter._moved import MOVED

SRC = Path(selfbudgeter.__file__).resolve().parent
REPO = SRC.parents[1]


def test_an_old_module_name_is_the_new_module():
    # In a fresh process, where nothing is imported yet: each old name warns once, naming the new path, and
    # gives the very module (so a monkeypatch through either name reaches the code).
    code = """if True:
        import importlib, json, sys, warnings
        from selfbudgeter._moved import MOVED
        seen = {}
        for old, new in MOVED.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                first = importlib.import_module(old)
                again = importlib.import_module(old)
            seen[old] = [first is again is importlib.import_module(new), [str(w.message) for w in caught
                                                                           if w.category is DeprecationWarning]]
        print(json.dumps(seen))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    seen = json.loads(out)
    assert seen == {old: [True, [f"{old} moved to {new}; import that instead"]] for old, new in MOVED.items()}


def test_moved_names_are_modules_that_exist_and_no_old_file_is_left():
    for old, new in MOVED.items():
        assert importlib.util.find_spec(new) is not None, new
        assert not (SRC / f"{old.split('.')[-1]}.py").exists(), old


def test_the_old_embedded_module_names_resolve_with_a_warning():
    from selfbudgeter.embedded import model

    with pytest.warns(DeprecationWarning, match="selfbudgeter.embedded.model.BASE_MODEL_DIR"):
        from selfbudgeter.embedded import BASE_MODEL_DIR
    assert BASE_MODEL_DIR == model.BASE_MODEL_DIR
    with pytest.raises(ImportError):
        from selfbudgeter.embedded import no_such_name  # noqa: F401


def test_package_data_is_where_the_code_looks_and_in_the_wheel():
    from selfbudgeter.core.config import RECIPES_DIR, resolve_recipe
    from selfbudgeter.embedded.model import BASE_MODEL_DIR
    from selfbudgeter.serving.server import WEB_PAGE

    assert (BASE_MODEL_DIR / "config.json").is_file() and (BASE_MODEL_DIR / "model.safetensors").is_file()
    assert WEB_PAGE.is_file()
    assert Path(resolve_recipe("embedded/grpo")) == RECIPES_DIR / "embedded" / "grpo.yaml"
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["selfbudgeter"]
    tracked = subprocess.run(["git", "ls-files", "src/selfbudgeter"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    data = [Path(p).relative_to("src/selfbudgeter").as_posix() for p in tracked if not p.endswith(".py")]
    assert data, "no package data found"
    for path in data:  # setuptools' ** also matches one level, as fnmatch's * crosses slashes
        assert any(fnmatch.fnmatch(path, g) for g in globs), f"{path} is not in the wheel: pyproject package-data"
