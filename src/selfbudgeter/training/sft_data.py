"""Stage 1a, `selfbudgeter build-sft`: the base model's own correct answers, labelled with their budget.

From a profile folder (`samples.jsonl`, `questions.jsonl`), keep the correct responses, and rewrite each as

    <budget>N</budget><solution>{response.strip()}</solution>      N = token_length(response.strip())

so N counts the solution content tokens, the length `rewards.score_response` measures (METHOD.md, Stage 1).
Per question, identical responses are kept once and at most `max_per_question` are drawn, seeded by
(seed, question id) so that the choice does not depend on the order or number of questions.

Writes `out/train.jsonl` (prompt, completion, id, budget, difficulty) for TRL's SFTTrainer and
`out/stats.json` (rows, questions covered, budget distribution, what was dropped and why).

Beyond the paper: responses cut at the generation cap are dropped by default (trained on, they would
teach the model to stop mid-sentence), and so are responses that would not parse back as the budget
format (a base model that writes a literal `</solution>`).
"""

from __future__ import annotations

import json
import logging
import random
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import nullable
from ..core.errors import UserError
from ..data import SYSTEM_PROMPT

logger = logging.getLogger(__name__)


@dataclass
class SFTDataConfig:
    profile: str = field(default="runs/profile", metadata={"help": "profile folder (samples.jsonl, questions.jsonl)"})
    model: str | None = field(
        default=None,
        metadata={"help": "tokenizer that counts budgets and renders prompts: the model to be trained; "
                  "default the profile's model"},
    )
    out: str = field(default="runs/sft-data", metadata={"help": "output folder"})
    # Every distinct correct sample of the default 4-sample profile. Measured on the embedded default (same
    # 400-question profile, same SFT recipe): 2 per question (785 rows) left accuracy 18 points under the
    # base model's, 4 (1,332 rows) matched it.
    max_per_question: int = field(default=4, metadata={"help": "most rows kept per question"})
    max_rows: int | None = field(default=None, metadata={"help": "cap on the number of rows (seeded draw)"})
    drop_truncated: bool = field(default=True, metadata={"help": "drop responses cut at the generation cap"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice"})
    system_prompt: str | None = field(
        default=SYSTEM_PROMPT,
        metadata={"help": "system prompt of the training prompts (null for none); keep it equal to GRPO's and eval's"},
    )

    def __post_init__(self) -> None:
        if self.max_per_question < 1:
            raise UserError(f"max_per_question must be >= 1, not {self.max_per_question}")
        if self.max_rows is not None and self.max_rows < 1:
            raise UserError(f"max_rows must be >= 1, not {self.max_rows}")
        self.system_prompt = nullable(self.system_prompt)
        self.model = nullable(self.model)


def _question_rng(seed: int, qid: str) -> random.Random:
    return random.Random(f"{seed}\x00{qid}")


def build_sft_rows(
    samples: Iterable[dict[str, Any]],
    questions: Iterable[dict[str, Any]],
    tokenizer: Any,
    *,
    max_per_question: int = 4,
    seed: int = 0,
    system_prompt: str | None = SYSTEM_PROMPT,
    drop_truncated: bool = True,
    max_rows: int | None = None,
    dropped: Counter | None = None,
) -> list[dict[str, Any]]:
    """SFT rows from profile samples and questions (dicts with id and question). `dropped`, when given,
    counts what was left out: wrong, truncated, empty, duplicate, bad_format, over_cap, max_rows."""
    from ..core.format import render_response, token_length, try_parse
    from ..data import prompt_text

    dropped = Counter() if dropped is None else dropped
    by_id: dict[str, list[dict[str, Any]]] = {}
    for sample in samples:
        by_id.setdefault(sample["id"], []).append(sample)
    rows: list[dict[str, Any]] = []
    for question in questions:
        qid = question["id"]
        kept: dict[str, dict[str, Any]] = {}  # stripped response -> its first sample
        for sample in sorted(by_id.get(qid, []), key=lambda x: x.get("sample", 0)):
            text = (sample.get("response") or "").strip()
            if not sample.get("correct"):
                dropped["wrong"] += 1
            elif drop_truncated and sample.get("finish_reason") == "length":
                dropped["truncated"] += 1
            elif not text:
                dropped["empty"] += 1
            elif text in kept:
                dropped["duplicate"] += 1
            else:
                kept[text] = sample
        chosen = list(kept)
        if len(chosen) > max_per_question:
            dropped["over_cap"] += len(chosen) - max_per_question
            chosen = _question_rng(seed, qid).sample(chosen, max_per_question)
        if chosen:
            prompt = prompt_text(tokenizer, question["question"], system_prompt=system_prompt)
        for text in chosen:
            budget = token_length(tokenizer, text)
            completion = render_response(budget, text)
            parsed = try_parse(completion)
            if isinstance(parsed, Exception) or parsed.solution != text:
                dropped["bad_format"] += 1
                continue
            rows.append({"prompt": prompt, "completion": completion, "id": qid, "budget": budget,
                         "difficulty": question.get("difficulty")})
    if max_rows is not None and len(rows) > max_rows:
        dropped["max_rows"] += len(rows) - max_rows
        keep = set(random.Random(seed).sample(range(len(rows)), max_rows))
        rows = [row for i, row in enumerate(rows) if i in keep]
    return rows


def budget_stats(rows: Sequence[dict[str, Any]], questions: int, dropped: Counter) -> dict[str, Any]:
    budgets = sorted(row["budget"] for row in rows)
    distribution: dict[str, float | None] = dict.fromkeys(("min", "q1", "median", "q3", "max", "mean"))
    if budgets:
        q1, median, q3 = statistics.quantiles(budgets, n=4, method="inclusive") if len(budgets) > 1 else budgets * 3
        distribution = {"min": budgets[0], "q1": q1, "median": median, "q3": q3, "max": budgets[-1],
                        "mean": statistics.fmean(budgets)}
    return {
        "rows": len(rows),
        "questions_covered": len({row["id"] for row in rows}),
        "questions_profiled": questions,
        "budget": distribution,
        "dropped": dict(sorted(dropped.items())),
    }


def _profile_model(folder: Path) -> str:
    for name in ("config.json", "summary.json"):
        path = folder / name
        if path.is_file():
            model = json.loads(path.read_text(encoding="utf-8")).get("model")
            if model:
                return model
    raise UserError(f"{folder} does not say which model made it: pass --model")


def build(cfg: SFTDataConfig, tokenizer: Any = None) -> dict[str, Any]:
    """Build `train.jsonl` and `stats.json` in `cfg.out` from the profile in `cfg.profile`; returns the stats."""
    from ..core.models import load_tokenizer
    from ..data import read_jsonl, write_jsonl

    folder = Path(cfg.profile)
    for name in ("samples.jsonl", "questions.jsonl"):
        if not (folder / name).is_file():
            raise UserError(f"{folder / name} does not exist: is {folder} a profile folder (selfbudgeter profile)?")
    samples = read_jsonl(folder / "samples.jsonl")
    questions = read_jsonl(folder / "questions.jsonl")
    for number, record in enumerate(samples, 1):
        missing = [k for k in ("id", "response", "correct") if k not in record]
        if missing:
            raise UserError(f"{folder / 'samples.jsonl'}: row {number} lacks {', '.join(missing)}")
    for number, record in enumerate(questions, 1):
        if not isinstance(record.get("question"), str) or "id" not in record:
            raise UserError(f"{folder / 'questions.jsonl'}: row {number} lacks its id or question text")
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model or _profile_model(folder))
    dropped: Counter = Counter()
    rows = build_sft_rows(samples, questions, tokenizer, max_per_question=cfg.max_per_question, seed=cfg.seed,
                          system_prompt=cfg.system_prompt, drop_truncated=cfg.drop_truncated,
                          max_rows=cfg.max_rows, dropped=dropped)
    if not rows:
        raise UserError(f"{folder} has no usable correct response: nothing to train on")
    out = Path(cfg.out)
    write_jsonl(out / "train.jsonl", rows)
    stats = budget_stats(rows, len(questions), dropped)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    logger.info("%d SFT rows for %d questions written to %s", stats["rows"], stats["questions_covered"], out)
    return stats


def parse_args(argv: Sequence[str] | None = None) -> SFTDataConfig:
    """The stage's options from an optional recipe (`--config FILE`) and `--field value` overrides."""
    from ..core.config import parse_config

    (cfg,) = parse_config(
        (SFTDataConfig,),
        argv,
        prog="selfbudgeter build-sft",
        description="Stage 1a: turn a profile's correct responses into <budget>N</budget><solution>...</solution> "
        "SFT rows, N being the solution's token count.",
    )
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    stats = build(cfg)
    b = stats["budget"]
    print(f"{stats['rows']} rows covering {stats['questions_covered']} of {stats['questions_profiled']} questions "
          f"-> {Path(cfg.out) / 'train.jsonl'}")
    print(f"budget: min {b['min']}, quartiles {b['q1']:g} / {b['median']:g} / {b['q3']:g}, max {b['max']}, "
          f"mean {b['mean']:.1f}")
    if stats["dropped"]:
        print("dropped: " + ", ".join(f"{k} {v}" for k, v in stats["dropped"].items()))
    return 0
