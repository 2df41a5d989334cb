"""Stage 0, `selfbudgeter profile`: sample the base model on training questions, grade, measure, get b_max.

Writes to `out/`:
    samples.jsonl    one row per sample: id, sample, response, n_tokens, correct, predicted, grading_error,
                     finish_reason, difficulty
    questions.jsonl  one row per question: id, question, answer, difficulty, samples, correct, accuracy,
                     b_max (median token length of the correct samples; null when none was correct), ...
    summary.json     accuracy, lengths, a per-difficulty table, the config and the wall time
    config.json      the sampling settings, checked when a run resumes

Lengths are `format.token_length` of the stripped response: the unit of the budgets that `build-sft` writes
(`render_response(N, response.strip())`), so that b_max and those budgets compare like for like.

Resuming: samples are appended one chunk of questions at a time and fsync'd. A rerun with the same
settings keeps every question whose samples are all on disk, drops the rows of a question left half
written (and a torn last line), and samples the rest. Every sample's seed depends on its prompt and index
only (see `generation`), so a resumed run writes the rows an uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..core.config import nullable
from ..core.errors import UserError
from ..core.grading import EXTRACTION_HELP

logger = logging.getLogger(__name__)

# DeepSeek-R1's recommended instruction for math (its model card); the embedded recipe sets null.
BASE_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

# Settings that change what is sampled, or how it is graded: a resumed run must match them. batch_size,
# limit, chunk_size, backend and device do not change a sample (up to floating point; see `generation`).
SAMPLING_KEYS = ("model", "dataset", "split", "data_dir", "samples", "temperature", "top_p", "max_new_tokens",
                 "seed", "system_prompt", "answer_extraction")


@dataclass
class ProfileConfig:
    model: str = field(default="embedded", metadata={"help": "model: `embedded`, a local HF folder or a hub id"})
    dataset: str = field(
        default="embedded",
        metadata={"help": "benchmark name, file, folder or hub id (`selfbudgeter.data.load_benchmark`); "
                  "several separated by commas"},
    )
    split: str = field(default="train", metadata={"help": "dataset split"})
    limit: int | None = field(default=None, metadata={"help": "use the first N questions of each dataset"})
    data_dir: str | None = field(
        default=None, metadata={"help": "local benchmark folder (<data_dir>/<name>/<split>.jsonl); "
                                "default $SELFBUDGETER_DATA, else the Hub"}
    )
    samples: int = field(default=4, metadata={"help": "samples per question (k)"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature; 0 is greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    max_new_tokens: int = field(default=1024, metadata={"help": "cap on generated tokens per sample"})
    batch_size: int = field(default=32, metadata={"help": "sequences per generation batch"})
    chunk_size: int = field(default=64, metadata={"help": "questions per saved chunk (the unit of resumption)"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    system_prompt: str | None = field(
        default=BASE_SYSTEM_PROMPT,
        metadata={"help": "system prompt (null in YAML for none, e.g. for templates without a system turn)"},
    )
    answer_extraction: Literal["boxed", "lenient"] = field(
        default="boxed",
        metadata={"help": EXTRACTION_HELP},
    )
    out: str = field(default="runs/profile", metadata={"help": "output folder"})
    backend: Literal["transformers", "vllm"] = field(default="transformers", metadata={"help": "generation backend"})
    device: str = field(default="auto", metadata={"help": "transformers device: auto, cpu, cuda, ..."})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})

    def __post_init__(self) -> None:
        for name in ("samples", "max_new_tokens", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit must be >= 1, not {self.limit}")
        # `--system_prompt null` on the command line arrives as the string "null".
        self.system_prompt = nullable(self.system_prompt)
        self.data_dir = nullable(self.data_dir)
        if self.answer_extraction not in ("boxed", "lenient"):
            raise UserError(f"answer_extraction must be one of boxed, lenient, not {self.answer_extraction!r}")


def dataset_names(spec: str) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise UserError("no dataset given")
    return names


def load_rows(spec: str, split: str, data_dir: str | None, limit: int | None) -> list:
    """Rows of every dataset in the comma-separated `spec` (the limit applies to each); ids must be unique."""
    from ..data import load_benchmark

    rows = [row for name in dataset_names(spec) for row in load_benchmark(name, split, data_dir=data_dir,
                                                                          limit=limit)]
    seen: set[str] = set()
    for row in rows:
        if row.id in seen:
            raise UserError(f"question id {row.id!r} appears twice in {spec!r}: profiles are keyed by id")
        seen.add(row.id)
    return rows


# --- aggregation -------------------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _mean(values: Sequence[float]) -> float | None:
    return float(statistics.fmean(values)) if values else None


def aggregate(samples: Iterable[dict[str, Any]], rows: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """One dict per question from sample rows: counts, accuracy and b_max (median correct length, or None).

    With `rows` (data.Row) the questions come in their order and carry question and answer text; without,
    in order of first appearance with question and answer None.
    """
    by_id: dict[str, list[dict[str, Any]]] = {}
    for sample in samples:
        by_id.setdefault(sample["id"], []).append(sample)
    info = {row.id: row for row in rows} if rows is not None else {}
    order = [row.id for row in rows if row.id in by_id] if rows is not None else list(by_id)
    questions = []
    for qid in order:
        group = sorted(by_id[qid], key=lambda s: s.get("sample", 0))
        correct = [s for s in group if s.get("correct")]
        row = info.get(qid)
        questions.append(
            {
                "id": qid,
                "question": row.question if row is not None else None,
                "answer": row.answer if row is not None else None,
                "difficulty": row.difficulty if row is not None else group[0].get("difficulty"),
                "samples": len(group),
                "correct": len(correct),
                "accuracy": len(correct) / len(group),
                "b_max": _median([s["n_tokens"] for s in correct]),
                "mean_tokens": _mean([s["n_tokens"] for s in group]),
                "truncated": sum(s.get("finish_reason") == "length" for s in group),
                "grading_errors": sum(s.get("grading_error") is not None for s in group),
            }
        )
    return questions


def _difficulty_key(value: Any) -> tuple[int, float, str]:
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def summarize(samples: Sequence[dict[str, Any]], questions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall and per-difficulty accuracy and lengths of a profile."""

    def block(ss: Sequence[dict[str, Any]], qs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        lengths = [s["n_tokens"] for s in ss]
        b_max = [q["b_max"] for q in qs if q["b_max"] is not None]
        return {
            "questions": len(qs),
            "samples": len(ss),
            "accuracy": _mean([float(bool(s["correct"])) for s in ss]),
            "solved": _mean([float(q["correct"] > 0) for q in qs]),  # share with at least one correct sample
            "mean_tokens": _mean(lengths),
            "median_tokens": _median(lengths),
            "mean_correct_tokens": _mean([s["n_tokens"] for s in ss if s["correct"]]),
            "median_b_max": _median(b_max),
            "truncated": _mean([float(s.get("finish_reason") == "length") for s in ss]),
        }

    levels = sorted({q["difficulty"] for q in questions}, key=_difficulty_key)
    by_level = {}
    for level in levels:
        qs = [q for q in questions if q["difficulty"] == level]
        ids = {q["id"] for q in qs}
        by_level["none" if level is None else str(level)] = block([s for s in samples if s["id"] in ids], qs)
    return {
        **block(samples, questions),
        "grading_errors": sum(s.get("grading_error") is not None for s in samples),
        "by_difficulty": by_level,
    }


# --- resumable sample file ---------------------------------------------------------------------------------


def read_finished(path: Path, k: int) -> list[dict[str, Any]]:
    """Rows of questions whose `k` samples are all in `path`; rewrites the file to hold exactly those.

    A torn last line (a killed writer) and the rows of a half-written question are dropped.
    """
    from ..data import read_jsonl, write_jsonl

    if not path.exists():
        return []
    try:
        rows = read_jsonl(path, torn_end=True)
    except UserError as err:
        raise UserError(f"{err}; delete the file to start over") from None
    by_id: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_id.setdefault(row["id"], {})[row["sample"]] = row
    complete = {qid for qid, group in by_id.items() if set(group) == set(range(k))}
    kept = [row for row in rows if row["id"] in complete]
    # Keep one row per (id, sample) in case an earlier run died between two appends of the same chunk.
    unique = {(row["id"], row["sample"]): row for row in kept}
    kept = [unique[key] for key in dict.fromkeys((row["id"], row["sample"]) for row in kept)]
    if len(kept) != len(rows) or not _ends_with_newline(path):
        write_jsonl(path, kept)
        logger.info("%s: kept %d rows of %d finished questions", path, len(kept), len(complete))
    return kept


def _ends_with_newline(path: Path) -> bool:
    """Whether the file is empty or ends with a whole line (a torn last line does not)."""
    with open(path, "rb") as fh:
        if fh.seek(0, os.SEEK_END) == 0:
            return True
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows as one write, flushed to disk: a crash loses at most this chunk."""
    payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())


def _check_resume(out: Path, cfg: ProfileConfig) -> None:
    path = out / "config.json"
    wanted = {key: getattr(cfg, key) for key in SAMPLING_KEYS}
    if path.exists() and (out / "samples.jsonl").exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            saved = {}
        changed = [key for key in SAMPLING_KEYS if key in saved and saved[key] != wanted[key]]
        if changed:
            key = changed[0]
            raise UserError(
                f"{out} holds a profile made with {key}={saved[key]!r}, not {wanted[key]!r}; "
                "use another --out or delete the folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")


# --- the stage ---------------------------------------------------------------------------------------------


def sample_rows(tokenizer: Any, rows: Sequence[Any], samples: Sequence[Sequence[Any]],
                answer_extraction: str = "boxed") -> list[dict[str, Any]]:
    """samples.jsonl rows: each generated sample graded against its question's gold answer (its final answer
    read by `answer_extraction`, `grading.grade`'s)."""
    from ..core.format import token_length
    from ..core.grading import grade

    out = []
    for row, per in zip(rows, samples):
        for index, sample in enumerate(per):
            result = grade(sample.text, row.answer, extraction=answer_extraction)
            out.append(
                {
                    "id": row.id,
                    "sample": index,
                    "response": sample.text,
                    "n_tokens": token_length(tokenizer, sample.text.strip()),
                    "correct": bool(result.correct) and result.error is None,
                    "predicted": result.predicted,
                    "grading_error": result.error,
                    "finish_reason": sample.finish_reason,
                    "difficulty": row.difficulty,
                }
            )
    return out


def profile(cfg: ProfileConfig, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Run (or resume) a profile into `cfg.out`; returns the summary. Pass `model` and `tokenizer` to reuse
    an already loaded model (transformers backend)."""
    from ..data import prompt_text, write_jsonl
    from ..evaluation.generation import generate, load, progress_bar

    start = time.perf_counter()
    out = Path(cfg.out)
    rows = load_rows(cfg.dataset, cfg.split, cfg.data_dir, cfg.limit)
    _check_resume(out, cfg)
    samples_path = out / "samples.jsonl"
    done = read_finished(samples_path, cfg.samples)
    finished = {row["id"] for row in done}
    todo = [row for row in rows if row.id not in finished]
    if finished:
        logger.info("resuming: %d of %d questions already profiled", len(rows) - len(todo), len(rows))
    if todo:
        if model is None:
            model, tokenizer = load(cfg.model, cfg.backend, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
        elif tokenizer is None:
            raise UserError("profile(): a model was given without its tokenizer")
    tokens = 0
    with progress_bar() as bar:
        task = bar.add_task("profiling", total=len(todo), speed="")
        for first in range(0, len(todo), cfg.chunk_size):
            chunk = todo[first : first + cfg.chunk_size]
            prompts = [prompt_text(tokenizer, row.question, system_prompt=cfg.system_prompt) for row in chunk]
            generated = generate(
                model,
                tokenizer,
                prompts,
                n=cfg.samples,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                backend=cfg.backend,
                progress=lambda advance: bar.update(task, advance=advance),
            )
            new = sample_rows(tokenizer, chunk, generated, cfg.answer_extraction)
            append_rows(samples_path, new)
            done.extend(new)
            tokens += sum(s.n_tokens for per in generated for s in per)
            bar.update(task, speed=f"{tokens / (time.perf_counter() - start):,.0f} tok/s")
    all_ids = {row.id for row in rows}
    current = [s for s in done if s["id"] in all_ids]  # a smaller --limit than a previous run: report its part
    questions = aggregate(current, rows)
    write_jsonl(out / "questions.jsonl", questions)
    summary = {
        **summarize(current, questions),
        "model": cfg.model,
        "dataset": cfg.dataset,
        "wall_seconds": time.perf_counter() - start,
        "config": asdict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    logger.info("profile of %d questions written to %s", len(questions), out)
    return summary


def print_summary(summary: dict[str, Any], out: str) -> None:
    from ..evaluation.report import print_table

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    rows = [["difficulty", "questions", "accuracy", "solved", "mean tok", "b_max", "cut"]]
    for name, block in [*summary["by_difficulty"].items(), ("all", summary)]:
        rows.append([name, str(block["questions"]), pct(block["accuracy"]), pct(block["solved"]),
                     num(block["mean_tokens"]), num(block["median_b_max"]), pct(block["truncated"])])
    print_table(rows, f"profile of {summary['model']} on {summary['dataset']}",
                "solved: questions with a correct sample; b_max: median over questions; cut: samples at the cap",
                f"written to {out}/ (samples.jsonl, questions.jsonl, summary.json)")


def parse_args(argv: Sequence[str] | None = None) -> ProfileConfig:
    """The stage's options from a recipe (`--config embedded/profile`) and `--field value` overrides."""
    from ..core.config import parse_config

    (cfg,) = parse_config(
        (ProfileConfig,),
        argv,
        prog="selfbudgeter profile",
        description="Stage 0: sample a model k times per question, grade each sample, record token lengths "
        "and b_max (median length of the correct samples). Resumable: rerun the same command after a stop.",
    )
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    summary = profile(cfg)
    print_summary(summary, cfg.out)
    return 0
