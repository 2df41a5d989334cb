"""`selfbudgeter eval`: accuracy, length, budget adherence and user-budget control of a model.

Every response is scored by `rewards.score_response`, so evaluation measures exactly what training
rewards: the budget parsed from the response, the solution's token length, and correctness of a closed
solution (a broken format is never graded). With `budgeted: false` (base and baseline models, which are
not asked for the format) the length is that of the whole response and the whole response is graded.

User-budget control: for each of the first `control_limit` questions whose first response stated a valid
budget E (the model's own estimate), the assistant turn is prefilled with `<budget>B</budget><solution>`
for B = round(m * E) (at least 1) at every multiplier m, and `render_prefill(B) + continuation` is scored.
Control runs decode at `control_temperature` (greedy by default). Each control record carries
`min_solution_tokens`, the length of the row's reference solution, so that metrics can tell reachable
budgets from unreachable ones.

Budget-following at decode time (`decode_budget`), applied to the control runs and to every main response
whose budget is known, and recorded apart (`decoder` names it, `forced` says whether it changed anything;
the model-alone records are kept as they are, so metrics compare the two on the same responses):
1. `cap`: a solution may use at most int(B * (1 + budget_slack)) tokens. One that is longer, or that ran
   out of tokens unclosed, is cut there, `answer_prompt` is appended and up to `answer_cap` more tokens are
   decoded greedily, up to the brace that closes the prompt's open brace; the decoder then closes the
   solution. The model-alone response is the decoder's first pass: cutting it at the cap is what decoding
   with the cap would have produced (`generation`'s samples are a function of prompt, seed and step), up to
   floating point and the re-tokenised text the cut is made in.
2. `extend`: a solution that closes below B * (1 - budget_slack) loses its closing (its last line, the final
   answer, and `</solution>`), gets `extend_prompt` (s1's "Wait") and is continued, at most
   `max_extensions` times. `cap_extend` does both: extend, then cap what the extension wrote.
Every continuation is a call of `generation.generate` on prompt + text so far; lengths and cuts are in the
one length, `format.token_length`.

Writes to `out/` (for several datasets, to `out/<dataset>/` each, plus an averaged `out/summary.json` as
the paper reports it: the mean over benchmarks of accuracy, length and compression):
    items.jsonl   one record per response, in the schema `metrics.py` documents (control records carry
                  prefill_budget, control_multiplier and min_solution_tokens; every record its decoder
                  and whether it was forced)
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

from ..core.config import nullable
from ..core.errors import UserError
from ..core.format import DEFAULT_MAX_BUDGET, SOLUTION_CLOSE, SOLUTION_OPEN
from ..core.grading import EXTRACTION_HELP, EXTRACTIONS
from ..data import SYSTEM_PROMPT
from ..serving.generator import DEFAULT_ANSWER_SUFFIX

logger = logging.getLogger(__name__)

DECODE_BUDGET = ("none", "cap", "extend", "cap_extend")
# s1's budget forcing (Muennighoff et al. 2025) appends "Wait" to make a model think longer.
DEFAULT_EXTEND_PROMPT = "\nWait, let me check."
MODEL = "model"  # the `decoder` of a response the model wrote alone (metrics.MODEL)


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
        default_factory=lambda: [0.5, 0.75, 1.0, 1.5, 2.0],
        metadata={"help": "user-budget control: prefill these multiples of the model's own estimate "
                  "([] in YAML disables)"},
    )
    control_limit: int = field(default=100, metadata={"help": "questions used for the control runs"})
    control_temperature: float = field(
        default=0.0, metadata={"help": "sampling temperature of the control runs; 0 is greedy"}
    )
    decode_budget: Literal["none", "cap", "extend", "cap_extend"] = field(
        default="none",
        metadata={"help": "budget-following at decode time, on the control runs and on main responses with a "
                  "budget, recorded apart: cap (answer at budget * (1 + slack)), extend (continue a solution that "
                  "ends below budget * (1 - slack)), cap_extend (both), none"},
    )
    budget_slack: float = field(default=0.2, metadata={"help": "slack of decode_budget's cap and extension"})
    answer_prompt: str = field(
        default=DEFAULT_ANSWER_SUFFIX, metadata={"help": "text the cap appends to force the final answer"}
    )
    answer_cap: int = field(default=32, metadata={"help": "tokens the cap decodes after answer_prompt at most"})
    extend_prompt: str = field(
        default=DEFAULT_EXTEND_PROMPT, metadata={"help": "text an extension appends in place of the final answer"}
    )
    max_extensions: int = field(default=1, metadata={"help": "extensions per response at most"})
    max_budget: int = field(default=DEFAULT_MAX_BUDGET, metadata={"help": "budgets above this are format failures"})
    answer_extraction: Literal["boxed", "lenient"] = field(
        default="boxed",
        metadata={"help": EXTRACTION_HELP},
    )
    baseline: str | None = field(
        default=None,
        metadata={"help": "a baseline eval folder (same datasets): compression = 1 - mean tokens / its mean tokens"},
    )
    out: str = field(default="runs/eval", metadata={"help": "output folder"})
    backend: Literal["transformers", "vllm"] = field(default="transformers", metadata={"help": "generation backend"})
    device: str = field(default="auto", metadata={"help": "transformers device: auto, cpu, cuda, ..."})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})

    def __post_init__(self) -> None:
        for name in ("samples", "max_new_tokens", "batch_size", "max_budget", "answer_cap"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit must be >= 1, not {self.limit}")
        if self.control_limit < 0:
            raise UserError(f"control_limit must be >= 0, not {self.control_limit}")
        if self.max_extensions < 0:
            raise UserError(f"max_extensions must be >= 0, not {self.max_extensions}")
        if not self.control_temperature >= 0:
            raise UserError(f"control_temperature must be >= 0, not {self.control_temperature}")
        if self.answer_extraction not in EXTRACTIONS:
            raise UserError(f"answer_extraction must be one of {', '.join(EXTRACTIONS)}, not {self.answer_extraction!r}")
        if self.decode_budget not in DECODE_BUDGET:
            raise UserError(f"decode_budget must be one of {', '.join(DECODE_BUDGET)}, not {self.decode_budget!r}")
        if not 0 <= self.budget_slack < 1:
            raise UserError(f"budget_slack must be in [0, 1), not {self.budget_slack}")
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
                 control_multiplier: float | None = None, decoder: str = MODEL,
                 forced: bool = False, answer_extraction: str = "boxed") -> dict[str, Any]:
    """One items.jsonl record (the schema of `metrics.py`); the answer is read by `answer_extraction`."""
    from ..core.format import token_length
    from ..core.grading import grade
    from ..training.rewards import score_response

    record: dict[str, Any] = {
        "id": row.id,
        "difficulty": row.difficulty,
        "gold": row.answer,
        "response": response,
        "prefill_budget": prefill_budget,
        "control_multiplier": control_multiplier,
        "sample": sample,
        "finish_reason": finish_reason,
        "decoder": decoder,
        "forced": forced,
    }
    if control_multiplier is not None:
        record["min_solution_tokens"] = min_solution_tokens(tokenizer, row)
    if budgeted:
        scored = score_response(tokenizer, response, row.answer, max_budget=max_budget, extraction=answer_extraction)
        record.update(budget=scored.budget, length=scored.length, format_ok=scored.format_ok,
                      format_error=scored.format_error, correct=scored.correct, grading_error=scored.grading_error,
                      predicted=scored.predicted)
    else:
        result = grade(response, row.answer, extraction=answer_extraction)
        # Not asked for the format: recorded as "missing_budget", which the report shows as "no budgets".
        record.update(budget=None, length=token_length(tokenizer, response.strip()), format_ok=False,
                      format_error="missing_budget", correct=bool(result.correct) and result.error is None,
                      grading_error=result.error, predicted=result.predicted)
    record.update(task_measures(tokenizer, row, response, budgeted=budgeted, max_budget=max_budget))
    return record


def task_measures(tokenizer: Any, row: Any, response: str, *, budgeted: bool,
                  max_budget: int | None = None) -> dict[str, int | None]:
    """`<part>_tokens` of the solution for each part the row's task measures (`data.Task.measures`: the
    embedded task's filler); {} for other datasets. The solution is the whole response when it was not asked
    for the format; a budgeted response whose solution cannot be isolated measures None."""
    from ..core.format import FormatError, try_parse
    from ..data import solution_measures

    measures = solution_measures(row.source)
    if not measures:
        return {}
    if budgeted:
        parsed = try_parse(response, max_budget)
        solution = None if isinstance(parsed, FormatError) else parsed.solution
    else:
        solution = response.strip()
    return {f"{part}_tokens": None if solution is None else measure(tokenizer, solution)
            for part, measure in measures.items()}


def min_solution_tokens(tokenizer: Any, row: Any) -> int | None:
    """Tokens of the row's reference solution, the least a correct answer needs; None without one."""
    from ..core.format import token_length

    return token_length(tokenizer, row.solution.strip()) if row.solution else None


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


# --- budget-following at decode time ------------------------------------------------------------------------


@dataclass
class Draft:
    """A response under a decode-time budget option: what the sampler continues and what the decoder did.

    `prompt` is what `generate` saw (a prefilled budget included), `prefill` the part of it that belongs to
    the response, `head` the generated text before the solution (the budget tag the model wrote; empty when
    prefilled), `solution` the solution text so far, `after` text the model wrote after `</solution>`.
    """

    prompt: str
    prefill: str
    head: str
    solution: str
    closed: bool
    budget: int
    finish_reason: str | None
    after: str = ""
    forced: bool = False

    @property
    def context(self) -> str:
        """prompt + response so far: what a continuation is generated from."""
        return self.prompt + self.head + self.solution

    @property
    def response(self) -> str:
        closing = SOLUTION_CLOSE if self.closed else ""
        return self.prefill + self.head + self.solution + closing + self.after

    def add(self, text: str) -> None:
        """Append generated solution text, up to and past a closing tag it may write."""
        end = text.find(SOLUTION_CLOSE)
        if end < 0:
            self.solution += text
            return
        self.solution += text[:end]
        self.after = text[end + len(SOLUTION_CLOSE) :]
        self.closed = True


def draft(prompt: str, prefill: str, text: str, finish_reason: str | None, max_budget: int) -> Draft | None:
    """The Draft of a generated `text` (continuing `prompt`, which ends with `prefill`), or None when it
    gives a decoder nothing to work on: no valid budget, no solution, or a format error inside it."""
    from ..core.format import FormatErrorEvent, StreamParser, TextEvent

    full = prefill + text
    parser = StreamParser(max_budget)
    events = parser.feed(full)
    if not parser.done:
        events += parser.close()
    error = next((e.reason for e in events if isinstance(e, FormatErrorEvent)), None)
    if parser.budget is None or error not in (None, "unclosed_solution"):
        return None
    solution = "".join(e.text for e in events if isinstance(e, TextEvent))
    start = full.find(SOLUTION_OPEN) + len(SOLUTION_OPEN)
    closed = error is None
    after = full[full.rfind(SOLUTION_CLOSE) + len(SOLUTION_CLOSE) :] if closed else ""
    return Draft(prompt, prefill, full[len(prefill) : start], solution, closed, parser.budget, finish_reason, after)


def cap_tokens(budget: int, slack: float) -> int:
    """The most solution tokens the cap allows before it forces the answer (the generator's enforce limit)."""
    return max(1, int(budget * (1 + slack)))


def without_answer_line(solution: str) -> str:
    """The solution without its last line (the final answer), for an extension to continue from."""
    body = solution.rstrip()
    cut = body.rfind("\n")
    return body[:cut] if cut >= 0 else ""


def truncate_tokens(tokenizer: Any, text: str, tokens: int) -> str:
    """The first `tokens` tokens of `text` (format.token_length's unit), as text."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= tokens else tokenizer.decode(ids[:tokens])


def forced_answer(text: str, answer_prompt: str) -> str:
    """The generated end of a forced answer: up to the brace that closes `answer_prompt`'s open brace, and
    never past a closing solution tag."""
    end = text.find(SOLUTION_CLOSE)
    if end >= 0:
        text = text[:end]
    depth = answer_prompt.count("{") - answer_prompt.count("}")
    if depth <= 0:
        return text
    for i, char in enumerate(text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return text[: i + 1]
    return text


def decode_budget(model: Any, tokenizer: Any, drafts: list[Draft], cfg: EvalConfig, *, temperature: float,
                  desc: str) -> int:
    """Apply `cfg.decode_budget` to `drafts` in place (see the module docstring); returns generated tokens."""
    from ..core.format import token_length

    mode, slack = cfg.decode_budget, cfg.budget_slack
    cap, extend = mode in ("cap", "cap_extend"), mode in ("extend", "cap_extend")
    tokens = 0

    def length(d: Draft) -> int:
        return token_length(tokenizer, d.solution)

    for _ in range(cfg.max_extensions if extend else 0):
        short = [d for d in drafts if d.closed and length(d) < d.budget * (1 - slack)]
        if not short:
            break
        for d in short:
            d.solution = without_answer_line(d.solution) + cfg.extend_prompt
            d.closed, d.after, d.forced = False, "", True
        room = cfg.max_new_tokens
        if cap:  # one call for all: each draft is cut at its own cap below
            room = min(room, max(cap_tokens(d.budget, slack) - length(d) for d in short))
        if room < 1:  # the extension text alone reached the cap: the cap answers at once
            for d in short:
                d.finish_reason = "length"
            break
        for d, (sample,) in zip(short, _generate(model, tokenizer, [d.context for d in short], cfg, 1,
                                                 f"{desc} extend", temperature=temperature, max_new_tokens=room)):
            d.add(sample.text)
            d.finish_reason = sample.finish_reason
            tokens += sample.n_tokens

    if cap:
        over = [d for d in drafts
                if length(d) > cap_tokens(d.budget, slack) or (not d.closed and d.finish_reason == "length")]
        for d in over:
            d.solution = truncate_tokens(tokenizer, d.solution, cap_tokens(d.budget, slack)) + cfg.answer_prompt
            d.closed, d.after, d.forced = False, "", True
        answers = _generate(model, tokenizer, [d.context for d in over], cfg, 1, f"{desc} answer", temperature=0.0,
                            max_new_tokens=cfg.answer_cap)
        for d, (sample,) in zip(over, answers):
            d.solution += forced_answer(sample.text, cfg.answer_prompt)
            d.closed = True  # the decoder closes what it forced
            d.finish_reason = sample.finish_reason
            tokens += sample.n_tokens
    return tokens


# --- the run -----------------------------------------------------------------------------------------------


def _generate(model: Any, tokenizer: Any, prompts: list[str], cfg: EvalConfig, n: int, desc: str, *,
              temperature: float | None = None, max_new_tokens: int | None = None):
    from .generation import generate

    if not prompts:
        return []
    return generate(model, tokenizer, prompts, n=n, temperature=cfg.temperature if temperature is None else temperature,
                    top_p=cfg.top_p, max_new_tokens=max_new_tokens or cfg.max_new_tokens,
                    batch_size=cfg.batch_size, seed=cfg.seed, desc=desc, backend=cfg.backend)


def _decoded_records(model: Any, tokenizer: Any, jobs: list[tuple[Any, str, str, Any, dict[str, Any]]],
                     cfg: EvalConfig, temperature: float, desc: str) -> tuple[list[dict[str, Any]], int]:
    """Records of `cfg.decode_budget` applied to model-alone samples. Each job is (row, prompt, prefill,
    sample, score_record keywords); a sample the decoder cannot work on is recorded unchanged."""
    drafts = [draft(prompt, prefill, sample.text, sample.finish_reason, cfg.max_budget)
              for _, prompt, prefill, sample, _ in jobs]
    tokens = decode_budget(model, tokenizer, [d for d in drafts if d is not None], cfg, temperature=temperature,
                           desc=desc)
    records = []
    for (row, _, prefill, sample, keywords), d in zip(jobs, drafts):
        forced = d is not None and d.forced
        response = d.response if forced else prefill + sample.text
        finish = d.finish_reason if forced else sample.finish_reason
        records.append(score_record(tokenizer, row, response, budgeted=True, max_budget=cfg.max_budget,
                                    finish_reason=finish, decoder=cfg.decode_budget, forced=forced,
                                    answer_extraction=cfg.answer_extraction, **keywords))
    return records, tokens


def evaluate_dataset(model: Any, tokenizer: Any, name: str, cfg: EvalConfig, out: Path,
                     baseline_mean: float | None) -> dict[str, Any]:
    """Evaluate one dataset into `out` (items.jsonl, metrics.json); returns the metrics."""
    from ..core import metrics
    from ..core.format import render_prefill
    from ..data import load_benchmark, prompt_text, write_jsonl

    start = time.perf_counter()
    rows = load_benchmark(name, cfg.split, data_dir=cfg.data_dir, limit=cfg.limit)
    prompts = [prompt_text(tokenizer, row.question, system_prompt=cfg.system_prompt) for row in rows]
    generated = _generate(model, tokenizer, prompts, cfg, cfg.samples, f"eval {name}")
    records = [
        score_record(tokenizer, row, s.text, sample=k, budgeted=cfg.budgeted, max_budget=cfg.max_budget,
                     finish_reason=s.finish_reason, answer_extraction=cfg.answer_extraction)
        for row, per in zip(rows, generated)
        for k, s in enumerate(per)
    ]
    tokens = sum(s.n_tokens for per in generated for s in per)
    decoding = cfg.decode_budget != "none"
    if decoding and not cfg.budgeted:
        logger.warning("decode_budget %s needs budgets: not applied with budgeted: false", cfg.decode_budget)
        decoding = False
    if decoding:
        jobs = [(row, prompt, "", s, {"sample": k})
                for row, prompt, per in zip(rows, prompts, generated) for k, s in enumerate(per)]
        decoded, used = _decoded_records(model, tokenizer, jobs, cfg, cfg.temperature,
                                         f"{cfg.decode_budget} {name}")
        records += decoded
        tokens += used

    if cfg.budgeted and cfg.control_multipliers and cfg.control_limit > 0:
        first = {r["id"]: r for r in records if r["sample"] == 0 and r["decoder"] == MODEL}
        chosen = [row for row in rows if first[row.id]["format_ok"]][: cfg.control_limit]
        jobs = [(row, m, control_budget(m, first[row.id]["budget"], cfg.max_budget))
                for row in chosen for m in cfg.control_multipliers]
        if jobs:
            control_prompts = [prompt_text(tokenizer, row.question, budget=b, system_prompt=cfg.system_prompt)
                               for row, _, b in jobs]
            continuations = _generate(model, tokenizer, control_prompts, cfg, 1, f"control {name}",
                                      temperature=cfg.control_temperature)
            for (row, m, b), (s,) in zip(jobs, continuations):
                records.append(score_record(tokenizer, row, render_prefill(b) + s.text, sample=0, budgeted=True,
                                            max_budget=cfg.max_budget, finish_reason=s.finish_reason,
                                            prefill_budget=b, control_multiplier=m,
                                            answer_extraction=cfg.answer_extraction))
                tokens += s.n_tokens
            if decoding:
                decoder_jobs = [
                    (row, prompt, render_prefill(b), s,
                     {"sample": 0, "prefill_budget": b, "control_multiplier": m})
                    for (row, m, b), prompt, (s,) in zip(jobs, control_prompts, continuations)
                ]
                decoded, used = _decoded_records(model, tokenizer, decoder_jobs, cfg, cfg.control_temperature,
                                                 f"control {cfg.decode_budget} {name}")
                records += decoded
                tokens += used
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
    from ..training.profile import dataset_names
    from .generation import load

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
    from .report import print_table, table_rows

    runs = dict(result.get("benchmarks") or {result["dataset"]: result})
    if "average" in result:
        runs["average"] = result["average"]
    header, *body = table_rows(runs)
    print_table([["dataset", *header[1:]], *body], f"evaluation of {result['model']}", f"written to {out}/")


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    """The stage's options from a recipe (`--config embedded/eval`) and `--field value` overrides."""
    from ..core.config import parse_config

    (cfg,) = parse_config(
        (EvalConfig,),
        argv,
        prog="selfbudgeter eval",
        description="Evaluate a model: accuracy, token length, budget adherence and user-budget control, scored "
        "exactly as training rewards them. Results go to items.jsonl and metrics.json (see `selfbudgeter report`).",
    )
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    result = evaluate(cfg.model, cfg)
    print_results(result, cfg.out)
    return 0
