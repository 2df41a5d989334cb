"""Stage 1b (cold-start SFT): data checks, a few steps on a tiny model, the saved folder, resume.

Run with `pytest tests/test_sft.py`; the training tests take a few seconds each on a 2-core CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from selfbudgeter.training import sft
from selfbudgeter.core.errors import UserError


def _write_rows(path: Path, tokenizer, n: int = 8) -> Path:
    from selfbudgeter.embedded import task
    from selfbudgeter.data import prompt_text
    from selfbudgeter.core.format import render_response, token_length

    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for row in task.load_split("train")[:n]:
            solution = task.render_trace(task.parse_question(row.question), rng)[:300]
            budget = max(1, token_length(tokenizer, solution))
            record = {
                "id": row.id,
                "prompt": prompt_text(tokenizer, row.question, system_prompt=None),
                "completion": render_response(budget, solution),
                "budget": budget,
            }
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture
def sft_rows(tmp_path, embedded_tokenizer) -> Path:
    return _write_rows(tmp_path / "train.jsonl", embedded_tokenizer)


def _args(model_dir: Path, dataset: Path, out: Path, *extra: str):
    return sft.parse_args(
        [
            "--config", "embedded/sft",
            "--model", str(model_dir),
            "--dataset", str(dataset),
            "--output_dir", str(out),
            "--per_device_train_batch_size", "4",
            "--warmup_steps", "0",
            "--logging_steps", "1",
            "--save_steps", "1",
            *extra,
        ]
    )  # fmt: skip


def _recorder():
    """A TrainerCallback noting the global step at train begin and after each step."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.begin_step = None
            self.steps = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin_step = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    return Recorder()


# --- data ------------------------------------------------------------------------------------------------


def test_load_rows_folder_or_file_and_max_rows(sft_rows):
    assert len(sft.load_sft_rows(sft_rows)) == 8
    rows = sft.load_sft_rows(sft_rows.parent, max_rows=3)
    assert len(rows) == 3
    assert set(rows[0]) == {"prompt", "completion"}


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "p"}, "'completion'"),
        ({"prompt": "", "completion": "c"}, "'prompt'"),
        ({"prompt": "p", "completion": 3}, "'completion'"),
    ],
)
def test_bad_rows_are_user_errors(tmp_path, record, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match=message):
        sft.load_sft_rows(path)


def test_missing_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        sft.load_sft_rows(tmp_path)
    with pytest.raises(UserError, match="--dataset"):
        sft.load_sft_rows(None)


@pytest.mark.parametrize("spelling", ["null", "none", "~", ""])
def test_dataset_null_means_none_given(spelling):
    # the one null spelling (config.nullable): `--dataset null` is no dataset, not a file named "null"
    assert sft.SFTStageArgs(dataset=spelling).dataset is None
    with pytest.raises(UserError, match="--dataset"):
        sft.sft_file(sft.SFTStageArgs(dataset=spelling).dataset)


def test_sft_file_takes_the_file_or_its_folder(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    assert sft.sft_file(tmp_path) == sft.sft_file(tmp_path / "train.jsonl") == tmp_path / "train.jsonl"
    with pytest.raises(UserError, match="build-sft"):
        sft.sft_file(tmp_path / "elsewhere")


def test_recipe_forces_cpu_and_takes_overrides(tmp_path, sft_rows, tiny_model_dir):
    stage, config = _args(tiny_model_dir, sft_rows, tmp_path / "out", "--max_rows", "5")
    assert stage.max_rows == 5 and stage.model == str(tiny_model_dir)
    assert config.completion_only_loss is True
    if sft.cpu_only():
        assert config.use_cpu and not config.bf16


def test_unknown_recipe_is_a_user_error():
    with pytest.raises(UserError, match="no_such_recipe"):
        sft.parse_args(["--config", "embedded/no_such_recipe"])


def test_strip_template_bos_only_when_the_tokenizer_adds_one():
    class Tok:
        bos_token, bos_token_id = "<s>", 1

        def __init__(self, adds):
            self.adds = adds

        def __call__(self, text):
            return {"input_ids": ([1] if self.adds else []) + [5]}

    assert sft.strip_template_bos(Tok(True), "<s>user: hi") == "user: hi"
    assert sft.strip_template_bos(Tok(False), "<s>user: hi") == "<s>user: hi"
    assert sft.strip_template_bos(Tok(True), "user: hi") == "user: hi"


def test_last_checkpoint_skips_incomplete(tmp_path):
    for step, complete in ((1, True), (2, True), (3, False)):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if complete:
            (path / "trainer_state.json").write_text("{}")
    assert sft.last_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert sft.last_checkpoint(tmp_path / "absent") is None


# --- training --------------------------------------------------------------------------------------------


def test_sft_trains_saves_and_resumes(tmp_path, sft_rows, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    first = _recorder()
    saved = sft.run_sft(*_args(tiny_model_dir, sft_rows, out, "--max_steps", "2"), callbacks=[first])
    assert saved == out
    assert first.begin_step == 0 and first.steps == [1, 2]
    assert sft.last_checkpoint(out) == out / "checkpoint-2"

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    assert tokenizer.chat_template and "<|assistant|>" in tokenizer.chat_template

    # A longer run in the same folder continues from checkpoint-2 instead of starting over.
    second = _recorder()
    sft.run_sft(*_args(tiny_model_dir, sft_rows, out, "--max_steps", "4"), callbacks=[second])
    assert second.begin_step == 2 and second.steps == [3, 4]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]
