"""Datasets: one row schema, benchmark loaders, JSONL helpers and the prompt builder.

Every dataset, whatever its origin (a named benchmark from a local data folder or the Hugging Face Hub, the
embedded task, a user's file or folder), becomes a list of `Row`s. Field names are adapted by a table of
small functions keyed by benchmark name; user files get their fields auto-detected. A broken row is a
`UserError` naming the file and line, or is skipped with one warning when `on_error="skip"`.

`datasets` is imported only when a Hub or Arrow dataset is actually read.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Container, Iterable, Iterator, Mapping, Sequence, TypeVar

from ..core.errors import UserError
from ..core.grading import gsm8k_answer

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "SELFBUDGETER_DATA"

SYSTEM_PROMPT = (
    "Before solving, estimate how many tokens your solution will need and state it as "
    "<budget>N</budget>, where N is a positive integer. Then write your solution inside "
    "<solution>...</solution>, staying within that budget, and end it with the final answer "
    "in \\boxed{}."
)


@dataclass
class Row:
    id: str
    question: str
    answer: str  # the gold final answer, as text (a number or LaTeX)
    solution: str | None = None  # a worked reference solution, when the dataset has one
    difficulty: float | int | None = None
    source: str = ""  # the benchmark name or the path the row came from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Row:
        """A Row from a dict in the Row schema; unknown keys are ignored, wrong types are a UserError."""
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name in ("id", "question", "answer") and f.name not in record]
        if missing:
            raise UserError(f"missing field '{missing[0]}'")
        row = cls(**{k: v for k, v in record.items() if k in names})
        _check_row(row)
        return row


def _check_row(row: Row) -> None:
    for name in ("id", "question", "answer"):
        value = getattr(row, name)
        if not isinstance(value, str):
            raise UserError(f"field '{name}' must be a string, got {type(value).__name__}")
    if not row.question.strip():
        raise UserError("empty field 'question'")
    if not row.answer.strip():
        raise UserError("empty field 'answer'")
    if row.solution is not None and not isinstance(row.solution, str):
        raise UserError(f"field 'solution' must be a string, got {type(row.solution).__name__}")
    if row.difficulty is not None and (
        isinstance(row.difficulty, bool) or not isinstance(row.difficulty, (int, float))
    ):
        raise UserError(f"field 'difficulty' must be a number, got {type(row.difficulty).__name__}")
    if not isinstance(row.source, str):
        raise UserError(f"field 'source' must be a string, got {type(row.source).__name__}")


# --- JSONL -------------------------------------------------------------------------------------------------


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any, bool]]:
    """(line number, parsed object or the JSONDecodeError, whether the line ended) for every non-blank line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line), line.endswith("\n")
            except json.JSONDecodeError as err:
                yield number, err, line.endswith("\n")


def read_jsonl(path: str | os.PathLike, *, torn_end: bool = False) -> list[dict]:
    """Every record of a JSONL file (blank lines ignored): the one JSONL reader. Invalid JSON is a UserError
    naming the line; with `torn_end`, an unfinished last line (a writer killed mid-line) is dropped instead."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    records = []
    for number, record, ended in _iter_jsonl(path):
        if isinstance(record, json.JSONDecodeError):
            if torn_end and not ended:  # only the last line can lack its newline
                logger.warning("%s: dropping a torn last line", path)
                continue
            raise UserError(f"{path}:{number}: invalid JSON ({record.msg})")
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """Write dicts (or objects with `to_dict()`) one per line, atomically: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                record = row.to_dict() if hasattr(row, "to_dict") else row
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def file_or_folder(path: str | os.PathLike, name: str, hint: str) -> Path:
    """`path` when it is a file, else the file `name` in the folder `path`; a UserError ending in `hint`
    (where such a file comes from) when there is none."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise UserError(f"{path}: no such file ({hint})")
    return path


# --- field adapters -----------------------------------------------------------------------------------------

Adapter = Callable[[Mapping[str, Any], str], Row]  # (record, default id) -> Row


def _text(record: Mapping[str, Any], *names: str, required: bool = True) -> Any:
    """The first of `names` present in the record (a number is returned as is, for `_answer_text`)."""
    for name in names:
        if name in record and record[name] is not None:
            return record[name]
    if required:
        raise UserError(f"missing field '{names[0]}'" + (f" (or {', '.join(names[1:])})" if names[1:] else ""))
    return None


def _answer_text(value: Any) -> Any:
    """Gold answers stored as numbers (AMC's 27.0) become text ("27"); other types are left to validation."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return value


def _row_id(record: Mapping[str, Any], default: str) -> str:
    for name in ("id", "unique_id", "idx"):
        if record.get(name) is not None:
            return str(record[name])
    return default


def _level(value: Any) -> Any:
    """MATH's level: "3", 3 or "Level 3" -> 3."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(?:Level\s*)?(\d+)\s*", value)
        return int(match.group(1)) if match else value
    return value


def _adapt_gsm8k(record: Mapping[str, Any], default_id: str) -> Row:
    worked = _text(record, "answer")
    if not isinstance(worked, str):
        raise UserError(f"field 'answer' must be a string, got {type(worked).__name__}")
    answer = gsm8k_answer(worked)
    if answer is None:
        raise UserError("field 'answer' has no '#### <number>' line")
    return Row(_row_id(record, default_id), _text(record, "question"), answer, solution=worked)


def _adapt_math500(record: Mapping[str, Any], default_id: str) -> Row:
    level = record.get("level")
    return Row(
        _row_id(record, default_id),
        _text(record, "problem", "question"),
        _answer_text(_text(record, "answer")),
        solution=record.get("solution"),
        difficulty=_level(level) if level is not None else None,
    )


def _adapt_competition(record: Mapping[str, Any], default_id: str) -> Row:
    """AIME and AMC: problem (or question), answer (a string, or a number on some copies), maybe solution."""
    return Row(
        _row_id(record, default_id),
        _text(record, "problem", "question"),
        _answer_text(_text(record, "answer")),
        solution=record.get("solution") or None,
    )


def _adapt_generic(record: Mapping[str, Any], default_id: str) -> Row:
    """A user's dataset: the usual field names of math datasets are recognised."""
    difficulty = _text(record, "difficulty", "level", required=False)
    return Row(
        _row_id(record, default_id),
        _text(record, "question", "problem", "prompt"),
        _answer_text(_text(record, "answer", "final_answer", "gold")),
        solution=_text(record, "solution", required=False),
        difficulty=_level(difficulty),
    )


ADAPTERS: dict[str, Adapter] = {
    "gsm8k": _adapt_gsm8k,
    "math500": _adapt_math500,
    "aime24": _adapt_competition,
    "aime25": _adapt_competition,
    "amc23": _adapt_competition,
}


@dataclass(frozen=True)
class HubSource:
    repo: str
    config: str | None = None
    splits: Mapping[str, str] | None = None  # our split name -> the Hub's, where they differ


# The AIME copies on the Hub publish their only split as "train"; it is the test set of every paper.
HUB_SOURCES: dict[str, HubSource] = {
    "gsm8k": HubSource("openai/gsm8k", "main"),
    "math500": HubSource("HuggingFaceH4/MATH-500"),
    "aime24": HubSource("HuggingFaceH4/aime_2024", splits={"test": "train"}),
    "aime25": HubSource("yentinglin/aime_2025", splits={"test": "train"}),
    "amc23": HubSource("math-ai/amc23"),
}

ON_ERROR = ("raise", "skip")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")


# --- datasets that code makes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A dataset that code makes rather than a file holds (the embedded task), named by its module.

    The module is imported when the dataset is first read, never by this one at import time (a task imports
    this module for `Row`, so the edge runs one way). It has `load_split(split) -> list[Row]`, whose rows carry
    the task's name as `source`. `measures` maps a part of a solution to the name of one of its functions
    `f(tokenizer, solution) -> tokens of that part`: evaluation records each as `<part>_tokens` and the metrics
    summarise it, so a task adds metrics of its own without a branch on its name anywhere.
    """

    module: str
    splits: tuple[str, ...]
    measures: Mapping[str, str] = field(default_factory=dict)


EMBEDDED = "embedded"
WORD_PROBLEMS = "word-problems"
TASKS: dict[str, Task] = {
    EMBEDDED: Task("selfbudgeter.embedded.task", ("train", "validation", "test"), {"filler": "filler_tokens"}),
    WORD_PROBLEMS: Task("selfbudgeter.data.word_problems", ("train", "validation", "test")),
}


def register_task(name: str, task: Task) -> None:
    """Make `load_benchmark(name, split)` read the dataset `task` makes (a task of one's own)."""
    TASKS[name] = task


def _task_module(name: str) -> Any:
    return importlib.import_module(TASKS[name].module)


def solution_measures(source: str) -> dict[str, Callable[[Any, str], int]]:
    """part -> f(tokenizer, solution) of the task whose rows carry `source` (`Row.source`); {} for any other."""
    task = TASKS.get(source)
    if task is None or not task.measures:
        return {}
    module = _task_module(source)
    return {part: getattr(module, function) for part, function in task.measures.items()}


def known_names() -> tuple[str, ...]:
    """The dataset names `load_benchmark` knows: the named benchmarks, then the tasks."""
    return (*HUB_SOURCES, *TASKS)


# --- loading -----------------------------------------------------------------------------------------------


def _adapt_all(
    records: Iterable[tuple[str, Any]], adapter: Adapter, source: str, id_prefix: str, on_error: str
) -> list[Row]:
    """Adapt (location, record) pairs; `location` is what an error message points at (`file:line`)."""
    rows, bad, first = [], 0, None
    for index, (where, record) in enumerate(records):
        try:
            if isinstance(record, json.JSONDecodeError):
                raise UserError(f"invalid JSON ({record.msg})")
            if not isinstance(record, Mapping):
                raise UserError(f"expected a JSON object, got {type(record).__name__}")
            row = adapter(record, f"{id_prefix}{index}")
            row.source = source
            _check_row(row)
        except (UserError, TypeError, ValueError) as err:
            message = f"{where}: {err}"
            if on_error == "raise":
                raise UserError(message) from None
            bad += 1
            first = first or message
            continue
        rows.append(row)
    if bad:
        logger.warning("skipped %d invalid row(s) of %s (first: %s)", bad, source, first)
    return rows


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    for number, record, _ in _iter_jsonl(path):
        yield f"{path}:{number}", record


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        # Many `.json` files are really JSON Lines (it is what `datasets` writes).
        yield from _jsonl_records(path)
        return
    if isinstance(data, Mapping):
        # {"data": [...]} and similar wrappers around a single list of records.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a list of records (or JSON Lines)")
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of records (or JSON Lines)")
    for index, record in enumerate(data):
        yield f"{path}[{index}]", record


def _dataset_records(dataset: Any, where: str) -> Iterator[tuple[str, Any]]:
    for index, record in enumerate(dataset):
        yield f"{where}[row {index}]", record


def _hub_dataset(repo: str, config: str | None, split: str) -> Any:
    """`datasets.load_dataset` (a Hub id, or a local folder the Hub loader understands)."""
    import datasets

    try:
        return datasets.load_dataset(repo, config, split=split)
    except Exception as err:  # datasets raises many types: offline, not found, bad config, bad split
        where = "local folder" if Path(repo).exists() else "not a local path; tried the Hugging Face Hub"
        raise UserError(f"cannot load dataset {repo!r} (split {split!r}; {where}): {err}") from err


def _from_disk(path: Path, split: str) -> Any:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"{path}: no split {split!r} (has {', '.join(loaded)})")
        return loaded[split]
    return loaded


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_named(name: str, split: str, data_dir: str | os.PathLike | None, on_error: str) -> list[Row]:
    adapter = ADAPTERS[name]
    data_dir = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if data_dir is not None:
        path = Path(data_dir) / name / f"{split}.jsonl"
        if not path.is_file():
            have = sorted(p.stem for p in path.parent.glob("*.jsonl"))
            raise UserError(f"{path}: no such file" + (f" (splits there: {', '.join(have)})" if have else ""))
        return _adapt_all(_jsonl_records(path), adapter, name, f"{name}/{split}/", on_error)
    hub = HUB_SOURCES[name]
    hub_split = (hub.splits or {}).get(split, split)
    dataset = _hub_dataset(hub.repo, hub.config, hub_split)
    return _adapt_all(_dataset_records(dataset, hub.repo), adapter, name, f"{name}/{split}/", on_error)


def _load_task(name: str, split: str) -> list[Row]:
    splits = TASKS[name].splits
    if split not in splits:
        raise UserError(f"the {name} task has splits {', '.join(splits)}, not {split!r}")
    return list(_task_module(name).load_split(split))


def _load_path(path: Path, split: str, on_error: str) -> list[Row]:
    source, prefix = str(path), f"{path.stem}/"
    if path.is_file():
        if path.suffix == ".jsonl":
            records: Iterable[tuple[str, Any]] = _jsonl_records(path)
        elif path.suffix == ".json":
            records = _json_records(path)
        else:
            records = _dataset_records(_file_dataset(path), str(path))
        return _adapt_all(records, _adapt_generic, source, prefix, on_error)
    for candidate in (path / f"{split}.jsonl", path / f"{split}.json"):
        if candidate.is_file():
            return _load_path(candidate, split, on_error)
    dataset = _from_disk(path, split) if _is_saved_dataset(path) else _hub_dataset(str(path), None, split)
    return _adapt_all(_dataset_records(dataset, str(path)), _adapt_generic, source, f"{path.name}/{split}/", on_error)


def _file_dataset(path: Path) -> Any:
    builders = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
    if path.suffix not in builders:
        raise UserError(f"{path}: unsupported file type (use .jsonl, .json, .parquet, .csv or .arrow)")
    import datasets

    try:
        return datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
    except Exception as err:
        raise UserError(f"cannot read {path}: {err}") from err


def load_benchmark(
    name_or_path: str | os.PathLike,
    split: str = "test",
    *,
    data_dir: str | os.PathLike | None = None,
    on_error: str = "raise",
    limit: int | None = None,
) -> list[Row]:
    """Rows of a named benchmark, a task (`TASKS`: embedded, word-problems), a local file or folder, or a Hub dataset.

    Named benchmarks (gsm8k, math500, aime24, aime25, amc23) are read from `<data_dir>/<name>/<split>.jsonl`
    when a data folder is given (argument, else `$SELFBUDGETER_DATA`), otherwise from the Hugging Face Hub.
    `on_error="skip"` drops broken rows with one warning instead of raising a UserError.
    """
    if on_error not in ON_ERROR:
        raise UserError(f"on_error must be one of {', '.join(ON_ERROR)}, not {on_error!r}")
    if limit is not None and limit < 0:
        raise UserError(f"limit must be >= 0, not {limit}")
    key = os.fspath(name_or_path)
    path = Path(key).expanduser()
    if key in ADAPTERS and not path.exists():
        rows = _load_named(key, split, data_dir, on_error)
    elif key in TASKS:
        rows = _load_task(key, split)
    elif path.exists():
        rows = _load_path(path, split, on_error)
    elif _HUB_ID.fullmatch(key) and not key.endswith(_FILE_SUFFIXES):
        # Not a local path, so it can only be a Hub id; the error then says which was tried.
        dataset = _hub_dataset(key, None, split)
        rows = _adapt_all(_dataset_records(dataset, key), _adapt_generic, key, f"{key}/{split}/", on_error)
    else:
        raise UserError(
            f"unknown dataset {key!r}: not a known name ({', '.join(known_names())}), "
            "an existing file or folder, or a Hugging Face Hub id (owner/name)"
        )
    if not rows:
        raise UserError(f"dataset {key!r} (split {split!r}) has no usable rows")
    return rows[:limit] if limit is not None else rows


# --- prompts -----------------------------------------------------------------------------------------------


def build_messages(question: str, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """Chat messages for a question: the budget-format instruction as system prompt, then the question."""
    if not isinstance(question, str) or not question.strip():
        raise UserError("the question is empty")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": question}]


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_text(
    tokenizer: Any, question: str, *, budget: int | None = None, system_prompt: str | None = SYSTEM_PROMPT
) -> str:
    """The model's prompt for a question, ending where the assistant starts writing.

    With `budget`, the assistant turn is pre-filled with `<budget>N</budget><solution>` (a user-set budget)
    and the model continues with the solution. A chat template that rejects the system role gets the system
    prompt folded into the user message; one that leaves system messages out on purpose (the embedded
    model's, trained without one) is respected.
    """
    from ..core.format import FormatError, render_prefill

    messages = build_messages(question, system_prompt)
    try:
        text = _render(tokenizer, messages)
    except Exception as err:  # jinja's TemplateError from raise_exception("System role not supported")
        if not system_prompt:
            raise
        logger.debug("chat template rejected the system role (%s); folding it into the user turn", err)
        text = _render(tokenizer, [{"role": "user", "content": f"{system_prompt}\n\n{question}"}])
    if budget is not None:
        try:
            text += render_prefill(budget)
        except FormatError as err:
            raise UserError(f"invalid budget {budget!r}: {err}") from None
    return text


def write_splits(load_split: Callable[[str], list[Row]], splits: Sequence[str], prog: str, description: str,
                 argv: Sequence[str] | None = None) -> int:
    """The command line of a task made by code: write its fixed splits as `<out>/<split>.jsonl` (one row schema)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", type=Path, required=True, help="folder to write <split>.jsonl into")
    parser.add_argument("--split", choices=list(splits), action="append", help="split(s) to write (default: all)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for split in args.split or list(splits):
        rows = load_split(split)
        write_jsonl(args.out / f"{split}.jsonl", [r.to_dict() for r in rows])
        print(f"{split}: {len(rows)} rows -> {args.out / f'{split}.jsonl'}")
    return 0


Problem = TypeVar("Problem")


def draw_split(sample: Callable[[Any, int], Problem], key: Callable[[Problem], object], size: int, seed: int,
               levels: Sequence[int], held_out: Container = frozenset()) -> list[Problem]:
    """`size` problems of a task made by code, `sample(rng, level)` with the levels in turn (so each is equally
    represented), none whose `key` is held out (another split's) or already drawn: one split, fixed by `seed`."""
    import random

    rng = random.Random(seed)
    problems: list[Problem] = []
    seen: set = set()
    while len(problems) < size:
        problem = sample(rng, levels[len(problems) % len(levels)])
        k = key(problem)
        if k in held_out or k in seen:
            continue
        seen.add(k)
        problems.append(problem)
    return problems
