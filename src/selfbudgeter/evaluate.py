"""`selfbudgeter eval`: accuracy, length, budget adherence and user-budget control of a model.

Every response is scored by `rewards.score_response`, so evaluation measures exactly what training
rewards: the budget parsed from the response, the solution's token length, and correctness of a closed
solution (a broken format is never graded). With `budgeted: false` (base and baseline models, which are
not asked for the format) the length is that of the whole response and the whole response is graded.

User-budget control: for each of the first `control_limit` questions whose first response stated a valid
budget E (the model's own estimate), the assistant turn is prefilled with `<budget>B</budget><solution>`
for B = round(m * E) (at least 1) at every multiplier m, and `render_prefill(B) + continuation` is scored.

Writes to `out/` (for several datasets, to `out/<dataset>/` each, plus an averaged `out/summary.json` as
the paper reports it: the mean over benchmarks of accuracy, length and compression):
    items.jsonl   one record per response, in the schema `metrics.py` documents (control records carry
                  prefill_budget and control_multiplier)
    metrics.json  `metrics.summarize(...)` plus wall_seconds, model, dataset and the config
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .data import SYSTEM_PROMPT
from .config import nullable
from .errors import UserError
from .format import DEFAULT_MAX_BUDGET
from .task import SOURCE as EMBEDDED_SOURCE

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    model: str = field(default="embedded", metadata={"help": "model: `embedded`, a local HF folder or a hub id"})
    dataset: str = field(
        default="embedded",
        metadata={"help": "benchmark name, file, folder or hub id; several separated by commas "
                  "(e.g. gsm8k,math500,aime25) are evaluated one by one and averaged"},
    )
    split: str = field(default="test", metadata={"help": "dataset split"})
    limit: int | None = field(default=None, metadata={"help": "use the first N questions of each dataset"})
    data_dir: str | None = field(
        default=None, metadata={"help": "local benchmark folder (<data_dir>/<name>/<split>.jsonl); "
                                "default $SELFBUDGETER_DATA, else the Hub"}
    )
    samples: int = field(default=1, metadata={"help": "responses per question"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature; 0 is greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    max_new_tokens: int = field(default=1024, metadata={"help": "cap on generated tokens per response"})
    batch_size: int = field(default=32, metadata={"help": "sequences per generation batch"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    system_prompt: str | None = field(
        default=SYSTEM_PROMPT,
        metadata={"help": "system prompt (null for none); use the one the model was trained with"},
    )
    budgeted: bool = field(
        default=True,
        metadata={"help": "expect <budget>N</budget><solution>...</solution>; false for base models (whole "
                  "response graded and measured, no control runs)"},
    )
    control_multipliers: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0],
        metadata={"help": "user-budget control: prefill these multiples of the model's own estimate "
                  "([] in YAML disables)"},
    )
    control_limit: int = field(default=100, metadata={"help": "questions used for the control runs"})
    max_budget: int = field(default=DEFAULT_MAX_BUDGET, metadata={"help": "budgets above this are format failures"})
    baseline: str | None = field(
        default=None,
        metadata={"help": "a baseline eval folder (same datasets): compression = 1 - mean tokens / its mean tokens"},
    )
    out: str = field(default="runs/eval", metadata={"help": "output folder"})
    backend: Literal["transformers", "vllm"] = field(default="transformers", metadata={"help": "generation backend"})
    device: str = field(default="auto", metadata={"help": "transformers device: auto, cpu, cuda, ..."})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})

    def __post_init__(self) -> None:
        for name in ("samples", "max_new_tokens", "batch_size", "max_budget"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit must be >= 1, not {self.limit}")
        if self.control_limit < 0:
            raise UserError(f"control_limit must be >= 0, not {self.control_limit}")
        bad = [m for m in self.control_multipliers if not (isinstance(m, (int, float)) and m > 0 and math.isfinite(m))]
        if bad:
            raise UserError(f"control multipliers must be positive numbers, not {bad[0]!r}")
        self.control_multipliers = [float(m) for m in self.control_multipliers]
        # `--system_prompt null` on the command line arrives as the string "null".
        self.system_prompt = nullable(self.system_prompt)
        self.baseline = nullable(self.baseline)
        self.data_dir = nullable(self.data_dir)


def dataset_folder(name: str) -> str:
    """The subfolder of one dataset in a multi-dataset run: `gsm8k`, `my_file` for a path, `owner_name`."""
    path = Path(name)
    if path.exists():
        return re.sub(r"[^\w.-]", "_", path.stem if path.is_file() else path.name)
    return re.sub(r"[^\w.-]", "_", name)


# --- records -----------------------------------------------------------------------------------------------


def score_record(tokenizer: Any, row: Any, response: str, *, sample: int, budgeted: bool, max_budget: int,
                 finish_reason: str | None = None, prefill_budget: int | None = None,
                 control_multiplier: float | None = None) -> dict[str, Any]:
    """One items.jsonl record (the schema of `metrics.py`)."""
    from .format import token_length
    from .grading import grade
    from .rewards import score_response

    record: dict[str, Any] = {
        "id": row.id,
        "difficulty": row.difficulty,
        "gold": row.answer,
        "response": response,
        "prefill_budget": prefill_budget,
        "control_multiplier": control_multiplier,
        "sample": sample,
        "finish_reason": finish_reason,
    }
    if budgeted:
        scored = score_response(tokenizer, response, row.answer, max_budget=max_budget)
        record.update(budget=scored.budget, length=scored.length, format_ok=scored.format_ok,
                      format_error=scored.format_error, correct=scored.correct, grading_error=scored.grading_error,
                      predicted=scored.predicted)
    else:
        result = grade(response, row.answer)
        # Not asked for the format: recorded as "missing_budget", which the report shows as "no budgets".
        record.update(budget=None, length=token_length(tokenizer, response.strip()), format_ok=False,
                      format_error="missing_budget", correct=bool(result.correct) and result.error is None,
                      grading_error=result.error, predicted=result.predicted)
    if row.source == EMBEDDED_SOURCE:
        record["filler_tokens"] = filler_tokens(tokenizer, response, budgeted=budgeted, format_ok=record["format_ok"],
                                                max_budget=max_budget)
    return record


def filler_tokens(tokenizer: Any, response: str, *, budgeted: bool, format_ok: bool,
                  max_budget: int | None = None) -> int | None:
    """Tokens of the solution's filler lines (`task.split_filler`: re-checks and phrases a correct solution
    does not need), for the embedded task; None when a budgeted response's solution cannot be isolated."""
    from .format import FormatError, parse_response
    from .task import filler_tokens as solution_filler_tokens

    if not budgeted:
        return solution_filler_tokens(tokenizer, response.strip())
    if not format_ok:
        return None
    try:
        return solution_filler_tokens(tokenizer, parse_response(response, max_budget=max_budget).solution)
    except FormatError:
        return None


def control_budget(multiplier: float, estimate: int, max_budget: int) -> int:
    return min(max(1, round(multiplier * estimate)), max_budget)


def _baseline_mean(baseline: str | None, name: str, single: bool) -> float | None:
    if baseline is None:
        return None
    root = Path(baseline)
    candidates = [root / dataset_folder(name)] + ([root] if single else [])
    for folder in candidates:
        path = folder / "metrics.json"
        if path.is_file():
            try:
                value = json.loads(path.read_text(encoding="utf-8")).get("mean_tokens")
            except json.JSONDecodeError as err:
                raise UserError(f"{path} is not valid JSON: {err}") from err
            if value is not None:
                return float(value)
    raise UserError(f"baseline {baseline} has no metrics.json for dataset {name!r} "
                    f"(looked in {', '.join(str(c) for c in candidates)})")


# --- the run -----------------------------------------------------------------------------------------------


def _generate(model: Any, tokenizer: Any, prompts: list[str], cfg: EvalConfig, n: int, desc: str):
    from .generation import generate

    return generate(model, tokenizer, prompts, n=n, temperature=cfg.temperature, top_p=cfg.top_p,
                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed, desc=desc,
                    backend=cfg.backend)


def evaluate_dataset(model: Any, tokenizer: Any, name: str, cfg: EvalConfig, out: Path,
                     baseline_mean: float | None) -> dict[str, Any]:
    """Evaluate one dataset into `out` (items.jsonl, metrics.json); returns the metrics."""
    from . import metrics
    from .data import load_benchmark, prompt_text, write_jsonl
    from .format import render_prefill

    start = time.perf_counter()
    rows = load_benchmark(name, cfg.split, data_dir=cfg.data_dir, limit=cfg.limit)
    prompts = [prompt_text(tokenizer, row.question, system_prompt=cfg.system_prompt) for row in rows]
    generated = _generate(model, tokenizer, prompts, cfg, cfg.samples, f"eval {name}")
    records = [
        score_record(tokenizer, row, s.text, sample=k, budgeted=cfg.budgeted, max_budget=cfg.max_budget,
                     finish_reason=s.finish_reason)
        for row, per in zip(rows, generated)
        for k, s in enumerate(per)
    ]
    tokens = sum(s.n_tokens for per in generated for s in per)

    if cfg.budgeted and cfg.control_multipliers and cfg.control_limit > 0:
        first = {r["id"]: r for r in records if r["sample"] == 0}
        chosen = [row for row in rows if first[row.id]["format_ok"]][: cfg.control_limit]
        jobs = [(row, m, control_budget(m, first[row.id]["budget"], cfg.max_budget))
                for row in chosen for m in cfg.control_multipliers]
        if jobs:
            control_prompts = [prompt_text(tokenizer, row.question, budget=b, system_prompt=cfg.system_prompt)
                               for row, _, b in jobs]
            continuations = _generate(model, tokenizer, control_prompts, cfg, 1, f"control {name}")
            for (row, m, b), (s,) in zip(jobs, continuations):
                records.append(score_record(tokenizer, row, render_prefill(b) + s.text, sample=0, budgeted=True,
                                            max_budget=cfg.max_budget, finish_reason=s.finish_reason,
                                            prefill_budget=b, control_multiplier=m))
                tokens += s.n_tokens
        else:
            logger.warning("%s: no response stated a valid budget, so there are no user-budget control runs", name)

    write_jsonl(out / "items.jsonl", records)
    wall = time.perf_counter() - start
    result = {
        **metrics.summarize(records, baseline_mean),
        "baseline_mean_tokens": baseline_mean,
        "questions": len(rows),
        "generated_tokens": tokens,
        "wall_seconds": wall,
        "model": cfg.model,
        "dataset": name,
        "config": asdict(cfg),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    logger.info("%s: accuracy %s, mean tokens %s -> %s", name, result["accuracy"], result["mean_tokens"], out)
    return result


def _average(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str) -> float | None:
        values = [r[key] for r in results.values() if r.get(key) is not None]
        return sum(values) / len(values) if len(values) == len(results) and values else None

    return {key: mean(key) for key in ("accuracy", "mean_tokens", "compression", "within_20", "format_failure_rate")}


def evaluate(model_or_path: Any, cfg: EvalConfig, tokenizer: Any = None) -> dict[str, Any]:
    """Evaluate a model (a name or path, or an already loaded model with its `tokenizer`) as `cfg` says.

    One dataset: returns its metrics (also in `out/metrics.json`). Several: returns the summary written to
    `out/summary.json`: `benchmarks` (name -> metrics) and the averages also at the top level, so that
    `result["accuracy"]` means the same in both cases.
    """
    from .generation import load
    from .profile import dataset_names

    names = dataset_names(cfg.dataset)
    folders = [dataset_folder(name) for name in names]
    if len(set(folders)) != len(folders):
        raise UserError(f"datasets {cfg.dataset!r} would share an output folder; give each a distinct name")
    if isinstance(model_or_path, (str, Path)):
        model, tokenizer = load(str(model_or_path), cfg.backend, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
    else:
        model = model_or_path
        if tokenizer is None:
            raise UserError("evaluate(): a loaded model needs its tokenizer")
    start = time.perf_counter()
    out = Path(cfg.out)
    single = len(names) == 1
    results = {}
    for name, folder in zip(names, folders):
        baseline_mean = _baseline_mean(cfg.baseline, name, single)
        target = out if single else out / folder
        target.mkdir(parents=True, exist_ok=True)
        results[name] = evaluate_dataset(model, tokenizer, name, cfg, target, baseline_mean)
    if single:
        return results[names[0]]
    average = _average(results)
    summary = {**average, "average": average, "benchmarks": results, "wall_seconds": time.perf_counter() - start,
               "model": cfg.model, "dataset": cfg.dataset, "config": asdict(cfg)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return summary


def print_results(result: dict[str, Any], out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from .report import table_rows

    runs = dict(result.get("benchmarks") or {result["dataset"]: result})
    if "average" in result:
        runs["average"] = result["average"]
    header, *body = table_rows(runs)
    table = Table(title=f"evaluation of {result['model']}")
    for title in ["dataset", *header[1:]]:
        table.add_column(title, justify="left" if title == "dataset" else "right")
    for row in body:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a pipe or a log: the whole table, not 80 columns of it
        console = Console(width=160)
    console.print(table)
    console.print(f"written to {out}/")


def main(argv: list[str] | None = None) -> int:
    from .config import parse_config

    (cfg,) = parse_config(
        (EvalConfig,),
        argv,
        prog="selfbudgeter eval",
        description="Evaluate a model: accuracy, token length, budget adherence and user-budget control, scored "
        "exactly as training rewards them. Results go to items.jsonl and metrics.json (see `selfbudgeter report`).",
    )
    result = evaluate(cfg.model, cfg)
    print_results(result, cfg.out)
    return 0
