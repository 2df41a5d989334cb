"""Stage configuration: dataclasses read from a YAML recipe plus `--field value` overrides (open-r1 style).

`parse_config` wraps `trl.TrlParser`. `--config` takes a YAML file or the name of a packaged recipe
(`embedded/profile` -> `src/selfbudgeter/recipes/embedded/profile.yaml`). A recipe key that no field
declares, or a value that does not convert to the field's type, is a `UserError` naming the key and the
file; a bad `--flag` stays an argparse error. Both print one line. A recipe may start from another with
`extends: NAME` (a packaged recipe name or a YAML path, relative to the extending file or the working
directory) and set only the keys it changes; chains are followed, loops are an error.

Deviations from `TrlParser.parse_args_and_config`:
1. YAML scalars are converted with the field's own type, so `lr: 1e-5` (a *string* to PyYAML) becomes a
   float and `samples: four` fails at parse time instead of deep inside a stage.
2. `--config=path` is accepted as well as `--config path`, and `--config` appears in `--help`.
3. `--field []` empties a list field (argparse's `nargs="+"` cannot); `--field null` clears an optional
   text field where the stage applies `nullable`.
"""

from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path
from typing import Any

from .errors import UserError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # package data


def packaged_recipes() -> list[str]:
    """Names of the stage recipes shipped with the package, e.g. `embedded/profile` (accelerate launch configs
    live beside them but are not stage recipes)."""
    if not RECIPES_DIR.is_dir():
        return []
    names = (p.relative_to(RECIPES_DIR).with_suffix("").as_posix() for p in RECIPES_DIR.rglob("*.yaml"))
    return sorted(n for n in names if not n.startswith("accelerate/"))


def resolve_recipe(value: str) -> str:
    """A path to a YAML recipe: `value` itself when it is a file, else the packaged recipe of that name."""
    if Path(value).is_file():
        return value
    name = value[: -len(".yaml")] if value.endswith(".yaml") else value
    candidate = RECIPES_DIR / f"{name}.yaml"
    if not Path(name).is_absolute() and candidate.is_file():
        return str(candidate)
    known = packaged_recipes()
    hint = difflib.get_close_matches(name, known, n=1)
    message = f"config {value!r} is neither a file nor a packaged recipe"
    if hint:
        message += f"; did you mean {hint[0]!r}?"
    elif known:
        message += f"; packaged recipes: {', '.join(known)}"
    raise UserError(message)


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    rest: list[str] = []
    config: str | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config needs a value: a YAML file or a packaged recipe name")
            config = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return config, rest


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
    except OSError as err:
        raise UserError(f"cannot read config {path}: {err.strerror}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of field: value")
    return data


def load_recipe(path: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys of the recipe at `path`, those of the recipe it `extends` (recursively) under its own."""
    data = _load_yaml(path)
    if "extends" not in data:
        return data
    parent = data.pop("extends")
    if not isinstance(parent, str) or not parent.strip():
        raise UserError(f"{path}: extends must name a recipe (a packaged name or a YAML file), not {parent!r}")
    beside = Path(path).parent / parent
    parent_path = str(beside) if beside.is_file() else resolve_recipe(parent)
    chain = (*chain, str(Path(path).resolve()))
    if str(Path(parent_path).resolve()) in chain:
        raise UserError(f"{path}: extends {parent!r}, which extends it back (a loop)")
    return {**load_recipe(parent_path, chain), **data}


def _convert(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """`value` as the field's type; lists element by element. Dicts and None pass through untouched."""
    if value is None or isinstance(value, dict) or action.type is None:
        return value
    many = action.nargs in ("+", "*")
    if many and not isinstance(value, list):
        value = [value]
    if isinstance(value, list) and not many:
        raise UserError(f"{path}: {key} takes one value, got a list")

    def one(item: Any) -> Any:
        try:
            converted = item if isinstance(item, bool) and action.type is not str else action.type(str(item))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            raise UserError(f"{path}: {key}: invalid value {item!r}") from err
        if action.choices is not None and converted not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise UserError(f"{path}: {key}: {item!r} is not one of {choices}")
        return converted

    return [one(v) for v in value] if isinstance(value, list) else one(value)


def _apply_recipe(parser: argparse.ArgumentParser, config: dict[str, Any], path: str) -> None:
    if "env" in config:
        env = config.pop("env")
        if not isinstance(env, dict):
            raise UserError(f"{path}: env must be a mapping of variable: value")
        for key, value in env.items():
            os.environ[str(key)] = str(value)
    # A bool field has two actions on one dest (`--flag` and `--no_flag`); argparse takes the first
    # default it meets, so every action of the dest gets the recipe's value.
    actions: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        if action.dest not in ("help", "config"):
            actions.setdefault(action.dest, []).append(action)
    for key, value in config.items():
        if key not in actions:
            hint = difflib.get_close_matches(str(key), list(actions), n=1)
            suffix = f"; did you mean {hint[0]!r}?" if hint else ""
            raise UserError(f"{path}: unknown key {key!r}{suffix}")
        typed = next((a for a in actions[key] if a.type is not None), actions[key][0])
        value = _convert(typed, key, value, path)
        for action in actions[key]:
            action.default = value
            action.required = False


def _empty_lists(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--field []` (or `--field=[]`) empties a list field: argparse's nargs="+" cannot say "no values"."""
    lists = {
        option: action
        for action in parser._actions
        if action.nargs in ("+", "*")
        for option in action.option_strings
    }
    rest: list[str] = []
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in lists and eq and value.strip() == "[]":
            lists[flag].default = []
            i += 1
            continue
        if argv[i] in lists and i + 1 < len(argv) and argv[i + 1].strip() == "[]":
            lists[argv[i]].default = []
            i += 2
            continue
        rest.append(argv[i])
        i += 1
    return rest


def parse_config(
    types: tuple[type, ...], argv: list[str] | None, prog: str, description: str
) -> tuple:
    """Parse `argv` (`--config RECIPE`, then `--field value` overrides) into one instance per dataclass.

    A dataclass may validate itself in `__post_init__` by raising `ValueError` or `UserError`; either reaches
    the user as one line.
    """
    from trl import TrlParser

    parser = TrlParser(
        tuple(types),
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="RECIPE",
        help="YAML recipe whose keys are the options below, or a packaged recipe name"
        + (f" ({', '.join(packaged_recipes())})" if packaged_recipes() else ""),
    )
    config, rest = _split_config_flag(list(argv) if argv is not None else [])
    if config is not None and not {"-h", "--help"} & set(rest):
        path = resolve_recipe(config)
        _apply_recipe(parser, load_recipe(path), path)
    rest = _empty_lists(parser, rest)
    try:
        # look_for_args_file=False: HfArgumentParser would otherwise read `<argv[0]>.args` from disk.
        *outputs, unknown = parser.parse_args_into_dataclasses(
            args=rest, return_remaining_strings=True, look_for_args_file=False
        )
    except ValueError as err:
        raise UserError(" ".join(str(err).split())) from err
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return tuple(outputs[: len(types)])


# The one rule for "nothing" in an optional text field, on the command line and in a recipe alike: YAML's own
# null (`null`, `~`, or no value), Python's `None`, and `none`. Every stage applies it through `nullable`.
NULLS = ("", "null", "None", "none", "~")


def nullable(value: str | None) -> str | None:
    """None for the spellings of "nothing" (`NULLS`: `--system_prompt null`), else the value itself."""
    return None if value is None or value.strip() in NULLS else value
