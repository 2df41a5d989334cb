"""Hindsight budget relabelling: GRPO that also teaches the budget to predict the solution it now writes.

Beyond the paper. The SPEC reward pays for a solution of length l under a budget b through the kernel
k(l; (1-alpha) b, alpha b), a function of l / b only. While alpha is loose the model learns to write far
less than its budget; when alpha tightens, the reward asks for l close to (1 - alpha) b, which the policy
has to reach by lowering its sampled budget digits (or by writing longer again). A small model in a short
run does neither: with the SPEC reward alone the embedded model's budgets stay where the cold start put
them, ~2.4x the solutions it learns to write, and stop following difficulty (README, "GRPO variants").

Relabelling closes that gap the way Stage 1 opened it: every rollout that stated its own budget and
answered correctly is also a cold-start example of what the model now writes. Its budget tag is replaced by
`render_prefill(l)`, l being its measured solution length, and the tag's tokens are trained with the
ordinary next-token loss (weight `budget_relabel_weight`) next to the GRPO loss. The rollouts, rewards,
advantages and alpha schedule are GRPO's own; only the budget tokens get this second teacher. Responses
with a prefilled (user) budget are not relabelled: their budget was not the model's.

The target is each rollout's own length (`own`), the median length of the relabelled rollouts of its
prompt in the batch (`group_median`): then the tag learns one number per question, where `own` teaches it to
reproduce the spread of lengths the rollout temperature gives; or the budget the final reward pays most for
that length (`peak`): l / (1 - alpha_end), since the kernel of a correct answer peaks at (1 - alpha) b. A
budget equal to its length sits at the kernel's edge (|l - (1 - alpha) b| = alpha b, k = 0), where a group's
rollouts that write a little less or a little more earn the same reward, so `own` leaves GRPO no signal to
settle the filler on; under `peak` the length the budget was set for earns the most.

The scope is the budget tag alone (`tag`), or the whole relabelled response (`response`): the tag, the
solution that followed it and the end of the turn, as in hindsight experience replay, where a goal is
rewritten to the outcome reached and the policy is trained to reach it. Then the solution, too, learns from
each example that a budget of l is followed by l tokens: where `tag` teaches the budget to predict the
solution, `response` also teaches the solution to follow the budget.

Wrong answers (`wrong`): a budget is a length estimate, and the length of a wrong answer is as real as that of
a right one. With `wrong`, every well-formed rollout with its own budget teaches the tag its length, right
or wrong; only the tag: a wrong solution is never trained (a wrong rollout keeps scope `tag` under scope
`response`). A weak model is right mostly on its easiest questions, so relabelling right answers alone
teaches it the budget of an easy question; its wrong answers to harder ones carry their longer lengths.

Rollouts under a user budget (`prefilled`, beyond both): by default they teach nothing here, since their
budget was not the model's. With `prefilled`, each correct one is rewritten as the answer to the same
question under a budget equal to its measured length: the prompt loses the user's tag and the whole response
(tag, solution, end of turn) is trained. Every such rollout becomes an example of *following* a budget, on
the policy's own solutions, whatever budget the user had asked for: hindsight relabelling of goals, as in
hindsight experience replay.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from trl import GRPOTrainer

from ..core.format import SOLUTION_CLOSE, parse_response, render_prefill, render_response
from .rewards import SelfBudgeterScorer, read_prefill

TARGETS = ("own", "group_median", "peak")
SCOPES = ("tag", "response")


def peak_keep(alpha_end: float) -> float:
    """1 - alpha_end, the share of its budget at which the final reward pays a correct answer most (`peak`
    relabels a length l to l / that); a ValueError when alpha_end >= 1 leaves no such peak."""
    if not alpha_end < 1:
        raise ValueError(f"relabel target peak needs alpha_end < 1 (its budget is length / (1 - alpha_end)), "
                         f"not {alpha_end}")
    return 1 - alpha_end


def relabel_targets(scorer: SelfBudgeterScorer, completions: Sequence[str], rows: Sequence[dict[str, Any]],
                    target: str = "own", scope: str = "tag", prefilled: bool = False,
                    wrong: bool = False) -> list[str | None]:
    """Per completion, its budget tag restated with a measured solution length (its own; with `group_median`
    the median over the relabelled completions of the same prompt; with `peak` its own over 1 - alpha_end),
    followed with scope `response` by its solution; None when it teaches nothing (a broken format, a wrong
    answer unless `wrong`, a budget the user prefilled unless `prefilled`). With `wrong`, a wrong answer's
    target is its tag alone, whatever the scope. With `prefilled`, a correct user-budget rollout becomes its
    whole response under a budget of its own length, whatever the target and scope."""
    if target not in TARGETS:
        raise ValueError(f"relabel target must be one of {', '.join(TARGETS)}, not {target!r}")
    if scope not in SCOPES:
        raise ValueError(f"relabel scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    keep = peak_keep(scorer.cfg.alpha_end) if target == "peak" else None
    golds = [row.get("answer") for row in rows]
    prefills = [row.get("prefill_budget") for row in rows]
    scored = scorer.batch(completions, answer=golds, prefill_budget=prefills)
    lengths: list[int | None] = []
    user: list[int | None] = []  # lengths of the correct user-budget rollouts that `prefilled` relabels
    right: list[bool] = []
    for item, prefill in zip(scored, prefills):
        own = read_prefill(prefill) is None
        formed = item.format_ok and 1 <= item.length <= scorer.cfg.max_budget
        lengths.append(item.length if formed and own and (item.correct or wrong) else None)
        user.append(item.length if formed and item.correct and prefilled and not own else None)
        right.append(bool(item.correct))
    if target == "group_median":
        groups: dict[Any, list[int]] = defaultdict(list)
        for row, length in zip(rows, lengths):
            if length is not None:
                groups[row.get("prompt")].append(length)
        lengths = [None if n is None else statistics.median_low(groups[row.get("prompt")])
                   for row, n in zip(rows, lengths)]
    elif target == "peak":
        lengths = [None if n is None else min(scorer.cfg.max_budget, round(n / keep)) for n in lengths]
    out = []
    # A length is set only where the scorer parsed the response, with the same max_budget: these parses succeed.
    for text, n, u, prefill, correct in zip(completions, lengths, user, prefills, right):
        if u is not None:
            out.append(render_response(u, parse_response(render_prefill(int(prefill)) + text,
                                                         scorer.cfg.max_budget).solution))
        elif n is None:
            out.append(None)
        elif scope == "tag" or not correct:
            out.append(render_prefill(n))
        else:
            out.append(render_response(n, parse_response(text, scorer.cfg.max_budget).solution))
    return out


def strip_prefills(tokenizer: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   prefills: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts without the user budget tag that ends some of them (`render_prefill(b)`'s tokens),
    shifted right so that every prompt still ends at the last column."""
    ids, mask = prompt_ids.clone(), prompt_mask.clone()
    pad = tokenizer.pad_token_id
    for i, prefill in enumerate(map(read_prefill, prefills)):
        if prefill is None:
            continue
        tag = tokenizer.encode(render_prefill(prefill), add_special_tokens=False)
        k = len(tag)
        if ids[i, -k:].tolist() != tag:
            raise ValueError(f"prompt {i} does not end with the tokens of its prefill {render_prefill(prefill)!r}")
        ids[i] = torch.cat([torch.full((k,), pad, dtype=ids.dtype, device=ids.device), prompt_ids[i, :-k]])
        mask[i] = torch.cat([torch.zeros(k, dtype=mask.dtype, device=mask.device), prompt_mask[i, :-k]])
    return ids, mask


def relabel_batch(tokenizer: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                  targets: Sequence[str | None]) -> dict[str, torch.Tensor]:
    """Left-padded prompts followed by each target's tokens (and the end-of-turn token after a target that is a
    whole response): input ids, attention mask and labels (-100 everywhere but the target's tokens; a row
    without a target is all -100)."""
    def ids(target: str) -> list[int]:
        end = [tokenizer.eos_token_id] if target.endswith(SOLUTION_CLOSE) else []
        return tokenizer.encode(target, add_special_tokens=False) + end

    tags = [ids(t) if t is not None else [] for t in targets]
    width = max(1, max(len(tag) for tag in tags))
    batch, pad = prompt_ids.size(0), tokenizer.pad_token_id
    tag_ids = torch.full((batch, width), pad, dtype=prompt_ids.dtype)
    tag_mask = torch.zeros((batch, width), dtype=prompt_mask.dtype)
    for i, tag in enumerate(tags):
        tag_ids[i, : len(tag)] = torch.tensor(tag, dtype=prompt_ids.dtype)
        tag_mask[i, : len(tag)] = 1
    tag_ids, tag_mask = tag_ids.to(prompt_ids.device), tag_mask.to(prompt_ids.device)
    labels = torch.cat([torch.full_like(prompt_ids, -100), tag_ids.masked_fill(tag_mask == 0, -100)], dim=1)
    return {
        "relabel_ids": torch.cat([prompt_ids, tag_ids], dim=1),
        "relabel_mask": torch.cat([prompt_mask, tag_mask], dim=1),
        "relabel_labels": labels,
    }


class RelabelGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` plus the hindsight budget loss, `weight` x next-token loss on relabelled budget tags
    (or whole relabelled responses)."""

    def __init__(self, *args: Any, scorer: SelfBudgeterScorer, weight: float, target: str = "own",
                 scope: str = "tag", prefilled: bool = False, wrong: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.budget_scorer = scorer
        self.relabel_weight = weight
        self.relabel_target = target
        self.relabel_scope = scope
        self.relabel_prefilled = prefilled
        self.relabel_wrong = wrong

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        ids = [row[mask.bool()] for row, mask in zip(output["completion_ids"], output["completion_mask"])]
        texts = self.processing_class.batch_decode(ids, skip_special_tokens=True)
        targets = relabel_targets(self.budget_scorer, texts, inputs, self.relabel_target, self.relabel_scope,
                                  self.relabel_prefilled, self.relabel_wrong)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["relabel/share"].append(sum(t is not None for t in targets) / max(1, len(targets)))
        prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
        if self.relabel_prefilled:
            prefills = [row.get("prefill_budget") for row in inputs]
            prompt_ids, prompt_mask = strip_prefills(self.processing_class, prompt_ids, prompt_mask, prefills)
        output.update(relabel_batch(self.processing_class, prompt_ids, prompt_mask, targets))
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["relabel_labels"]
        if not bool((labels != -100).any()):
            return loss
        relabel = model(input_ids=inputs["relabel_ids"], attention_mask=inputs["relabel_mask"], labels=labels).loss
        mode = "train" if self.model.training else "eval"
        # This process's value: a gather here would wait forever on a process whose batch has no target.
        self._metrics[mode]["relabel/loss"].append(relabel.item())
        scale = self.current_gradient_accumulation_steps if mode == "train" else 1
        return loss + self.relabel_weight * relabel / scale
