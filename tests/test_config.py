"""Stage configuration: YAML recipes (files or packaged names) plus `--field value` overrides.

Run: `.venv/bin/python -m pytest -q tests/test_config.py` (no model; seconds).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Literal

import pytest

from selfbudgeter.core.config import NULLS, nullable, packaged_recipes, parse_config, resolve_recipe
from selfbudgeter.core.errors import UserError


@dataclass
class Toy:
    model: str = field(default="m", metadata={"help": "the model"})
    samples: int = field(default=4, metadata={"help": "samples"})
    lr: float = field(default=1.0, metadata={"help": "learning rate"})
    limit: int | None = field(default=None, metadata={"help": "limit"})
    multipliers: list[float] = field(default_factory=lambda: [0.5, 1.0], metadata={"help": "multipliers"})
    budgeted: bool = field(default=True, metadata={"help": "budgeted"})
    backend: Literal["transformers", "vllm"] = field(default="transformers", metadata={"help": "backend"})
    prompt: str | None = field(default="x", metadata={"help": "prompt"})

    def __post_init__(self):
        if self.samples < 1:
            raise ValueError("samples must be >= 1")


def parse(tmp_path, yaml_text, *argv):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml_text)
    (cfg,) = parse_config((Toy,), ["--config", str(recipe), *argv], "toy", "a toy stage")
    return cfg


@pytest.mark.parametrize(
    "yaml_text, argv, expected",
    [
        # YAML values become typed defaults ("1e-5" is a string to PyYAML, a float here)...
        ("samples: 3\nlr: 1e-5\nmultipliers: [1, 2]\nprompt: null\n", [],
         {"samples": 3, "lr": 1e-5, "multipliers": [1.0, 2.0], "prompt": None}),
        # ...that the command line overrides.
        ("samples: 3\n", ["--samples", "5"], {"samples": 5}),
        ("limit: 10\n", ["--limit", "20"], {"limit": 20}),
        # A bool set false in YAML stays false, whichever of its two flags argparse meets first.
        ("budgeted: false\n", [], {"budgeted": False}),
        ("budgeted: false\n", ["--budgeted"], {"budgeted": True}),
        ("", ["--no_budgeted"], {"budgeted": False}),
        ("multipliers: []\n", [], {"multipliers": []}),
        ("", ["--multipliers", "[]"], {"multipliers": []}),
        ("multipliers: [3]\n", ["--multipliers=[]", "--samples", "2"], {"multipliers": [], "samples": 2}),
        ("", ["--multipliers", "2", "3"], {"multipliers": [2.0, 3.0]}),
        ("backend: vllm\n", [], {"backend": "vllm"}),
        ("", ["--config=ignored"], None),
    ],
)
def test_recipe_then_overrides(tmp_path, yaml_text, argv, expected):
    if expected is None:  # `--config=path` form: the last --config wins
        recipe = tmp_path / "other.yaml"
        recipe.write_text("samples: 9\n")
        (cfg,) = parse_config((Toy,), [f"--config={recipe}"], "toy", "")
        assert cfg.samples == 9
        return
    cfg = parse(tmp_path, yaml_text, *argv)
    for key, value in expected.items():
        assert getattr(cfg, key) == value


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("samplez: 3\n", "unknown key 'samplez'; did you mean 'samples'"),
        ("samples: four\n", "samples: invalid value 'four'"),
        ("backend: sglang\n", "backend: 'sglang' is not one of transformers, vllm"),
        ("samples: [1, 2]\n", "samples takes one value"),
        ("- a\n- b\n", "must be a YAML mapping"),
        ("samples: 3\n  bad indent: [\n", "not valid YAML"),
        ("samples: 0\n", "samples must be >= 1"),  # the dataclass's own check, as one line
    ],
)
def test_bad_recipes_are_one_line_user_errors(tmp_path, yaml_text, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")) as err:
        parse(tmp_path, yaml_text)
    assert "\n" not in str(err.value)


def test_a_recipe_extends_another_and_changes_only_its_own_keys(tmp_path):
    (tmp_path / "base.yaml").write_text("samples: 3\nlr: 0.5\nmodel: base\n")
    (tmp_path / "middle.yaml").write_text("extends: base.yaml\nlr: 0.25\n")  # beside the extending file
    cfg = parse(tmp_path, f"extends: {tmp_path / 'middle.yaml'}\nmodel: child\n", "--samples", "7")
    assert (cfg.samples, cfg.lr, cfg.model) == (7, 0.25, "child")
    # A packaged recipe by name (eval's, which Toy cannot read): its keys, the child's on top.
    from selfbudgeter.evaluation.evaluate import EvalConfig

    child = tmp_path / "eval.yaml"
    child.write_text("extends: embedded/eval\nsamples: 2\n")
    (cfg,) = parse_config((EvalConfig,), ["--config", str(child)], "eval", "")
    (reference,) = parse_config((EvalConfig,), ["--config", "embedded/eval"], "eval", "")
    assert cfg.samples == 2 and cfg.temperature == reference.temperature and cfg.max_new_tokens == 384


@pytest.mark.parametrize(
    "files, message",
    [
        ({"recipe.yaml": "extends: recipe.yaml\n"}, "extends it back"),
        ({"a.yaml": "extends: recipe.yaml\n", "recipe.yaml": "extends: a.yaml\n"}, "extends it back"),
        ({"recipe.yaml": "extends: [a, b]\n"}, "extends must name a recipe"),
        ({"recipe.yaml": "extends: no/such\n"}, "neither a file nor a packaged recipe"),
        ({"recipe.yaml": "extends: base.yaml\n", "base.yaml": "samplez: 1\n"}, "unknown key 'samplez'"),
    ],
)
def test_bad_extends_are_one_line_user_errors(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=message) as err:
        parse_config((Toy,), ["--config", str(tmp_path / "recipe.yaml")], "toy", "a toy stage")
    assert "\n" not in str(err.value)


def test_unknown_flag_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(tmp_path, "", "--bogus", "1")
    assert exit_.value.code == 2
    assert "unrecognized arguments: --bogus 1" in capsys.readouterr().err


def test_packaged_recipes_resolve_by_name():
    names = packaged_recipes()
    assert "embedded/profile" in names and "embedded/eval" in names
    assert resolve_recipe("embedded/profile").endswith("recipes/embedded/profile.yaml")
    assert resolve_recipe("embedded/eval.yaml").endswith("recipes/embedded/eval.yaml")
    with pytest.raises(UserError, match="did you mean 'embedded/profile'"):
        resolve_recipe("embedded/profil")
    with pytest.raises(UserError, match="neither a file nor a packaged recipe"):
        resolve_recipe("/no/such/recipe.yaml")


@pytest.mark.parametrize("module", ["training.profile", "training.sft_data", "training.grpo", "evaluation.evaluate"])
def test_every_stage_recipe_and_help(module, capsys):
    stage = importlib.import_module(f"selfbudgeter.{module}")
    with pytest.raises(SystemExit) as exit_:
        stage.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--config RECIPE" in text and "--seed" in text


@pytest.mark.parametrize("recipe", [r for r in packaged_recipes() if r.endswith(("/profile", "/eval"))])
def test_packaged_profile_and_eval_recipes_parse(recipe):
    from selfbudgeter.evaluation.evaluate import EvalConfig
    from selfbudgeter.training.profile import ProfileConfig

    config_type = ProfileConfig if recipe.endswith("/profile") else EvalConfig
    (cfg,) = parse_config((config_type,), ["--config", recipe], "stage", "")
    assert cfg.seed is not None and cfg.out


# Every stage whose prompts carry a system prompt: its command name -> its module, whose parse_args reads argv.
PROMPT_STAGES = {"profile": "training.profile", "build-sft": "training.sft_data", "grpo": "training.grpo",
                 "eval": "evaluation.evaluate"}


def stage_options(stage: str, argv: list[str]):
    options = importlib.import_module(f"selfbudgeter.{PROMPT_STAGES[stage]}").parse_args(argv)
    return options[0] if isinstance(options, tuple) else options  # grpo: (its own, rewards, GRPOConfig)


@pytest.mark.parametrize("stage", PROMPT_STAGES)
@pytest.mark.parametrize("spelling", NULLS)
def test_one_null_spelling_means_no_system_prompt_in_every_stage(stage, spelling, tmp_path):
    assert stage_options(stage, ["--system_prompt", spelling]).system_prompt is None
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"system_prompt: {spelling or '~'}\n")  # a YAML null or the word, as a user writes it
    assert stage_options(stage, ["--config", str(recipe)]).system_prompt is None
    assert stage_options(stage, ["--system_prompt", "Be brief."]).system_prompt == "Be brief."


def test_nullable_is_the_one_rule():
    assert [nullable(v) for v in (None, *NULLS, " none ")] == [None] * (len(NULLS) + 2)
    assert nullable("nothing") == "nothing"
