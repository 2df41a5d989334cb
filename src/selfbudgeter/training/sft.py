"""Stage 1b, the cold start: supervised fine-tuning on the base model's own correct answers in budget format.

`selfbudgeter build-sft` writes `train.jsonl` rows (`prompt`, `completion`, `id`, `budget`) where the prompt
is the rendered chat prompt and the completion is `<budget>N</budget><solution>...</solution>` (METHOD.md,
Stage 1). This stage trains on them with TRL's `SFTTrainer`, the loss on the completion only, and saves the
model with its tokenizer and chat template at the top of `output_dir`, ready for `selfbudgeter grpo`.

Options are `SFTStageArgs` plus every field of `trl.SFTConfig`, read from a recipe (`--config embedded/sft`
or a YAML path) with command-line overrides. An interrupted run resumes from the last complete
`checkpoint-*` in `output_dir`.

Deviations from a plain `trl sft` run:
1. Without CUDA the run is forced onto the CPU in float32 (`use_cpu`, no bf16), whatever the recipe says,
   so a GPU recipe still starts on a laptop (slowly) instead of failing in TrainingArguments.
2. A leading BOS that the chat template already wrote is dropped from the prompt when the tokenizer adds
   its own (TRL tokenizes string prompts with special tokens; DeepSeek-R1-Distill would get two BOS).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..core.config import nullable
from ..core.errors import UserError

logger = logging.getLogger(__name__)

PROG = "selfbudgeter sft"
DESCRIPTION = (
    "Stage 1b: cold-start SFT on budget-labelled answers (build-sft's train.jsonl). Takes --config RECIPE "
    "(a YAML path or a packaged name such as embedded/sft) and any SFTConfig field as --field value."
)


@dataclass
class SFTStageArgs:
    """What the stage reads; everything about training itself is `trl.SFTConfig`."""

    model: str = field(default="embedded", metadata={"help": "`embedded`, a model folder or a hub id"})
    dataset: str | None = field(
        default=None, metadata={"help": "build-sft's train.jsonl, or the folder holding it"}
    )
    max_rows: int | None = field(default=None, metadata={"help": "train on the first N rows only"})

    def __post_init__(self) -> None:
        self.dataset = nullable(self.dataset)  # `--dataset null` (or none, ~, empty): none given, as in every stage


def cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def _device_overrides() -> list[str]:
    # Appended after the user's arguments so they win over the recipe: TrainingArguments refuses bf16 without
    # a GPU unless use_cpu is set, and must see both at construction.
    return ["--use_cpu", "true", "--bf16", "false", "--fp16", "false"] if cpu_only() else []


def parse_stage_config(types: tuple[type, ...], argv: Sequence[str] | None, prog: str, description: str) -> tuple:
    """`config.parse_config` plus the CPU overrides of `_device_overrides`."""
    from ..core.config import parse_config

    return parse_config(types, list(argv or []) + _device_overrides(), prog, description)


def parse_args(argv: Sequence[str] | None = None) -> tuple[SFTStageArgs, Any]:
    """(SFTStageArgs, trl.SFTConfig) from a recipe and overrides, e.g. `["--config", "embedded/sft"]`."""
    from trl import SFTConfig

    stage, config = parse_stage_config((SFTStageArgs, SFTConfig), argv, PROG, DESCRIPTION)
    return stage, config


def strip_template_bos(tokenizer: Any, text: str) -> str:
    """`text` without a leading BOS when the tokenizer will add its own (so the model sees exactly one)."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or not text.startswith(bos):
        return text
    ids = tokenizer("x")["input_ids"]
    if ids and ids[0] == tokenizer.bos_token_id:
        return text[len(bos) :]
    return text


def sft_file(dataset: str | os.PathLike | None) -> Path:
    """build-sft's train.jsonl: `dataset` itself, or the train.jsonl in the folder `dataset`."""
    from ..data import file_or_folder

    if dataset is None:
        raise UserError("no --dataset: give build-sft's train.jsonl or the folder holding it")
    return file_or_folder(dataset, "train.jsonl", "build it with `selfbudgeter build-sft`")


def load_sft_rows(dataset: str | os.PathLike | None, max_rows: int | None = None) -> list[dict[str, str]]:
    """The prompt/completion pairs of a build-sft file, checked; the other columns are not trained on."""
    from ..data import read_jsonl

    if max_rows is not None and max_rows < 1:
        raise UserError(f"max_rows must be >= 1, not {max_rows}")
    path = sft_file(dataset)
    records = read_jsonl(path)
    rows = []
    for number, record in enumerate(records, start=1):
        for name in ("prompt", "completion"):
            value = record.get(name)
            if not isinstance(value, str) or not value:
                raise UserError(f"{path}: record {number}: field {name!r} must be a non-empty string")
        rows.append({"prompt": record["prompt"], "completion": record["completion"]})
        if max_rows is not None and len(rows) >= max_rows:
            break
    if not rows:
        raise UserError(f"{path}: no rows to train on")
    return rows


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest `checkpoint-N` of `output_dir` that was written completely (it has its trainer state)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for path in root.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    for _, path in sorted(found, reverse=True):
        if (path / "trainer_state.json").is_file():
            return path
        logger.warning("skipping %s: incomplete (no trainer_state.json), probably interrupted while saving", path)
    return None


def resume_point(config: Any) -> str | None:
    """An explicit `resume_from_checkpoint`, else the last complete checkpoint in `output_dir`, else None."""
    explicit = getattr(config, "resume_from_checkpoint", None)
    if explicit:
        if not Path(explicit).is_dir():
            raise UserError(f"resume_from_checkpoint {explicit}: no such folder")
        return str(explicit)
    found = last_checkpoint(config.output_dir)
    return str(found) if found is not None else None


def save_final(trainer: Any, tokenizer: Any, output_dir: str | os.PathLike) -> Path:
    """Model, tokenizer and chat template at the top of `output_dir` (from_pretrained loads it directly)."""
    out = Path(output_dir)
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out)
    return out


def run_sft(stage: SFTStageArgs, config: Any, callbacks: list | None = None) -> Path:
    """Train and save; returns `config.output_dir`. Resumes from the last checkpoint there, if any."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTTrainer

    from ..core.models import load_tokenizer, resolve

    source = resolve(stage.model)
    tokenizer = load_tokenizer(stage.model)
    if not tokenizer.chat_template:
        raise UserError(f"model {stage.model!r} has no chat template: the cold start trains chat turns")
    rows = load_sft_rows(stage.dataset, stage.max_rows)
    dataset = Dataset.from_dict(
        {
            "prompt": [strip_template_bos(tokenizer, r["prompt"]) for r in rows],
            "completion": [r["completion"] for r in rows],
        }
    )
    set_seed(config.seed)
    resume = resume_point(config)
    logger.info(
        "sft: %s on %d rows from %s -> %s%s",
        source,
        len(rows),
        sft_file(stage.dataset),
        config.output_dir,
        f" (resuming from {resume})" if resume else "",
    )
    trainer = SFTTrainer(
        model=source, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=resume)
    out = save_final(trainer, tokenizer, config.output_dir)
    logger.info("sft: saved the cold-start model to %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    stage, config = parse_args(argv)
    out = run_sft(stage, config)
    print(f"cold-start model saved to {out}")
    return 0
