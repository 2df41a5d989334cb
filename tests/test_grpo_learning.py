"""GRPO end to end on a toy policy that writes the format: the SPEC reward, and relabelling, move it.

The other GRPO tests train a random model whose completions all score the same (every advantage is 0), so
they show that training runs, not that it learns. Here a 2-layer model is first taught, in a few seconds of
plain next-token training, to answer four copies of one question with the right answer under one of four
budgets (8, 16, 32 or 64 tokens; its solution is 10 tokens). Then:

1. `selfbudgeter grpo` with the SPEC reward alone and b_max = 12 (budgets above it pay the budget penalty)
   moves the budgets it samples below b_max;
2. with hindsight relabelling (the real `RelabelGRPOTrainer` and `relabel_targets`, nothing stubbed) and no
   budget penalty, the policy learns to state its own length, 10, a budget it was never shown.

Run: .venv/bin/python -m pytest -q tests/test_grpo_learning.py   (about 40 s on a busy 2-core CPU)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from selfbudgeter.training import grpo
from selfbudgeter.data import prompt_text
from selfbudgeter.core.format import FormatError, render_prefill, render_response, token_length, try_parse

SOLUTION = "So the answer is \\boxed{7}."
BUDGETS = (8, 16, 32, 64)
QUESTIONS = [{"id": f"q{i}", "question": f"What is 3+4? ({i})", "answer": "7"} for i in range(4)]


def _prompts(tokenizer) -> list[str]:
    return [prompt_text(tokenizer, q["question"], system_prompt=None) for q in QUESTIONS]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, embedded_tokenizer) -> Path:
    """A tiny model that writes `<budget>B</budget><solution>SOLUTION</solution>` for B in BUDGETS, about evenly."""
    from selfbudgeter.embedded.model import BaseTrainConfig, build_model

    tok = embedded_tokenizer
    torch.manual_seed(0)
    model = build_model(tok, BaseTrainConfig(hidden_size=32, layers=2, heads=2, intermediate_size=64,
                                             max_positions=128))
    pairs = [(tok.encode(p, add_special_tokens=False),
              tok.encode(render_response(b, SOLUTION), add_special_tokens=False) + [tok.eos_token_id])
             for p in _prompts(tok) for b in BUDGETS]
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), tok.pad_token_id)
    mask = torch.zeros(len(pairs), width, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100)
    for i, (prompt, completion) in enumerate(pairs):
        both = prompt + completion
        ids[i, : len(both)], mask[i, : len(both)] = torch.tensor(both), 1
        labels[i, len(prompt) : len(both)] = torch.tensor(completion)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2  # it writes the format; what is left is the spread over the four budgets
    root = tmp_path_factory.mktemp("toy")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return root


def _grpo(root: Path, out: Path, b_max: int, *extra: str) -> Path:
    (root / "profile").mkdir(exist_ok=True)
    (root / "profile" / "questions.jsonl").write_text(
        "".join(json.dumps({"id": q["id"], "b_max": b_max}) + "\n" for q in QUESTIONS))
    stage, reward_cfg, config = grpo.parse_args([
        "--config", "embedded/grpo", "--model", str(root / "model"), "--dataset", str(root / "questions.jsonl"),
        "--profile", str(root / "profile"), "--output_dir", str(out), "--prefill_fraction", "0",
        "--num_generations", "8", "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1",
        "--max_completion_length", "32", "--temperature", "1.0", "--beta", "0", "--warmup_steps", "0",
        "--learning_rate", "1e-3", "--max_steps", "10", "--save_strategy", "no", "--logging_steps", "1",
        "--rewards", "selfbudgeter", *extra,
    ])  # fmt: skip
    history = []

    from transformers import TrainerCallback

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            history.append(dict(logs or {}))

    grpo.run_grpo(stage, reward_cfg, config, callbacks=[Logs()])
    (out / "logs.json").write_text(json.dumps(history))
    return out


def _sampled_budgets(model_dir: Path) -> list[int]:
    from selfbudgeter.evaluation.generation import generate
    from selfbudgeter.core.models import load_model

    model, tok = load_model(str(model_dir), device="cpu", dtype="float32")
    samples = generate(model, tok, _prompts(tok), n=32, temperature=1.0, max_new_tokens=32, seed=1, progress=False)
    parsed = [try_parse(s.text) for per in samples for s in per]
    return [p.budget for p in parsed if not isinstance(p, FormatError)]


def _prefill_probability(model_dir: Path, budget: int) -> float:
    """The model's mean probability, over the prompts, of opening its answer with `render_prefill(budget)`."""
    from selfbudgeter.core.models import load_model

    model, tok = load_model(str(model_dir), device="cpu", dtype="float32")
    tag = tok.encode(render_prefill(budget), add_special_tokens=False)
    total = 0.0
    with torch.inference_mode():
        for prompt in _prompts(tok):
            ids = tok.encode(prompt, add_special_tokens=False)
            logits = model(torch.tensor([ids + tag])).logits[0, len(ids) - 1 : -1]
            total += math.exp(sum(torch.log_softmax(logits.float(), -1)[i, t].item() for i, t in enumerate(tag)))
    return total / len(QUESTIONS)


def test_the_spec_reward_moves_sampled_budgets_under_b_max(toy, tmp_path):
    before = _sampled_budgets(toy / "model")
    assert set(before) == set(BUDGETS)  # the toy policy spreads over all four budgets
    out = _grpo(toy, tmp_path / "spec", 12, "--budget_relabel_weight", "0")
    after = _sampled_budgets(out)
    share = [sum(b <= 12 for b in budgets) / len(budgets) for budgets in (before, after)]
    assert share[0] < 0.4 and share[1] > 0.8, share
    assert sum(after) / len(after) < 0.5 * sum(before) / len(before)
    logs = [entry for entry in json.loads((out / "logs.json").read_text()) if "reward" in entry]
    assert logs[0]["rewards/budget_penalty_reward/mean"] < logs[-1]["rewards/budget_penalty_reward/mean"]


def test_relabelling_through_the_trainer_teaches_the_policy_its_own_length(toy, tmp_path, embedded_tokenizer):
    own = token_length(embedded_tokenizer, SOLUTION)
    assert own not in BUDGETS
    before = _prefill_probability(toy / "model", own)
    # b_max far above every budget: no budget penalty, so what moves the budget towards the length is relabelling.
    out = _grpo(toy, tmp_path / "relabel", 1000, "--budget_relabel_weight", "1", "--budget_relabel_target", "own",
                "--budget_relabel_scope", "tag")
    logs = [entry for entry in json.loads((out / "logs.json").read_text()) if "relabel/loss" in entry]
    assert len(logs) == 10 and all(entry["relabel/share"] > 0 for entry in logs)  # correct rollouts were found
    assert logs[-1]["relabel/loss"] < 0.5 * logs[0]["relabel/loss"]
    after = _prefill_probability(out, own)
    # Measured: 3e-12 before, 3e-3 after ten steps.
    assert before < 1e-8 and after > 1e-4, (before, after)
