"""Hindsight budget relabelling: which rollouts teach a budget, the tensors it trains on, a 2-step GRPO run.

Run: .venv/bin/python -m pytest -q tests/test_relabel.py
"""

from __future__ import annotations

import json

import pytest
import torch

from selfbudgeter.training import grpo
from selfbudgeter.core.errors import UserError
from selfbudgeter.core.format import render_prefill, render_response, token_length
from selfbudgeter.training.relabel import relabel_batch, relabel_targets, strip_prefills
from selfbudgeter.training.rewards import SelfBudgeterScorer

SOLUTION = "1) 3+4=7\nSo the answer is \\boxed{7}."


@pytest.fixture
def scorer(embedded_tokenizer):
    return SelfBudgeterScorer(embedded_tokenizer)


def test_only_correct_well_formed_own_budgets_are_relabelled(scorer, embedded_tokenizer):
    length = token_length(embedded_tokenizer, SOLUTION)
    completions = [
        render_response(99, SOLUTION),  # own budget, correct: relabelled to its length
        render_response(99, SOLUTION.replace("{7}", "{8}")),  # wrong answer
        "<budget>abc</budget><solution>" + SOLUTION + "</solution>",  # broken budget
        SOLUTION + "</solution>",  # continues a prefilled budget: the user's, not the model's
        render_response(5, SOLUTION),  # own budget far under its length: still relabelled
    ]
    rows = [{"answer": "7", "prefill_budget": None}] * 3 + [{"answer": "7", "prefill_budget": 40},
                                                             {"answer": "7", "prefill_budget": float("nan")}]
    tag = render_prefill(length)
    assert relabel_targets(scorer, completions, rows) == [tag, None, None, None, tag]


@pytest.mark.parametrize("scope", ["tag", "response"])
def test_wrong_relabels_the_tags_of_wrong_answers_and_never_their_solutions(scorer, embedded_tokenizer, scope):
    wrong_solution = SOLUTION.replace("{7}", "{8}") + "\nCheck: 3+4=7."
    right, wrong = (token_length(embedded_tokenizer, s) for s in (SOLUTION, wrong_solution))
    assert right != wrong
    completions = [render_response(99, SOLUTION), render_response(99, wrong_solution),
                   "<budget>abc</budget><solution>" + wrong_solution + "</solution>",  # broken: still nothing
                   wrong_solution + "</solution>"]  # a user's budget: not the model's estimate
    rows = [{"answer": "7", "prefill_budget": None}] * 3 + [{"answer": "7", "prefill_budget": 40}]
    first = render_prefill(right) if scope == "tag" else render_response(right, SOLUTION)
    assert relabel_targets(scorer, completions, rows, scope=scope, wrong=True) == [
        first, render_prefill(wrong), None, None]
    assert relabel_targets(scorer, completions, rows, scope=scope)[1] is None


def test_prefilled_relabels_correct_user_budget_rollouts_as_whole_responses(scorer, embedded_tokenizer):
    """With `prefilled`, a correct rollout under a user budget of 40 becomes its response under a budget equal
    to its length (an example of following); wrong ones still teach nothing; own budgets keep their scope."""
    length = token_length(embedded_tokenizer, SOLUTION)
    completions = [SOLUTION + "</solution>", SOLUTION.replace("{7}", "{8}") + "</solution>", render_response(9, SOLUTION)]
    rows = [{"answer": "7", "prefill_budget": 40}] * 2 + [{"answer": "7", "prefill_budget": None}]
    assert relabel_targets(scorer, completions, rows, prefilled=True) == [
        render_response(length, SOLUTION), None, render_prefill(length)]
    assert relabel_targets(scorer, completions, rows) == [None, None, render_prefill(length)]


def test_strip_prefills_removes_the_user_tag_and_keeps_prompts_right_aligned(embedded_tokenizer):
    tok = embedded_tokenizer
    plain = tok.encode("<|user|>a b\n<|assistant|>")
    prompts = [plain + tok.encode(render_prefill(40)), plain]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    stripped, stripped_mask = strip_prefills(tok, ids, mask, [40, None])
    assert stripped[0][stripped_mask[0].bool()].tolist() == plain
    assert torch.equal(stripped[1], ids[1]) and torch.equal(stripped_mask[1], mask[1])
    with pytest.raises(ValueError, match="does not end with"):
        strip_prefills(tok, ids, mask, [41, None])


def test_group_median_gives_each_prompt_one_budget(scorer, embedded_tokenizer):
    short, long_ = SOLUTION, "1) 3+4=7\nCheck step 1: 3+4=7. Yes.\nSo the answer is \\boxed{7}."
    lengths = [token_length(embedded_tokenizer, text) for text in (short, long_)]
    assert lengths[0] < lengths[1]
    completions = [render_response(50, text) for text in (short, short, long_, long_.replace("{7}", "{8}"))]
    completions += [render_response(50, long_), render_response(50, long_)]
    rows = [{"prompt": "a", "answer": "7", "prefill_budget": None}] * 4
    rows += [{"prompt": "b", "answer": "7", "prefill_budget": None}] * 2
    own = relabel_targets(scorer, completions, rows)
    median = relabel_targets(scorer, completions, rows, "group_median")
    first, second = render_prefill(lengths[0]), render_prefill(lengths[1])
    assert own == [first] * 2 + [second, None] + [second] * 2
    # prompt a: correct lengths (short, short, long) -> median short; the wrong answer still teaches nothing
    assert median == [render_prefill(lengths[0])] * 3 + [None] + [render_prefill(lengths[1])] * 2


def test_peak_states_the_budget_the_final_reward_pays_most_for(embedded_tokenizer):
    from selfbudgeter.training.rewards import RewardConfig, precise_budget_score

    length = token_length(embedded_tokenizer, SOLUTION)
    rows = [{"answer": "7", "prefill_budget": None}]
    for alpha_end in (0.1, 0.25):
        cfg = RewardConfig(alpha_end=alpha_end)
        [tag] = relabel_targets(SelfBudgeterScorer(embedded_tokenizer, cfg), [render_response(99, SOLUTION)], rows,
                                "peak")
        budget = round(length / (1 - alpha_end))
        assert tag == render_prefill(budget) and budget > length
        # At alpha_end the relabelled budget earns (nearly) the most a correct answer can; its own length as the
        # budget sits at the kernel's edge and earns the least.
        assert precise_budget_score(True, length, budget, alpha_end, cfg) > 0.99 * cfg.correct_max
        assert precise_budget_score(True, length, length, alpha_end, cfg) == cfg.correct_min
    capped = SelfBudgeterScorer(embedded_tokenizer, RewardConfig(max_budget=length))
    assert relabel_targets(capped, [render_response(5, SOLUTION)], rows, "peak") == [render_prefill(length)]
    with pytest.raises(ValueError, match="alpha_end < 1"):
        relabel_targets(SelfBudgeterScorer(embedded_tokenizer, RewardConfig(alpha_end=1.0)), [], [], "peak")
    with pytest.raises(UserError, match="peak needs alpha_end < 1"):
        grpo.parse_args(["--config", "embedded/grpo", "--budget_relabel_target", "peak", "--alpha_end", "1.5"])


def test_unknown_relabel_target_is_an_error(scorer):
    with pytest.raises(ValueError, match="group_median"):
        relabel_targets(scorer, [], [], "mean")
    with pytest.raises(UserError, match="budget_relabel_target"):
        grpo.GRPOStageArgs(budget_relabel_target="mean")


def test_relabel_batch_trains_only_the_budget_tag(embedded_tokenizer):
    tok = embedded_tokenizer
    prompts = [tok.encode("<|user|>a b c\n<|assistant|>"), tok.encode("<|user|>a\n<|assistant|>")]
    width = max(map(len, prompts))
    prompt_ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = relabel_batch(tok, prompt_ids, prompt_mask, [render_prefill(137), None])

    ids, mask, labels = batch["relabel_ids"], batch["relabel_mask"], batch["relabel_labels"]
    assert ids.shape == mask.shape == labels.shape and torch.equal(ids[:, :width], prompt_ids)
    tag = tok.encode(render_prefill(137), add_special_tokens=False)
    trained = labels[0][labels[0] != -100].tolist()
    assert trained == tag and tok.decode(trained) == render_prefill(137)
    assert ids[0, width : width + len(tag)].tolist() == tag and mask[0, width:].sum() == len(tag)
    assert (labels[1] == -100).all() and mask[1, width:].sum() == 0  # no target: nothing trained, nothing seen
    assert (labels[:, :width] == -100).all()  # the prompt is never a label


def test_relabel_batch_of_whole_responses_trains_the_end_of_turn(embedded_tokenizer):
    tok = embedded_tokenizer
    prompt = tok.encode("<|user|>a\n<|assistant|>")
    target = render_response(12, SOLUTION)
    batch = relabel_batch(tok, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), [target])
    trained = batch["relabel_labels"][0][batch["relabel_labels"][0] != -100].tolist()
    assert trained == tok.encode(target, add_special_tokens=False) + [tok.eos_token_id]
    assert batch["relabel_ids"][0, len(prompt):].tolist() == trained


@pytest.mark.parametrize("bad", ["-1", "nan"])
def test_negative_or_nan_weight_is_a_user_error(bad):
    from selfbudgeter.core.errors import UserError

    with pytest.raises(UserError, match="budget_relabel_weight"):
        grpo.parse_args(["--config", "embedded/grpo", "--budget_relabel_weight", bad])


@pytest.mark.parametrize("scope, prefilled", [("tag", False), ("response", False), ("tag", True)])
def test_grpo_with_relabelling_trains_and_logs_its_loss(tmp_path, tiny_model_dir, monkeypatch, scope, prefilled):
    """With `prefilled`, the user's tag is stripped from TRL's own prompt ids (strip_prefills raises if they do
    not end with its tokens), so the recipe's prefilled prompts exercise it."""
    import selfbudgeter.training.relabel as relabel

    # A random model never writes a correct closed solution; pretend every rollout did, with 9 tokens.
    target = render_prefill(9) if scope == "tag" else render_response(9, SOLUTION)
    seen = []

    def targets(scorer, completions, rows, target_kind="own", scope="tag", prefilled=False, wrong=False):
        seen.append(scope)
        return [target] * len(completions)

    monkeypatch.setattr(relabel, "relabel_targets", targets)
    profile = tmp_path / "profile"
    profile.mkdir()
    (profile / "questions.jsonl").write_text(
        "".join(json.dumps({"id": f"embedded-train-{i}", "b_max": 60}) + "\n" for i in range(8))
    )
    out = tmp_path / "grpo"
    stage, reward_cfg, config = grpo.parse_args([
        "--config", "embedded/grpo", "--model", str(tiny_model_dir), "--profile", str(profile),
        "--output_dir", str(out), "--limit", "8", "--num_generations", "2", "--per_device_train_batch_size", "4",
        "--max_completion_length", "12", "--warmup_steps", "0", "--max_steps", "3", "--save_steps", "3",
        "--learning_rate", "1e-2", "--budget_relabel_weight", "1.0", "--budget_relabel_scope", scope,
        "--budget_relabel_prefilled", str(prefilled).lower(), "--prefill_fraction", "0.5",
    ])  # fmt: skip
    grpo.run_grpo(stage, reward_cfg, config)
    assert seen and set(seen) == {scope}
    logged = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"][:3]
    assert [entry["relabel/share"] for entry in logged] == [1.0, 1.0, 1.0]
    losses = [entry["relabel/loss"] for entry in logged]
    # The target is learnt: its next-token loss falls from a random model's ~log(vocab).
    assert losses[0] > 3.0 and losses[-1] < losses[0]
