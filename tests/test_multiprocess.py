"""SFT and GRPO under `accelerate launch` with two processes on the CPU (gloo), on the embedded default.

    .venv/bin/python -m pytest -q -m slow tests/test_multiprocess.py     # about a minute on 2 cores

`recipes/accelerate/cpu2.yaml` uses accelerate's torchrun launcher (`distributed_type: MULTI_GPU`); the stages
set `use_cpu` when there is no CUDA, so each rank joins a gloo group. (`accelerate launch --cpu` would take
accelerate's MPI path instead, which starts one process unless an MPI hostfile is given.)

Proof that two ranks trained: the epoch logged after one optimizer step is (ranks x per-device batch) /
rows. One process would log half of it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CPU2 = REPO / "src" / "selfbudgeter" / "recipes" / "accelerate" / "cpu2.yaml"
ROWS = 16  # SFT rows and GRPO prompts


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(stage_args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CPU2),
        "--main_process_port", str(_free_port()),  # the default 29500 collides with any other run
        "-m", "selfbudgeter.cli", *stage_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{' '.join(stage_args[:1])} failed:\n{output}"
    return result


def first_step_epoch(output_dir: Path) -> float:
    (state,) = output_dir.glob("checkpoint-*/trainer_state.json")
    history = json.loads(state.read_text())["log_history"]
    return next(entry["epoch"] for entry in history if entry.get("step") == 1)


def assert_saved_model(folder: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        assert (folder / name).is_file(), f"{folder} has no {name}"


@pytest.fixture(scope="module")
def sft_rows(tmp_path_factory) -> Path:
    """Budget-format SFT rows from the embedded task's reference solutions (the format build-sft writes)."""
    from selfbudgeter.data import prompt_text, write_jsonl
    from selfbudgeter.core.format import render_response, token_length
    from selfbudgeter.core.models import load_tokenizer
    from selfbudgeter.embedded.task import load_split

    tokenizer = load_tokenizer("embedded")
    rows = [
        {
            "prompt": prompt_text(tokenizer, row.question, system_prompt=None),
            "completion": render_response(token_length(tokenizer, row.solution), row.solution),
        }
        for row in load_split("train")[:ROWS]
    ]
    return write_jsonl(tmp_path_factory.mktemp("sft-data") / "train.jsonl", rows)


def test_sft_then_grpo_on_two_cpu_processes(tmp_path, sft_rows):
    sft_out, grpo_out = tmp_path / "sft", tmp_path / "grpo"
    per_device = 2
    launch(
        [
            "sft", "--config", "embedded/sft", "--model", "embedded", "--dataset", str(sft_rows),
            "--output_dir", str(sft_out), "--max_steps", "2", "--per_device_train_batch_size", str(per_device),
            "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2",
        ],
        tmp_path,
    )
    assert_saved_model(sft_out)
    assert first_step_epoch(sft_out) == pytest.approx(2 * per_device / ROWS)

    # GRPO counts completions per device: 4 per rank = one prompt's group of 4, so two prompts a step.
    generations = 4
    launch(
        [
            "grpo", "--config", "embedded/grpo", "--model", str(sft_out), "--dataset", "embedded",
            "--profile", "", "--limit", str(ROWS), "--output_dir", str(grpo_out), "--max_steps", "2",
            "--num_generations", str(generations), "--per_device_train_batch_size", str(generations),
            "--max_completion_length", "24", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2",
        ],
        tmp_path,
    )
    assert_saved_model(grpo_out)
    assert first_step_epoch(grpo_out) == pytest.approx(2 / ROWS)
