"""Row schema, benchmark loaders, validation and prompts. Run: .venv/bin/python -m pytest tests/test_data.py

Reads the benchmark copies in ../shared/data (beside the repository) and small files written to tmp_path;
the Hub code path is exercised on local folders with the Hub switched off.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

import selfbudgeter  # noqa: E402
from selfbudgeter import data  # noqa: E402
from selfbudgeter.data import (  # noqa: E402
    SYSTEM_PROMPT,
    HubSource,
    Row,
    build_messages,
    load_benchmark,
    prompt_text,
    read_jsonl,
    write_jsonl,
)
from selfbudgeter.core.errors import UserError  # noqa: E402
from selfbudgeter.core.grading import is_correct  # noqa: E402



@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# --- named benchmarks from the shared data folder ------------------------------------------------------------


@pytest.mark.parametrize(
    "name, count", [("gsm8k", 1319), ("math500", 500), ("aime24", 30), ("aime25", 30), ("amc23", 40)]
)
def test_named_benchmarks(shared_data, name, count):
    rows = load_benchmark(name, data_dir=shared_data)
    assert len(rows) == count
    assert len({row.id for row in rows}) == count
    for row in rows:
        assert row.question.strip() and row.answer.strip()
        assert row.source == name


def test_gsm8k_fields(shared_data):
    rows = load_benchmark("gsm8k", data_dir=shared_data)
    assert all("," not in row.answer and "####" in row.solution for row in rows)
    with_commas = [row for row in rows if "#### " in row.solution and "," in row.solution.split("####")[-1]]
    assert with_commas, "the test split has answers written with thousands commas"
    assert all(row.answer == row.answer.strip() and float(row.answer) == float(row.answer) for row in rows)
    assert rows[0].answer == "18"


def test_math500_fields(shared_data):
    rows = load_benchmark("math500", data_dir=shared_data)
    assert {row.difficulty for row in rows} == {1, 2, 3, 4, 5}
    assert rows[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert "\\boxed" in rows[0].solution


def test_amc23_float_answers_become_integers(shared_data):
    rows = load_benchmark("amc23", data_dir=shared_data)
    assert rows[0].answer == "27"
    assert all("." not in row.answer for row in rows if row.answer.replace(".", "").isdigit())


def test_gold_solutions_grade_against_their_answers(shared_data):
    for name in ("gsm8k", "math500"):
        for row in load_benchmark(name, data_dir=shared_data, limit=20):
            assert is_correct(row.solution, row.answer), row.id


def test_data_dir_from_environment(shared_data, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(shared_data))
    assert len(load_benchmark("aime25")) == 30


def test_limit(shared_data):
    rows = load_benchmark("gsm8k", data_dir=shared_data, limit=3)
    assert [row.id for row in rows] == ["gsm8k/test/0", "gsm8k/test/1", "gsm8k/test/2"]
    assert load_benchmark("gsm8k", data_dir=shared_data, limit=0) == []


def test_missing_split_names_the_file(shared_data):
    with pytest.raises(UserError, match=r"math500/train\.jsonl: no such file \(splits there: test\)"):
        load_benchmark("math500", "train", data_dir=shared_data)


# --- the Hub code path, on local folders ---------------------------------------------------------------------


def test_hub_path_with_split_mapping(tmp_path, monkeypatch):
    repo = tmp_path / "aime_copy"
    repo.mkdir()
    write_lines(repo / "train.jsonl", [{"id": 60, "problem": "Find x.", "answer": "204", "solution": "x=204"}])
    monkeypatch.setitem(data.HUB_SOURCES, "aime24", HubSource(str(repo), splits={"test": "train"}))
    rows = load_benchmark("aime24")
    assert rows == [Row("60", "Find x.", "204", solution="x=204", source="aime24")]


def test_hub_path_with_config(tmp_path, monkeypatch):
    # A Hub-style repository whose README declares a "main" config, as openai/gsm8k does.
    repo = tmp_path / "gsm8k_copy"
    (repo / "main").mkdir(parents=True)
    write_lines(repo / "main" / "test.jsonl", [{"question": "1+1?", "answer": "1+1=2\n#### 2"}])
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: test\n    path: main/test.jsonl\n---\n"
    )
    monkeypatch.setitem(data.HUB_SOURCES, "gsm8k", HubSource(str(repo), "main"))
    rows = load_benchmark("gsm8k")
    assert [(row.question, row.answer, row.solution) for row in rows] == [("1+1?", "2", "1+1=2\n#### 2")]


def test_hub_failure_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(data.HUB_SOURCES, "math500", HubSource(str(tmp_path / "absent")))
    with pytest.raises(UserError, match="cannot load dataset"):
        load_benchmark("math500")


def test_unreachable_hub_id_is_a_user_error():
    with pytest.raises(UserError, match="cannot load dataset 'nobody/no-such-dataset'.*tried the Hugging Face Hub"):
        load_benchmark("nobody/no-such-dataset")


# --- the embedded task --------------------------------------------------------------------------------------


def test_embedded_calls_the_task_module(monkeypatch):
    calls = []

    def load_split(split):
        calls.append(split)
        return [Row(f"e{i}", f"{i}+1?", str(i + 1), source="embedded") for i in range(5)]

    fake = types.ModuleType("selfbudgeter.embedded.task")
    fake.load_split = load_split
    monkeypatch.setitem(sys.modules, "selfbudgeter.embedded.task", fake)
    monkeypatch.setattr(selfbudgeter, "task", fake, raising=False)
    rows = load_benchmark("embedded", "validation", limit=2)
    assert calls == ["validation"]
    assert [row.id for row in rows] == ["e0", "e1"]


def test_embedded_rejects_unknown_split():
    with pytest.raises(UserError, match="train, validation, test"):
        load_benchmark("embedded", "dev")


def test_a_task_of_ones_own_is_read_by_name_and_brings_its_measures(monkeypatch):
    toy = types.ModuleType("toy_task")
    toy.load_split = lambda split: [Row(f"toy-{split}-0", "1+1?", "2", source="toy")]
    toy.line_tokens = lambda tokenizer, solution: len(solution.splitlines())
    monkeypatch.setitem(sys.modules, "toy_task", toy)
    monkeypatch.setattr(data, "TASKS", dict(data.TASKS))
    data.register_task("toy", data.Task("toy_task", ("test",), {"line": "line_tokens"}))
    assert [row.id for row in load_benchmark("toy", "test")] == ["toy-test-0"]
    assert "toy" in data.known_names()
    assert data.solution_measures("toy")["line"](None, "a\nb") == 2
    assert data.solution_measures("gsm8k") == {} and data.solution_measures("my_file.jsonl") == {}
    with pytest.raises(UserError, match="the toy task has splits test, not 'train'"):
        load_benchmark("toy", "train")


SRC = Path(selfbudgeter.__file__).resolve().parent


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports anywhere (inside functions too)."""
    import ast

    modules = {}
    for path in src.rglob("*.py"):
        parts = ("selfbudgeter", *path.relative_to(src).with_suffix("").parts)
        modules[".".join(parts).removesuffix(".__init__")] = (path, parts[:-1])  # (file, its package)
    graph = {}
    for name, (path, package) in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
                target = ".".join(filter(None, (base, node.module)))
                # `from . import metrics` imports the module metrics, not (only) the package's __init__.
                submodules = {f"{target}.{alias.name}" for alias in node.names} & set(modules)
                found |= submodules or {target}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = found & set(modules) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> tuple[str, ...] | None:
    def walk(start: str, at: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in sorted(graph[at]):
            if nxt == start:
                return (*path, start)
            if nxt not in path and nxt > start:  # each cycle once, from its smallest module
                found = walk(start, nxt, (*path, nxt))
                if found:
                    return found
        return None

    return next(filter(None, (walk(name, name, (name,)) for name in sorted(graph))), None)


def test_the_package_has_no_import_cycle():
    """Not even through an import inside a function: `data` reads the embedded task by name (`TASKS`)."""
    graph = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    task = "selfbudgeter.embedded.task"
    assert task not in graph["selfbudgeter.data"] and "selfbudgeter.data" in graph[task]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ("a", "b", "c", "a")


# --- local files and folders --------------------------------------------------------------------------------

GOOD = {"question": "What is 2+3?", "answer": "5"}


@pytest.mark.parametrize(
    "record, expected",
    [
        (GOOD, Row("data/0", "What is 2+3?", "5")),
        (
            {"id": "p1", "problem": "P", "final_answer": "\\frac12", "solution": "s", "level": "Level 3"},
            Row("p1", "P", "\\frac12", solution="s", difficulty=3),
        ),
        ({"prompt": "Q", "gold": 7, "difficulty": 0.25}, Row("data/0", "Q", "7", difficulty=0.25)),
        ({"question": "Q", "answer": 2.5, "extra": [1, 2]}, Row("data/0", "Q", "2.5")),
    ],
)
def test_field_detection(tmp_path, record, expected):
    path = write_lines(tmp_path / "data.jsonl", [record])
    expected.source = str(path)
    assert load_benchmark(str(path)) == [expected]


def test_json_array_and_json_lines(tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps([GOOD, GOOD]))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [GOOD]}))
    lines = write_lines(tmp_path / "lines.json", [GOOD, GOOD, GOOD])
    assert [len(load_benchmark(p)) for p in (array, wrapped, lines)] == [2, 1, 3]


def test_folder_with_split_file(tmp_path):
    write_lines(tmp_path / "validation.jsonl", [GOOD])
    write_lines(tmp_path / "test.jsonl", [GOOD, GOOD])
    assert len(load_benchmark(tmp_path)) == 2
    assert len(load_benchmark(tmp_path, "validation")) == 1


def test_saved_dataset_folder(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"test": datasets.Dataset.from_list([{"problem": "P?", "answer": "3", "level": 2}])}
    ).save_to_disk(str(saved))
    assert load_benchmark(saved) == [Row("saved/test/0", "P?", "3", difficulty=2, source=str(saved))]
    with pytest.raises(UserError, match="no split 'train'"):
        load_benchmark(saved, "train")


def test_parquet_folder_and_file(tmp_path):
    import datasets

    folder = tmp_path / "pq"
    folder.mkdir()
    datasets.Dataset.from_list([GOOD, GOOD]).to_parquet(str(folder / "test-00000.parquet"))
    assert len(load_benchmark(folder)) == 2
    assert len(load_benchmark(folder / "test-00000.parquet")) == 2


# --- validation ---------------------------------------------------------------------------------------------

BROKEN = [
    ('{"question": "Q", "answer": ', "invalid JSON"),
    ({"question": "Q"}, "missing field 'answer'"),
    ({"answer": "5"}, "missing field 'question'"),
    ({"question": "  ", "answer": "5"}, "empty field 'question'"),
    ({"question": "Q", "answer": ""}, "empty field 'answer'"),
    ({"question": "Q", "answer": ["5"]}, "field 'answer' must be a string, got list"),
    ({"question": 3, "answer": "5"}, "field 'question' must be a string, got int"),
    ({"question": "Q", "answer": True}, "field 'answer' must be a string, got bool"),
    ({"question": "Q", "answer": "5", "solution": 5}, "field 'solution' must be a string"),
    ({"question": "Q", "answer": "5", "difficulty": "hard"}, "field 'difficulty' must be a number"),
    ([1, 2], "expected a JSON object, got list"),
]


@pytest.mark.parametrize("line, message", BROKEN)
def test_broken_row_names_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "data.jsonl", [GOOD, "", GOOD, line, GOOD])
    with pytest.raises(UserError) as info:
        load_benchmark(path)
    assert str(info.value).startswith(f"{path}:4: {message}")


def test_skip_keeps_good_rows_and_warns_once(tmp_path, caplog):
    lines = [GOOD] + [line for line, _ in BROKEN] + [{"question": "last", "answer": "1"}]
    path = write_lines(tmp_path / "data.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="selfbudgeter.data"):
        rows = load_benchmark(path, on_error="skip")
    assert [row.question for row in rows] == ["What is 2+3?", "last"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"skipped {len(BROKEN)} invalid row(s)" in warnings[0].getMessage()


def test_broken_gsm8k_row(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    write_lines(tmp_path / "gsm8k" / "test.jsonl", [{"question": "Q", "answer": "no final line"}])
    with pytest.raises(UserError, match=r"gsm8k/test\.jsonl:1: field 'answer' has no '#### <number>' line"):
        load_benchmark("gsm8k", data_dir=tmp_path)


def test_all_rows_broken_is_an_error(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [{"question": "Q"}])
    with pytest.raises(UserError, match="no usable rows"):
        load_benchmark(path, on_error="skip")


@pytest.mark.parametrize(
    "name, message",
    [
        ("gsm9k", "unknown dataset 'gsm9k'.*gsm8k, math500, aime24, aime25, amc23, embedded"),
        ("./missing/data.jsonl", "unknown dataset"),
        ("missing.jsonl", "unknown dataset"),
    ],
)
def test_unknown_dataset(name, message):
    with pytest.raises(UserError, match=message):
        load_benchmark(name)


def test_bad_arguments():
    with pytest.raises(UserError, match="on_error"):
        load_benchmark("gsm8k", on_error="ignore")
    with pytest.raises(UserError, match="limit"):
        load_benchmark("gsm8k", limit=-1)


# --- Row and JSONL -----------------------------------------------------------------------------------------


def test_row_round_trip(tmp_path):
    rows = [
        Row("a", "Q1", "1"),
        Row("b", "Q2 ü", "\\frac{1}{2}", solution="s", difficulty=3, source="math500"),
        Row("c", "Q3", "2", difficulty=0.5),
    ]
    path = write_jsonl(tmp_path / "out" / "rows.jsonl", rows)
    assert [Row.from_dict(record) for record in read_jsonl(path)] == rows
    assert rows[1].to_dict()["difficulty"] == 3
    assert not list(path.parent.glob(".*tmp*"))


def test_write_jsonl_accepts_dicts(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"a": 1}, {"b": [2]}])
    assert read_jsonl(path) == [{"a": 1}, {"b": [2]}]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"id": "a", "question": "Q", "answer": 5}, "field 'answer' must be a string"),
        ({"id": 1, "question": "Q", "answer": "5"}, "field 'id' must be a string"),
        ({"id": "a", "question": "", "answer": "5"}, "empty field 'question'"),
        ({"id": "a", "question": "Q"}, "missing field 'answer'"),
    ],
)
def test_row_from_dict_validates(record, message):
    with pytest.raises(UserError, match=message):
        Row.from_dict(record)


def test_read_jsonl_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_jsonl(tmp_path / "absent.jsonl")
    path = write_lines(tmp_path / "bad.jsonl", [{"a": 1}, "{oops"])
    with pytest.raises(UserError, match=r"bad\.jsonl:2: invalid JSON"):
        read_jsonl(path)


@pytest.mark.parametrize(
    "text, torn_end, expected",
    [
        ('{"a": 1}\n{"a": 2}\n', False, [1, 2]),
        ('{"a": 1}\n\n{"a": 2}', False, [1, 2]),  # a whole last line needs no newline
        ('{"a": 1}\n{"a": 2}\n{"a"', True, [1, 2]),  # a writer killed mid-line
        ('{"a": 1}\n{"a"', False, r"2: invalid JSON"),
        ('{"a": 1}\n{"a"\n{"a": 3}\n', True, r"2: invalid JSON"),  # torn in the middle is never dropped
        ('{"a": 1}\n{"a"\n', True, r"2: invalid JSON"),  # a line that ended is not torn
        ('{"a": 1}\n[1]\n', False, "expected a JSON object"),
    ],
)
def test_read_jsonl_drops_only_a_torn_end_when_asked(tmp_path, text, torn_end, expected):
    path = tmp_path / "rows.jsonl"
    path.write_text(text, encoding="utf-8")
    if isinstance(expected, str):
        with pytest.raises(UserError, match=expected):
            read_jsonl(path, torn_end=torn_end)
    else:
        assert [r["a"] for r in read_jsonl(path, torn_end=torn_end)] == expected


# --- prompts ------------------------------------------------------------------------------------------------

PLAIN_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    + PLAIN_TEMPLATE
)
DROPS_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] != 'system' %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat_template: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.WordLevel({"[UNK]": 0, "budget": 1}, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_system_prompt_asks_for_the_format():
    for piece in ("<budget>", "</budget>", "<solution>", "</solution>", "\\boxed{}"):
        assert piece in SYSTEM_PROMPT


def test_build_messages():
    assert build_messages("Q?") == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Q?"},
    ]
    assert build_messages("Q?", system_prompt=None) == [{"role": "user", "content": "Q?"}]
    assert build_messages("Q?", system_prompt="Be brief.")[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("question", ["", "   \n", None])
def test_empty_question(question):
    with pytest.raises(UserError, match="empty"):
        build_messages(question)
    with pytest.raises(UserError, match="empty"):
        prompt_text(tiny_tokenizer(PLAIN_TEMPLATE), question)


@pytest.mark.parametrize(
    "template, budget, system_prompt, expected",
    [
        (PLAIN_TEMPLATE, None, "S.", "<|system|>S.\n<|user|>Q?\n<|assistant|>"),
        (PLAIN_TEMPLATE, 300, "S.", "<|system|>S.\n<|user|>Q?\n<|assistant|><budget>300</budget><solution>"),
        (PLAIN_TEMPLATE, 7, None, "<|user|>Q?\n<|assistant|><budget>7</budget><solution>"),
        # a template that rejects the system role: the instruction moves into the user turn
        (NO_SYSTEM_TEMPLATE, None, "S.", "<|user|>S.\n\nQ?\n<|assistant|>"),
        # a template that leaves system messages out on purpose is respected
        (DROPS_SYSTEM_TEMPLATE, 50, "S.", "<|user|>Q?\n<|assistant|><budget>50</budget><solution>"),
    ],
)
def test_prompt_text(template, budget, system_prompt, expected):
    tokenizer = tiny_tokenizer(template)
    assert prompt_text(tokenizer, "Q?", budget=budget, system_prompt=system_prompt) == expected


def test_prompt_text_default_system_prompt():
    text = prompt_text(tiny_tokenizer(PLAIN_TEMPLATE), "Q?")
    assert text == f"<|system|>{SYSTEM_PROMPT}\n<|user|>Q?\n<|assistant|>"


@pytest.mark.parametrize("budget", [0, -3, 10**9, "abc", 2.5, True])
def test_prompt_text_rejects_bad_budgets(budget):
    with pytest.raises(UserError, match="invalid budget"):
        prompt_text(tiny_tokenizer(PLAIN_TEMPLATE), "Q?", budget=budget)


def test_template_errors_other_than_system_role_surface():
    broken = tiny_tokenizer("{{ raise_exception('template is broken') }}")
    with pytest.raises(Exception, match="template is broken"):
        prompt_text(broken, "Q?")


def test_import_is_light():
    import subprocess

    code = "import sys, selfbudgeter.data; print(*(m in sys.modules for m in ('torch', 'datasets', 'sympy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


def test_file_or_folder_takes_the_file_or_the_folder_holding_it(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [{"a": 1}])
    assert data.file_or_folder(path, "train.jsonl", "hint") == path
    assert data.file_or_folder(tmp_path, "train.jsonl", "hint") == path
    with pytest.raises(UserError, match=r"other\.jsonl: no such file \(made by build-sft\)"):
        data.file_or_folder(tmp_path, "other.jsonl", "made by build-sft")
