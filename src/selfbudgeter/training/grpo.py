"""Stage 2: budget-guided GRPO with TRL's `GRPOTrainer` (METHOD.md, Stage 2 and the reward SPEC).

The cold-start model answers training questions in budget format; the rewards named in the recipe score
each completion (`rewards.REWARDS`: `selfbudgeter` for the method, `accuracy` and `accuracy` +
`kimi_length` for the baselines). Dataset rows carry the columns the rewards read: `answer`, `b_max` (from
a Stage 0 profile, by question id) and `prefill_budget`. alpha is not stored anywhere: the reward reads it
from `trainer_state.global_step / max_steps`, so it follows the global step across resumes.

Options are `GRPOStageArgs`, the reward constants (`rewards.RewardConfig`, same field names) and every field
of `trl.GRPOConfig`, read from a recipe (`--config embedded/grpo`) with command-line overrides. An
interrupted run resumes from the last complete `checkpoint-*` in `output_dir`; the final model and its
tokenizer are saved at the top of `output_dir`.

Choices the paper leaves open (METHOD.md marks them SPEC or is silent):
1. Prefill budgets: exactly round(prefill_fraction x n) of the n prompts that have a b_max get one, drawn
   log-uniformly in [prefill_min, prefill_max] x b_max (so a budget is as likely to be halved as doubled),
   rounded to an integer inside that range. Prompts without b_max never get one: there is no length to
   draw around. The draw is fixed for the run (seeded by `seed`), so a resumed run sees the same prompts.
   With `prefill_spread` (beyond the paper, off by default) each completion of a prefilled prompt's group gets
   its own budget instead, drawn at every step (`GroupBudgetSpread`).
2. Prompts are plain strings (`data.prompt_text`), so a prefilled budget is simply the end of the prompt
   and the completion continues the solution; the reward re-attaches it before parsing.
3. Without CUDA the run is forced onto the CPU in float32, as in `sft`; vLLM then is an error.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..core.config import nullable
from ..core.errors import UserError
from ..core.format import DEFAULT_MAX_BUDGET, render_prefill
from ..data import SYSTEM_PROMPT
from .rewards import RewardConfig, is_missing, read_prefill

logger = logging.getLogger(__name__)

PROG = "selfbudgeter grpo"
DESCRIPTION = (
    "Stage 2: budget-guided GRPO on a cold-started model. Takes --config RECIPE (a YAML path or a packaged "
    "name such as embedded/grpo), the reward constants and any GRPOConfig field as --field value."
)


@dataclass
class GRPOStageArgs:
    """What the stage trains on and with which rewards; training itself is `trl.GRPOConfig`."""

    model: str | None = field(
        default=None, metadata={"help": "the cold-start model folder (output_dir of `selfbudgeter sft`)"}
    )
    dataset: str = field(default="embedded", metadata={"help": "a benchmark name or path (data.load_benchmark)"})
    split: str = "train"
    limit: int | None = field(default=None, metadata={"help": "the first N questions only (after profile_only)"})
    data_dir: str | None = field(
        default=None, metadata={"help": "folder of named benchmarks (else $SELFBUDGETER_DATA, else the Hub)"}
    )
    profile: str | None = field(
        default=None, metadata={"help": "a Stage 0 profile folder or its questions.jsonl: b_max by question id"}
    )
    profile_only: bool = field(default=False, metadata={"help": "train only on questions the profile has"})
    solved_only: bool = field(
        default=False,
        metadata={"help": "train only on questions the base model solved at least once (b_max known); the SPEC "
                  "pays wrong answers for running long, so a weak base model's unsolved questions teach length"},
    )
    rewards: list[str] = field(
        default_factory=lambda: ["selfbudgeter"],
        metadata={"help": "reward names in order: selfbudgeter, accuracy, kimi_length"},
    )
    system_prompt: str | None = field(
        default=SYSTEM_PROMPT, metadata={"help": "null or empty for none (the embedded model has none)"}
    )
    # METHOD.md, SPEC: a share of the prompts with a b_max carry a user budget in [0.5, 2] x b_max.
    prefill_fraction: float = field(
        default=0.25, metadata={"help": "share of the prompts with a b_max that carry a user budget"}
    )
    prefill_min: float = field(default=0.5, metadata={"help": "user budgets are at least this x b_max"})
    prefill_max: float = field(default=2.0, metadata={"help": "user budgets are at most this x b_max"})
    prefill_spread: bool = field(
        default=False,
        metadata={"help": "give each completion of a prefilled prompt's group its own user budget, stratified "
                  "log-uniformly over [prefill_min, prefill_max] x b_max, so that a group compares answers to "
                  "one question under different budgets (GroupBudgetSpread)"},
    )
    # Beyond the paper (relabel.py): 0 trains with the SPEC reward alone.
    budget_relabel_weight: float = field(
        default=0.0,
        metadata={"help": "weight of hindsight budget relabelling: correct rollouts with their own budget also "
                  "train the budget tag to state their solution length (0 = off, the paper's GRPO)"},
    )
    budget_relabel_target: str = field(
        default="own",
        metadata={"help": "what a relabelled budget states: `own` (the rollout's length), `group_median` (the "
                  "median length of its prompt's relabelled rollouts) or `peak` (its length / (1 - alpha_end), "
                  "the budget the final reward pays most for)"},
    )
    budget_relabel_scope: str = field(
        default="tag",
        metadata={"help": "what relabelling trains: `tag` (the budget tag alone) or `response` (the relabelled "
                  "tag, the solution that followed it and the end of the turn)"},
    )
    budget_relabel_prefilled: bool = field(
        default=False,
        metadata={"help": "also relabel correct rollouts under a user budget: each becomes its whole response "
                  "under a budget of its own length, an example of following a budget (relabel.py)"},
    )
    budget_relabel_wrong: bool = field(
        default=False,
        metadata={"help": "also relabel the budget tags (never the solutions) of well-formed wrong rollouts: a "
                  "budget predicts a length, right or wrong (relabel.py)"},
    )

    frozen_parameters: list[str] | None = field(
        default=None,
        metadata={"help": "regular expressions (re.search): parameters whose name matches one are not trained, "
                  "e.g. `self_attn` or `q_proj k_proj` (null or [] = train all)"},
    )

    def __post_init__(self) -> None:
        # `--system_prompt none` (or null, ~, empty) means no prompt, as in every stage (`config.nullable`).
        self.system_prompt = nullable(self.system_prompt)
        self.model, self.data_dir, self.profile = map(nullable, (self.model, self.data_dir, self.profile))
        if not 0.0 <= self.prefill_fraction <= 1.0:
            raise UserError(f"prefill_fraction must be in [0, 1], not {self.prefill_fraction}")
        if not 0.0 < self.prefill_min <= self.prefill_max:
            raise UserError(
                f"need 0 < prefill_min <= prefill_max, got prefill_min={self.prefill_min}, "
                f"prefill_max={self.prefill_max}"
            )
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit must be >= 1, not {self.limit}")
        if not self.rewards:
            raise UserError("rewards is empty: name at least one reward")
        for pattern in self.frozen_parameters or ():
            try:
                re.compile(pattern)
            except re.error as error:
                raise UserError(f"frozen_parameters: {pattern!r} is not a regular expression ({error})") from None
        from .relabel import SCOPES, TARGETS

        if self.budget_relabel_target not in TARGETS:
            raise UserError(
                f"budget_relabel_target must be one of {', '.join(TARGETS)}, not {self.budget_relabel_target!r}"
            )
        if self.budget_relabel_scope not in SCOPES:
            raise UserError(
                f"budget_relabel_scope must be one of {', '.join(SCOPES)}, not {self.budget_relabel_scope!r}"
            )
        if not (self.budget_relabel_weight >= 0 and math.isfinite(self.budget_relabel_weight)):
            raise UserError(f"budget_relabel_weight must be a number >= 0, not {self.budget_relabel_weight}")


def parse_args(argv: Sequence[str] | None = None) -> tuple[GRPOStageArgs, RewardConfig, Any]:
    """(GRPOStageArgs, RewardConfig, trl.GRPOConfig) from a recipe and overrides."""
    from trl import GRPOConfig

    from .sft import parse_stage_config

    stage, reward_cfg, config = parse_stage_config((GRPOStageArgs, RewardConfig, GRPOConfig), argv, PROG, DESCRIPTION)
    if stage.budget_relabel_weight > 0 and stage.budget_relabel_target == "peak":
        from .relabel import peak_keep

        try:
            peak_keep(reward_cfg.alpha_end)
        except ValueError as error:
            raise UserError(f"budget_relabel_target: {error}") from None
    return stage, reward_cfg, config


def profile_file(profile: str | os.PathLike) -> Path:
    """A profile's questions.jsonl, given it or the profile folder."""
    from ..data import file_or_folder

    return file_or_folder(profile, "questions.jsonl",
                          "a profile folder holds questions.jsonl; see `selfbudgeter profile`")


def load_b_max(profile: str | os.PathLike) -> dict[str, float | None]:
    """b_max by question id from a profile; null (no correct sample) stays None, i.e. unconstrained."""
    from ..data import read_jsonl

    path = profile_file(profile)
    table: dict[str, float | None] = {}
    for number, record in enumerate(read_jsonl(path), start=1):
        if "id" not in record:
            raise UserError(f"{path}: record {number}: missing field 'id'")
        value = record.get("b_max")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise UserError(f"{path}: record {number}: b_max must be a positive number or null, got {value!r}")
            value = float(value)
        table[str(record["id"])] = value
    return table


def sample_prefills(
    b_maxes: Sequence[float | None],
    fraction: float,
    low: float = 0.5,
    high: float = 2.0,
    seed: int = 0,
    max_budget: int = DEFAULT_MAX_BUDGET,
) -> list[int | None]:
    """A user budget for round(fraction x n) of the n entries with a b_max, log-uniform in [low, high] x b_max.

    Budgets are integers inside [ceil(low b_max), floor(high b_max)] and at most max_budget; an entry whose
    range holds no such integer gets none.
    """
    eligible = [i for i, b in enumerate(b_maxes) if b is not None]
    rng = random.Random(seed)
    chosen = sorted(rng.sample(eligible, round(fraction * len(eligible))))
    budgets: list[int | None] = [None] * len(b_maxes)
    for i in chosen:
        b_max = float(b_maxes[i])
        lowest = max(1, math.ceil(low * b_max))
        highest = min(max_budget, math.floor(high * b_max))
        if lowest > highest:
            continue
        drawn = b_max * math.exp(rng.uniform(math.log(low), math.log(high)))
        budgets[i] = min(max(round(drawn), lowest), highest)
    return budgets


def spread_budgets(b_max: float, n: int, low: float, high: float, rng: random.Random,
                   max_budget: int = DEFAULT_MAX_BUDGET) -> list[int]:
    """n user budgets for one question, one in each of n equal slices of [log(low b_max), log(high b_max)] (at
    a random offset shared by the slices), as integers inside [ceil(low b_max), floor(high b_max)]."""
    lowest = max(1, math.ceil(low * b_max))
    highest = max(lowest, min(max_budget, math.floor(high * b_max)))
    offset, span = rng.random(), math.log(high / low)
    return [min(max(round(low * b_max * math.exp(span * (k + offset) / n)), lowest), highest) for k in range(n)]


def spread_prefills(inputs: Sequence[dict[str, Any]], group: int, low: float, high: float, rng: random.Random,
                    max_budget: int = DEFAULT_MAX_BUDGET) -> list[dict[str, Any]]:
    """The rows of a generation batch (groups of `group` copies of one prompt, one after another) with each
    prefilled group's budgets spread by `spread_budgets`: every copy gets its own budget, in its prompt (whose
    end is the user's budget tag) and its `prefill_budget` column. Other rows are returned as they are."""
    if len(inputs) % group:
        raise ValueError(f"a generation batch of {len(inputs)} rows is not made of groups of {group}")
    out = []
    for start in range(0, len(inputs), group):
        rows = inputs[start:start + group]
        if len({row["id"] for row in rows}) != 1:
            raise ValueError(f"rows {start}-{start + group - 1} of a generation batch are not one prompt's group")
        prefill = read_prefill(rows[0].get("prefill_budget"))
        if prefill is None or is_missing(rows[0].get("b_max")):
            out.extend(rows)
            continue
        tag = render_prefill(prefill)
        if not rows[0]["prompt"].endswith(tag):
            raise ValueError(f"prompt of {rows[0]['id']!r} does not end with its user budget {tag!r}")
        stem = rows[0]["prompt"][: -len(tag)]
        budgets = spread_budgets(float(rows[0]["b_max"]), group, low, high, rng, max_budget)
        out.extend({**row, "prompt": stem + render_prefill(b), "prefill_budget": b} for row, b in zip(rows, budgets))
    return out


class GroupBudgetSpread:
    """A `GRPOTrainer` mixin (beyond the paper): a prefilled prompt's completions are sampled under different
    user budgets for one question. GRPO's advantages compare the completions of a group; when they share one
    budget, a policy that writes one answer per question gets nothing from the follow reward to read the
    budget by. With the budgets spread, the same answer is paid more under the budgets it meets than under
    those it misses: a contrast that the budget digits alone explain. Measured on the embedded task
    (docs/experiments.md), it did not teach following to a model whose cold start ignores budgets, nor add
    to one whose cold start follows them: off by default."""

    def __init__(self, *args: Any, spread_range: tuple[float, float], spread_seed: int = 0,
                 max_budget: int = DEFAULT_MAX_BUDGET, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.spread_range = spread_range
        self.spread_seed = spread_seed
        self.spread_max_budget = max_budget

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        # Seeded by the step, so that a resumed run draws the same budgets.
        rng = random.Random(f"{self.spread_seed}:{self.state.global_step}:{self.model.training}")
        low, high = self.spread_range
        inputs = spread_prefills(inputs, self.num_generations if self.model.training else self.num_generations_eval,
                                 low, high, rng, self.spread_max_budget)
        return super()._generate_and_score_completions(inputs)


def build_rows(
    questions: Iterable[Any],
    tokenizer: Any,
    stage: GRPOStageArgs,
    b_max: dict[str, float | None] | None = None,
    seed: int = 0,
    max_budget: int = DEFAULT_MAX_BUDGET,
) -> list[dict[str, Any]]:
    """GRPO rows (`prompt`, `answer`, `b_max`, `prefill_budget`, `difficulty`, `id`) for `data.Row`s."""
    from ..data import prompt_text
    from .sft import strip_template_bos

    questions = list(questions)
    if stage.profile_only and b_max is not None:  # without a profile there is nothing to select by
        questions = [q for q in questions if q.id in b_max]
    if stage.solved_only and b_max is not None:
        questions = [q for q in questions if b_max.get(q.id) is not None]
    b_max = b_max or {}
    if stage.limit is not None:
        questions = questions[: stage.limit]
    if not questions:
        reason = " (none of them is in the profile)" if stage.profile_only else ""
        raise UserError(f"no questions to train on{reason}")
    b_maxes = [b_max.get(q.id) for q in questions]
    prefills = sample_prefills(b_maxes, stage.prefill_fraction, stage.prefill_min, stage.prefill_max, seed, max_budget)
    rows = []
    for question, bound, prefill in zip(questions, b_maxes, prefills):
        prompt = prompt_text(tokenizer, question.question, budget=prefill, system_prompt=stage.system_prompt)
        rows.append(
            {
                "prompt": strip_template_bos(tokenizer, prompt),
                "answer": question.answer,
                "b_max": bound,
                "prefill_budget": prefill,
                "difficulty": question.difficulty,
                "id": question.id,
            }
        )
    return rows


def load_rows(stage: GRPOStageArgs, tokenizer: Any, seed: int = 0, max_budget: int = DEFAULT_MAX_BUDGET) -> list[dict]:
    """The training questions of `stage.dataset`, joined with the profile's b_max, as GRPO rows."""
    from ..data import load_benchmark

    questions = load_benchmark(stage.dataset, stage.split, data_dir=stage.data_dir)
    b_max = None
    if stage.profile:
        b_max = load_b_max(stage.profile)
        known = sum(q.id in b_max for q in questions)
        if known == 0:
            raise UserError(
                f"profile {profile_file(stage.profile)} has no entry for any question of {stage.dataset!r} "
                f"(split {stage.split!r}): was it made on another dataset?"
            )
        logger.info("grpo: the profile covers %d of %d questions", known, len(questions))
    else:
        logger.warning(
            "grpo: no profile, so no b_max: no budget penalty, no prefilled budgets%s",
            ", and profile_only has nothing to select by" if stage.profile_only else "",
        )
    rows = build_rows(questions, tokenizer, stage, b_max, seed, max_budget)
    constrained = sum(r["b_max"] is not None for r in rows)
    prefilled = sum(r["prefill_budget"] is not None for r in rows)
    logger.info("grpo: %d prompts, %d with b_max, %d with a prefilled budget", len(rows), constrained, prefilled)
    return rows


def _reward_names(funcs: Sequence[Any]) -> list[str]:
    return [getattr(f, "__name__", type(f).__name__) for f in funcs]


def freeze(model: Any, patterns: Sequence[str]) -> list[str]:
    """Stop training the parameters whose name matches one of `patterns` (re.search); returns their names."""
    regexes = [re.compile(p) for p in patterns]
    named = list(model.named_parameters())
    frozen = [(name, param) for name, param in named if any(r.search(name) for r in regexes)]
    if not frozen:
        raise UserError(f"frozen_parameters {list(patterns)} match no parameter of the model "
                        f"(its names look like {named[0][0]!r})")
    if len(frozen) == len(named):
        raise UserError(f"frozen_parameters {list(patterns)} match every parameter: nothing would train")
    for _, param in frozen:
        param.requires_grad_(False)
    logger.info("grpo: froze %d of %d parameter tensors (%s)", len(frozen), len(named), ", ".join(patterns))
    return [name for name, _ in frozen]


def run_grpo(stage: GRPOStageArgs, reward_cfg: RewardConfig, config: Any, callbacks: list | None = None) -> Path:
    """Train and save; returns `config.output_dir`. Resumes from the last checkpoint there, if any."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import GRPOTrainer

    from ..core.models import load_tokenizer, resolve
    from .rewards import build_reward_funcs
    from .sft import cpu_only, resume_point, save_final

    if stage.model is None:
        raise UserError("no --model: give the cold-start model folder (the output_dir of `selfbudgeter sft`)")
    if stage.prefill_spread and config.use_vllm and config.vllm_mode == "server":
        raise UserError("prefill_spread gives the completions of a group different prompts, but TRL's vLLM server "
                        "mode samples one prompt per group: use vllm_mode colocate, or prefill_spread false")
    if config.use_vllm and cpu_only():
        raise UserError("use_vllm needs a CUDA GPU; set use_vllm false to generate with transformers on the CPU")
    source = resolve(stage.model)
    tokenizer = load_tokenizer(stage.model)
    reward_funcs = build_reward_funcs(stage.rewards, tokenizer, reward_cfg)
    names = _reward_names(reward_funcs)
    if config.reward_weights is not None and len(config.reward_weights) != len(reward_funcs):
        raise UserError(
            f"reward_weights has {len(config.reward_weights)} values for {len(reward_funcs)} reward functions "
            f"({', '.join(names)})"
        )
    rows = load_rows(stage, tokenizer, config.seed, reward_cfg.max_budget)
    set_seed(config.seed)
    resume = resume_point(config)
    logger.info(
        "grpo: %s with rewards %s -> %s%s",
        source,
        ", ".join(names),
        config.output_dir,
        f" (resuming from {resume})" if resume else "",
    )
    trainer_class, extra = GRPOTrainer, {}
    if stage.budget_relabel_weight > 0:
        from .relabel import RelabelGRPOTrainer
        from .rewards import SelfBudgeterScorer

        # The SelfBudgeter reward's scorer, when there is one, so that each completion is graded once.
        scorer = next((f.scorer for f in reward_funcs if isinstance(getattr(f, "scorer", None), SelfBudgeterScorer)),
                      None) or SelfBudgeterScorer(tokenizer, reward_cfg)
        trainer_class, extra = RelabelGRPOTrainer, {
            "scorer": scorer, "weight": stage.budget_relabel_weight, "target": stage.budget_relabel_target,
            "scope": stage.budget_relabel_scope, "prefilled": stage.budget_relabel_prefilled,
            "wrong": stage.budget_relabel_wrong,
        }
    if stage.prefill_spread:
        trainer_class = type(f"GroupBudgetSpread{trainer_class.__name__}", (GroupBudgetSpread, trainer_class), {})
        extra.update(spread_range=(stage.prefill_min, stage.prefill_max), spread_seed=config.seed,
                     max_budget=reward_cfg.max_budget)
    trainer = trainer_class(
        model=source,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=callbacks,
        **extra,
    )
    if stage.frozen_parameters:
        freeze(trainer.model, stage.frozen_parameters)
    trainer.train(resume_from_checkpoint=resume)
    out = save_final(trainer, tokenizer, config.output_dir)
    logger.info("grpo: saved the model to %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    stage, reward_cfg, config = parse_args(argv)
    out = run_grpo(stage, reward_cfg, config)
    print(f"GRPO model saved to {out}")
    return 0
