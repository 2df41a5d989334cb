"""Stage 2 (budget-guided GRPO): dataset building, a 2-step run on a tiny model, kill-and-resume.

Run with `pytest tests/test_grpo.py`; the training tests use a 2-layer random model with 12-token
completions and take a few seconds each on a 2-core CPU.
"""

from __future__ import annotations

import json
import math

import pytest

from selfbudgeter.training import grpo
from selfbudgeter.core.config import packaged_recipes
from selfbudgeter.data import Row, prompt_text
from selfbudgeter.core.errors import UserError
from selfbudgeter.core.format import render_prefill
from selfbudgeter.training.sft import cpu_only, last_checkpoint


def _questions(n: int) -> list[Row]:
    question = "Start with {}. 1) add 3. What is the final number?"
    return [Row(id=f"q{i}", question=question.format(i), answer=str(i + 3)) for i in range(n)]


def _stage(**kwargs) -> grpo.GRPOStageArgs:
    return grpo.GRPOStageArgs(model="unused", system_prompt=None, **kwargs)


# --- dataset ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(embedded_tokenizer):
    """400 questions, 300 of them with a b_max (20..319), rows built with the default prefill settings."""
    questions = _questions(400)
    b_max = {f"q{i}": float(20 + i) for i in range(300)}
    rows = grpo.build_rows(questions, embedded_tokenizer, _stage(), b_max, seed=0)
    return questions, b_max, rows


def test_prefill_share_is_the_fraction_of_prompts_with_b_max(built):
    _, _, rows = built
    prefilled = [r for r in rows if r["prefill_budget"] is not None]
    assert len(prefilled) == round(0.25 * 300)
    assert all(r["b_max"] is not None for r in prefilled)
    assert all(r["prefill_budget"] is None for r in rows if r["b_max"] is None)


def test_prefill_budgets_lie_within_half_and_twice_b_max(built):
    _, _, rows = built
    ratios = [r["prefill_budget"] / r["b_max"] for r in rows if r["prefill_budget"] is not None]
    assert all(0.5 <= x <= 2.0 for x in ratios)
    # Log-uniform around b_max: about as many budgets below it as above, and both ends are reached.
    below = sum(x < 1 for x in ratios) / len(ratios)
    assert 0.35 <= below <= 0.65
    assert min(ratios) < 0.6 and max(ratios) > 1.7


def test_prompt_ends_with_the_prefill_exactly_when_prefilled(built, embedded_tokenizer):
    questions, _, rows = built
    for question, row in zip(questions, rows):
        plain = prompt_text(embedded_tokenizer, question.question, system_prompt=None)
        budget = row["prefill_budget"]
        if budget is None:
            assert row["prompt"] == plain
            assert not row["prompt"].endswith("</budget><solution>")
        else:
            assert row["prompt"] == plain + render_prefill(budget)
        assert row["answer"] == question.answer and row["id"] == question.id


def test_rows_carry_the_reward_columns(built):
    _, b_max, rows = built
    assert set(rows[0]) == {"prompt", "answer", "b_max", "prefill_budget", "difficulty", "id"}
    assert rows[5]["b_max"] == b_max["q5"]
    assert rows[350]["b_max"] is None


def test_prefills_follow_the_seed(embedded_tokenizer):
    questions = _questions(40)
    b_max = {q.id: 100.0 for q in questions}
    one = grpo.build_rows(questions, embedded_tokenizer, _stage(), b_max, seed=1)
    same = grpo.build_rows(questions, embedded_tokenizer, _stage(), b_max, seed=1)
    other = grpo.build_rows(questions, embedded_tokenizer, _stage(), b_max, seed=2)
    pick = [r["prefill_budget"] for r in one]
    assert pick == [r["prefill_budget"] for r in same]
    assert pick != [r["prefill_budget"] for r in other]


@pytest.mark.parametrize(
    "b_maxes, fraction, expected_count",
    [
        ([None] * 10, 0.5, 0),  # nothing to draw around
        ([10.0] * 10, 0.0, 0),
        ([10.0] * 10, 1.0, 10),
        ([10.0, None] * 5, 1.0, 5),
        ([1.0] * 4, 1.0, 4),  # the smallest b_max still has an integer in [0.5, 2]: 1 or 2
    ],
)
def test_sample_prefills_counts(b_maxes, fraction, expected_count):
    budgets = grpo.sample_prefills(b_maxes, fraction)
    assert sum(b is not None for b in budgets) == expected_count
    assert all(b is None or 0.5 * m <= b <= 2 * m for b, m in zip(budgets, b_maxes))


def test_sample_prefills_respects_the_budget_cap():
    budgets = grpo.sample_prefills([1000.0] * 20, 1.0, max_budget=600)
    assert all(500 <= b <= 600 for b in budgets)


def test_spread_budgets_take_one_budget_from_each_slice_of_the_log_range():
    import random

    b_max, low, high, n = 200.0, 0.25, 1.0, 8
    budgets = grpo.spread_budgets(b_max, n, low, high, random.Random(0))
    assert len(budgets) == n and budgets == sorted(budgets)
    edges = [low * b_max * (high / low) ** (k / n) for k in range(n + 1)]
    for k, budget in enumerate(budgets):
        assert edges[k] - 0.5 <= budget <= edges[k + 1] + 0.5  # rounded to an integer
    assert grpo.spread_budgets(b_max, n, low, high, random.Random(0)) == budgets
    assert grpo.spread_budgets(b_max, n, low, high, random.Random(1)) != budgets
    assert all(b == 3 for b in grpo.spread_budgets(3.0, 4, 1.0, 1.0, random.Random(0)))


def test_spread_prefills_give_each_copy_of_a_prefilled_prompt_its_own_budget(embedded_tokenizer):
    import random

    questions = _questions(2)
    b_max = {"q0": 120.0, "q1": 120.0}
    rows = grpo.build_rows(questions, embedded_tokenizer, _stage(prefill_fraction=0.5), b_max, seed=0)
    assert sorted(r["prefill_budget"] is None for r in rows) == [False, True]
    batch = [dict(r) for r in rows for _ in range(4)]  # TRL's order: a prompt's copies one after another
    spread = grpo.spread_prefills(batch, 4, 0.25, 1.0, random.Random(0))
    for start in (0, 4):
        group, original = spread[start:start + 4], batch[start]
        if original["prefill_budget"] is None:
            assert group == batch[start:start + 4]
            continue
        budgets = [r["prefill_budget"] for r in group]
        assert len(set(budgets)) == 4 and all(30 <= b <= 120 for b in budgets)
        plain = prompt_text(embedded_tokenizer, next(q.question for q in questions if q.id == original["id"]),
                            system_prompt=None)
        assert [r["prompt"] for r in group] == [plain + render_prefill(b) for b in budgets]
        assert all(r["answer"] == original["answer"] and r["b_max"] == 120.0 for r in group)
    with pytest.raises(ValueError, match="groups of 3"):
        grpo.spread_prefills(batch, 3, 0.25, 1.0, random.Random(0))
    with pytest.raises(ValueError, match="not one prompt's group"):
        grpo.spread_prefills(batch[2:6], 4, 0.25, 1.0, random.Random(0))


def test_profile_only_and_limit(embedded_tokenizer):
    questions = _questions(10)
    b_max = {"q2": 50.0, "q5": None, "q7": 30.0}
    rows = grpo.build_rows(questions, embedded_tokenizer, _stage(profile_only=True), b_max)
    assert [r["id"] for r in rows] == ["q2", "q5", "q7"]
    rows = grpo.build_rows(questions, embedded_tokenizer, _stage(limit=4), b_max)
    assert [r["id"] for r in rows] == ["q0", "q1", "q2", "q3"]
    with pytest.raises(UserError, match="profile"):
        grpo.build_rows(questions, embedded_tokenizer, _stage(profile_only=True), {"other": 1.0})
    # No profile at all: profile_only has nothing to select by and every question stays.
    assert len(grpo.build_rows(questions, embedded_tokenizer, _stage(profile_only=True), None)) == 10
    # solved_only keeps the questions with a known b_max: the unsolved q5 goes too
    rows = grpo.build_rows(questions, embedded_tokenizer, _stage(profile_only=True, solved_only=True), b_max)
    assert [r["id"] for r in rows] == ["q2", "q7"]


def test_load_b_max(tmp_path):
    records = [{"id": "a", "b_max": 120.5}, {"id": 7, "b_max": None}, {"id": "c", "b_max": 3}]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert grpo.load_b_max(tmp_path) == {"a": 120.5, "7": None, "c": 3.0}


@pytest.mark.parametrize("bad", [0, -4, "12", True, float("inf")])
def test_load_b_max_rejects_bad_values(tmp_path, bad):
    (tmp_path / "questions.jsonl").write_text(json.dumps({"id": "a", "b_max": bad}) + "\n")
    with pytest.raises(UserError, match="b_max"):
        grpo.load_b_max(tmp_path)


def test_profile_of_another_dataset_is_a_user_error(tmp_path, embedded_tokenizer):
    (tmp_path / "questions.jsonl").write_text(json.dumps({"id": "nope", "b_max": 9}) + "\n")
    stage = _stage(dataset="embedded", profile=str(tmp_path), limit=5)
    with pytest.raises(UserError, match="no entry"):
        grpo.load_rows(stage, embedded_tokenizer)


@pytest.mark.parametrize(
    "option, message",
    [
        (["--prefill_fraction", "1.5"], "prefill_fraction"),
        (["--prefill_min", "3"], "prefill_min"),
        (["--wrong_max", "0.9"], "wrong_max"),  # RewardConfig validates itself
        (["--frozen_parameters", "q_proj", "(k"], "frozen_parameters"),
    ],
)
def test_bad_options_are_user_errors(option, message):
    with pytest.raises(UserError, match=message):
        grpo.parse_args(["--config", "embedded/grpo", *option])


@pytest.mark.parametrize("recipe", ["embedded/grpo", "embedded/grpo_accuracy", "embedded/grpo_kimi_length"])
def test_embedded_recipes_share_their_training_numbers(recipe):
    from selfbudgeter.training.rewards import build_reward_funcs

    stage, reward_cfg, config = grpo.parse_args(["--config", recipe])
    _, _, reference = grpo.parse_args(["--config", "embedded/grpo"])
    assert config.num_generations == 8 and config.per_device_train_batch_size % 8 == 0
    for name in ("max_steps", "learning_rate", "max_completion_length", "temperature", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "beta"):
        assert getattr(config, name) == getattr(reference, name), name
    assert build_reward_funcs(stage.rewards, None, reward_cfg)
    if cpu_only():
        assert config.use_cpu and not config.bf16



@pytest.mark.parametrize("recipe", [name for name in packaged_recipes() if "/grpo" in name])
def test_every_packaged_grpo_recipe_parses_and_names_known_rewards(recipe):
    from selfbudgeter.training.rewards import build_reward_funcs

    stage, reward_cfg, config = grpo.parse_args(["--config", recipe])
    assert (config.max_steps > 0 or config.num_train_epochs > 0) and stage.model
    assert build_reward_funcs(stage.rewards, None, reward_cfg)

# --- training --------------------------------------------------------------------------------------------


def _train_args(model_dir, profile_dir, out, *extra):
    return grpo.parse_args(
        [
            "--config", "embedded/grpo",
            "--model", str(model_dir),
            "--profile", str(profile_dir),
            "--output_dir", str(out),
            "--limit", "16",
            "--prefill_fraction", "0.5",
            "--num_generations", "2",
            "--per_device_train_batch_size", "4",
            "--max_completion_length", "12",
            "--warmup_steps", "0",
            "--save_steps", "1",
            *extra,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    """b_max for the first 12 embedded training questions; 3 of them unsolved (null)."""
    path = tmp_path_factory.mktemp("profile")
    records = [{"id": f"embedded-train-{i}", "b_max": None if i % 4 == 3 else 40 + 10 * i} for i in range(12)]
    (path / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _recorder(stop_after_save_at: int | None = None):
    """A TrainerCallback noting the global step at train begin and each step; optionally dies after a save."""
    from transformers import TrainerCallback

    class Killed(RuntimeError):
        pass

    class Recorder(TrainerCallback):
        def __init__(self):
            self.begin_step = None
            self.steps = []
            self.killed = Killed

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin_step = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == stop_after_save_at:
                raise Killed(f"killed after saving step {state.global_step}")

    return Recorder()


def _alphas(out, checkpoint: str) -> dict[int, float]:
    state = json.loads((out / checkpoint / "trainer_state.json").read_text())
    return {e["step"]: e["selfbudgeter/alpha"] for e in state["log_history"] if "selfbudgeter/alpha" in e}


def test_grpo_two_steps_complete_and_save(tmp_path, tiny_model_dir, profile_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "grpo"
    recorder = _recorder()
    saved = grpo.run_grpo(*_train_args(tiny_model_dir, profile_dir, out, "--max_steps", "2"), callbacks=[recorder])
    assert saved == out and recorder.steps == [1, 2]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(out).chat_template
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logged = state["log_history"][0]
    for name in ("format_reward", "budget_penalty_reward", "precise_budget_reward"):
        assert f"rewards/{name}/mean" in logged
    assert logged["selfbudgeter/alpha"] == pytest.approx(6.0)  # step 0 of 2


def test_grpo_with_spread_prefills_samples_a_group_under_several_budgets(tmp_path, tiny_model_dir, profile_dir,
                                                                       monkeypatch):
    seen = []
    spread = grpo.spread_prefills

    def recording(inputs, group, *args, **kwargs):
        out = spread(inputs, group, *args, **kwargs)
        seen.extend(out[i:i + group] for i in range(0, len(out), group))
        return out

    monkeypatch.setattr(grpo, "spread_prefills", recording)
    out = tmp_path / "grpo"
    grpo.run_grpo(*_train_args(tiny_model_dir, profile_dir, out, "--max_steps", "2", "--prefill_fraction", "1.0",
                               "--prefill_spread", "true", "--num_generations", "4"))
    prefilled = [group for group in seen if group[0]["prefill_budget"] is not None]
    assert len(seen) == 4 and prefilled  # a prompt of 4 copies per batch, 2 accumulated batches per step
    for group in prefilled:
        assert len({row["prefill_budget"] for row in group}) > 1


def test_spread_prefills_refuse_vllm_server_mode(tmp_path, tiny_model_dir, profile_dir):
    args = _train_args(tiny_model_dir, profile_dir, tmp_path / "grpo", "--prefill_spread", "true", "--use_vllm", "true",
                       "--vllm_mode", "server")
    with pytest.raises(UserError, match="one prompt per group"):
        grpo.run_grpo(*args)


def test_freeze_stops_exactly_the_matching_parameters(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    frozen = grpo.freeze(model, ["q_proj", "k_proj"])
    assert len(frozen) == 4  # 2 layers x (q, k)
    for name, param in model.named_parameters():
        assert param.requires_grad == (name not in frozen)
        assert param.requires_grad == ("q_proj" not in name and "k_proj" not in name)
    with pytest.raises(UserError, match="match no parameter"):
        grpo.freeze(model, ["no_such_module"])
    with pytest.raises(UserError, match="every parameter"):
        grpo.freeze(model, ["."])


def test_grpo_leaves_frozen_parameters_untouched(tmp_path, tiny_model_dir, profile_dir):
    from safetensors.torch import load_file

    out = tmp_path / "frozen"
    # Weight decay moves every trained weight even where a random model's rewards tie (zero advantages).
    grpo.run_grpo(*_train_args(tiny_model_dir, profile_dir, out, "--max_steps", "1", "--weight_decay", "0.1",
                               "--frozen_parameters", "self_attn"))
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    attention = [name for name in before if "self_attn" in name]
    assert attention and all(before[name].equal(after[name]) for name in attention)
    assert any(not before[name].equal(after[name]) for name in before if "mlp" in name)


def test_grpo_resumes_after_a_kill_with_the_same_alpha_schedule(tmp_path, tiny_model_dir, profile_dir):
    whole = tmp_path / "whole"
    grpo.run_grpo(*_train_args(tiny_model_dir, profile_dir, whole, "--max_steps", "4"))
    reference = _alphas(whole, "checkpoint-4")
    assert sorted(reference) == [1, 2, 3, 4]

    broken = tmp_path / "broken"
    first = _recorder(stop_after_save_at=2)
    with pytest.raises(first.killed):
        grpo.run_grpo(*_train_args(tiny_model_dir, profile_dir, broken, "--max_steps", "4"), callbacks=[first])
    assert first.steps == [1, 2] and last_checkpoint(broken) == broken / "checkpoint-2"
    assert not (broken / "model.safetensors").exists()  # the kill came before the final save

    second = _recorder()
    grpo.run_grpo(*_train_args(tiny_model_dir, profile_dir, broken, "--max_steps", "4"), callbacks=[second])
    assert second.begin_step == 2 and second.steps == [3, 4]
    resumed = _alphas(broken, "checkpoint-4")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step, alpha in reference.items():
        assert math.isclose(resumed[step], alpha), (step, resumed[step], alpha)
    # The schedule really moved: alpha at the step-3 generation is 6 - 5.9 * 3/4 (logged at step 4).
    assert reference[4] == pytest.approx(6.0 - 5.9 * 3 / 4)


@pytest.mark.parametrize("size", ["1.5b", "7b"])
def test_paper_recipes(size):
    stage, reward_cfg, config = grpo.parse_args(["--config", f"deepseek-r1-distill-qwen-{size}/grpo"])
    assert stage.rewards == ["selfbudgeter"] and stage.profile
    assert (config.num_generations, config.temperature) == (5, 0.6)  # the paper's rollouts
    assert (reward_cfg.alpha_start, reward_cfg.alpha_end) == (6.0, 0.1)
    assert config.use_vllm and config.vllm_mode == "colocate"
    assert config.max_completion_length == 16384
    assert config.generation_batch_size % config.num_generations == 0
    if cpu_only():
        with pytest.raises(UserError, match="use_vllm needs a CUDA GPU"):
            grpo.run_grpo(stage, reward_cfg, config)
