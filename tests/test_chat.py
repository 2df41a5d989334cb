"""The `selfbudgeter chat` CLI driven in a real terminal (pexpect) and as a script (JSON on stdout).

`pytest tests/test_chat.py` (CPU; each test starts the CLI, about a minute in all). The deterministic
runs load the scripted model of test_generator.py, registered by a small launcher; the real transformers
path uses conftest's random tiny model with a user budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")
pytest.importorskip("torch")

TESTS = Path(__file__).resolve().parent
JSON_KEYS = {
    "budget",
    "budget_source",
    "seconds_to_budget",
    "seconds_total",
    "used_tokens",
    "answer",
    "finish_reason",
    "within_budget",
    "generated_tokens",
}
LAUNCHER = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from test_generator import register_scripted
register_scripted()
from selfbudgeter.cli import main
sys.exit(main(["chat", *sys.argv[1:]]))
"""
ENV = {**os.environ, "TERM": "xterm", "COLUMNS": "120", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "chat_launcher.py"
    path.write_text(LAUNCHER)
    return path


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory, embedded_tokenizer) -> Path:
    from test_generator import save_scripted

    # About 120 tokens at 30 ms a step: long enough to answer a prompt or press Ctrl-C mid-solution.
    content = "Still thinking. " * 8 + "\\boxed{5}"
    return save_scripted(tmp_path_factory.mktemp("slow-scripted"), embedded_tokenizer, delay=0.03, content=content)


@pytest.fixture(scope="module")
def fast_model_dir(tmp_path_factory, embedded_tokenizer) -> Path:
    from test_generator import save_scripted

    return save_scripted(tmp_path_factory.mktemp("fast-scripted"), embedded_tokenizer)


def spawn(launcher: Path, *args: str):
    child = pexpect.spawn(
        sys.executable, [str(launcher), *args], env=ENV, encoding="utf-8", timeout=120, dimensions=(40, 120)
    )
    return child


def test_budget_line_comes_before_the_solution_and_no_stops(launcher, slow_model_dir):
    child = spawn(launcher, "--model", str(slow_model_dir), "--temperature", "0")
    child.expect("Question>")
    child.sendline("What is 2+3?")
    child.expect(r"Budget: 12 tokens \(model's estimate\) · ETA [0-9.]+ s")
    assert "Still thinking" not in child.before
    child.expect(r"Continue\? \[Y/n\]")
    child.sendline("y")
    child.expect("Still thinking")
    child.expect("Answer: 5")
    child.expect(r"Used \d+ of 12 budget tokens \(over budget\)")
    child.expect("Ended: the model finished its solution")
    # Saying no stops the next one before its solution is through.
    child.expect("Question>")
    child.sendline("What is 4+5?")
    child.expect(r"Continue\? \[Y/n\]")
    child.sendline("n")
    child.expect("Ended: stopped")
    assert "\\boxed{5}" not in child.before
    child.expect("Question>")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_once_answers_now_twice_stops(launcher, slow_model_dir):
    child = spawn(launcher, "--model", str(slow_model_dir), "--yes", "--temperature", "0")
    child.expect("Question>")
    child.sendline("What is 2+3?")
    child.expect("Budget: 12 tokens")
    child.expect("Still")
    child.sendintr()
    child.expect("Answering now")
    child.expect("Answer: 7")  # the scripted model's forced answer differs from its natural one (5)
    child.expect(r"Ended: answered early")
    # The loop goes on: a second question, interrupted twice, is stopped.
    child.expect("Question>")
    child.sendline("What is 4+5?")
    child.expect("Still")
    child.sendintr()
    child.sendintr()
    child.expect(r"Ended: (stopped|answered early)")
    child.expect("Question>")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def _run(*args: str, launcher: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(launcher)] if launcher else [sys.executable, "-m", "selfbudgeter.cli", "chat"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=180, env=ENV)


def test_json_one_shot_prints_one_object(launcher, fast_model_dir):
    done = _run("--model", str(fast_model_dir), "--question", "What is 2+3?", "--json", launcher=launcher)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1
    result = json.loads(done.stdout)
    assert JSON_KEYS <= set(result)
    assert (result["budget"], result["budget_source"], result["answer"]) == (12, "model", "5")
    assert result["finish_reason"] == "finished" and result["within_budget"] is False
    assert 0 < result["seconds_to_budget"] <= result["seconds_total"]


def test_lenient_extraction_reads_the_answer_of_a_prose_model(launcher, tmp_path, embedded_tokenizer):
    from test_generator import save_scripted

    prose = save_scripted(tmp_path / "prose", embedded_tokenizer, content="Ben has 10 + 1 = 11 stamps in total.")
    answers = []
    for extraction in ([], ["--answer-extraction", "lenient"]):
        done = _run("--model", str(prose), "--question", "How many stamps?", "--json", *extraction,
                    launcher=launcher)
        assert done.returncode == 0, done.stderr
        answers.append(json.loads(done.stdout)["answer"])
    assert answers == [None, "11"]


def test_json_with_a_user_budget_on_the_real_model(tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--budget", "8", "--question", "What is 2+3?", "--json"]
    done = _run(*args, "--max-new-tokens", "12", "--seed", "0", "--enforce")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert JSON_KEYS <= set(result)
    assert (result["budget"], result["budget_source"]) == (8, "user")
    assert result["generated_tokens"] <= 12 and result["within_budget"] is (result["used_tokens"] <= 8)


@pytest.mark.parametrize("over", [0, 1])
def test_the_summary_measures_the_solution_as_training_does(embedded_tokenizer, over):
    # Was "Used 64 of 52 budget tokens (over budget)" for a solution on budget: the count held the solution
    # tags. Now it is format.token_length of the solution, the length training rewards.
    from rich.console import Console
    from test_generator import CONTENT, scripted_model

    from selfbudgeter.core import format as fmt
    from selfbudgeter.serving.chat import make_parser, run_interactive
    from selfbudgeter.serving.generator import BudgetGenerator

    length = fmt.token_length(embedded_tokenizer, CONTENT)
    args = make_parser().parse_args(["--model", "scripted", "--yes", "--temperature", "0"])
    console = Console(record=True, width=120)
    model = scripted_model(embedded_tokenizer, budget=length - over)
    with BudgetGenerator(model, embedded_tokenizer, warmup=False) as gen:
        final = run_interactive(gen, args, "What is 2+3?", None, console)
    assert final.finish_reason == "finished" and final.solution == CONTENT
    verdict = "over budget" if over else "within budget"
    assert f"Used {length} of {length - over} budget tokens ({verdict})" in console.export_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "0"], "at least 1"),
        (["--budget", "-5"], "at least 1"),
        (["--budget", str(10**12)], "at most"),
        (["--budget", "abc"], "whole number"),
        (["--json"], "--json needs --question"),
        (["--question", "  "], "empty"),
        (["--seed", str(2**64), "--question", "hi"], "seed"),  # past torch's 64-bit seed: used to crash mid-batch
        (["--temperature", "-1", "--question", "hi"], "temperature"),
        (["--question", "What is \udcff?"], "Unicode"),  # an undecodable byte in argv becomes a lone surrogate
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_model_dir, args, message):
    done = _run("--model", str(tiny_model_dir), *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("selfbudgeter chat: error:")
    assert done.stdout == ""


def test_unknown_model_path_is_one_line_and_exit_2(tmp_path):
    done = _run("--model", str(tmp_path / "missing"), "--question", "hi")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr
