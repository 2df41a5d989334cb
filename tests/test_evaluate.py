"""`selfbudgeter eval`: records in metrics.py's schema, control runs, base-model scoring, several datasets,
baselines, and reruns that reproduce their numbers.

Run: `.venv/bin/python -m pytest -q tests/test_evaluate.py` (a scripted generator and a tiny random model).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from selfbudgeter import evaluate as ev
from selfbudgeter.errors import UserError
from selfbudgeter.evaluate import EvalConfig, control_budget, evaluate
from selfbudgeter.format import render_prefill, render_response, token_length
from selfbudgeter.generation import Sample

RECORD_KEYS = {"id", "difficulty", "gold", "response", "prefill_budget", "control_multiplier", "budget", "length",
               "format_ok", "format_error", "correct", "grading_error", "predicted", "sample"}

QUESTIONS = [
    {"id": f"q{i}", "question": f"Start with {i} beads. 1) add 2. How many beads now?", "answer": str(i + 2),
     "difficulty": 1 + i % 3}
    for i in range(1, 6)
]
ESTIMATES = {"q1": 10, "q2": 7, "q3": None, "q4": 21, "q5": 3}  # q3's response breaks the format


def write_dataset(path: Path, questions=QUESTIONS) -> str:
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return str(path)


class ScriptedModel:
    """Stands in for `generation.generate`: budget-format responses whose answers are right for even ids."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, tokenizer, prompts, cfg, n, desc):
        self.calls.append((desc, len(prompts), n))
        out = []
        for prompt in prompts:
            start = int(re.search(r"Start with (\d+)", prompt).group(1))
            qid = f"q{start}"
            answer = start + 2 if start % 2 == 0 else start + 3
            prefill = re.search(r"<budget>(\d+)</budget><solution>$", prompt)
            if prefill:  # a control run continues the solution: one word per budgeted token, roughly
                text = "ok " * (int(prefill.group(1)) // 2) + f"\\boxed{{{answer}}}</solution>"
            elif ESTIMATES[qid] is None:
                text = "I will just answer \\boxed{5}"
            else:
                text = render_response(ESTIMATES[qid], f"so \\boxed{{{answer}}}")
            out.append([Sample(text, 10, "stop") for _ in range(n)])
        return out


@pytest.fixture
def scripted(monkeypatch):
    model = ScriptedModel()
    monkeypatch.setattr(ev, "_generate", model)
    return model


def cfg_for(tmp_path, dataset, **overrides) -> EvalConfig:
    values = dict(model="scripted", dataset=dataset, system_prompt=None, out=str(tmp_path / "eval"),
                  control_multipliers=[0.5, 1.0, 2.0], control_limit=3)
    values.update(overrides)
    return EvalConfig(**values)


def items(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "items.jsonl").read_text().splitlines()]


def test_records_follow_the_metrics_schema(tmp_path, scripted, embedded_tokenizer):
    cfg = cfg_for(tmp_path, write_dataset(tmp_path / "bench.jsonl"))
    result = evaluate(object(), cfg, tokenizer=embedded_tokenizer)
    records = items(cfg.out)
    assert all(RECORD_KEYS <= set(r) for r in records)
    main = [r for r in records if r["control_multiplier"] is None]
    assert [r["id"] for r in main] == ["q1", "q2", "q3", "q4", "q5"]
    q4 = main[3]
    assert (q4["budget"], q4["format_ok"], q4["correct"], q4["predicted"], q4["gold"]) == (21, True, True, "6", "6")
    assert q4["length"] == token_length(embedded_tokenizer, "so \\boxed{6}")
    assert (main[2]["format_ok"], main[2]["format_error"], main[2]["correct"]) == (False, "missing_budget", False)
    on_disk = json.loads((Path(cfg.out) / "metrics.json").read_text())
    for key in ("n", "accuracy", "mean_tokens", "within_20", "control", "format_failure_rate", "wall_seconds",
                "model", "dataset", "config"):
        assert key in on_disk
    assert on_disk["accuracy"] == result["accuracy"] == pytest.approx(2 / 5)
    assert on_disk["format_failure_rate"] == pytest.approx(1 / 5)
    assert on_disk["config"]["control_limit"] == 3


def test_control_runs_prefill_multiples_of_the_own_estimate(tmp_path, scripted, embedded_tokenizer):
    cfg = cfg_for(tmp_path, write_dataset(tmp_path / "bench.jsonl"))
    evaluate(object(), cfg, tokenizer=embedded_tokenizer)
    control = [r for r in items(cfg.out) if r["control_multiplier"] is not None]
    # The first 3 questions with a valid budget: q1, q2, q4 (q3 broke the format), 3 multipliers each.
    assert [(r["id"], r["control_multiplier"]) for r in control] == [
        (q, m) for q in ("q1", "q2", "q4") for m in (0.5, 1.0, 2.0)
    ]
    for r in control:
        expected = max(1, round(r["control_multiplier"] * ESTIMATES[r["id"]]))
        assert r["prefill_budget"] == r["budget"] == expected
        assert r["response"].startswith(render_prefill(expected)) and r["format_ok"]
    assert scripted.calls[-1] == ("control " + cfg.dataset, 9, 1)
    curve = json.loads((Path(cfg.out) / "metrics.json").read_text())["control"]
    assert [row["multiplier"] for row in curve] == [0.5, 1.0, 2.0] and all(row["n"] == 3 for row in curve)


@pytest.mark.parametrize(
    "multiplier, estimate, cap, budget",
    [(0.25, 10, 1000, 2), (0.25, 2, 1000, 1), (4.0, 300, 1000, 1000), (1.0, 7, 1000, 7), (0.5, 5, 1000, 2)],
)
def test_control_budget(multiplier, estimate, cap, budget):
    assert control_budget(multiplier, estimate, cap) == budget  # round() is banker's: 2.5 -> 2


def test_control_disabled(tmp_path, scripted, embedded_tokenizer):
    for overrides in ({"control_multipliers": []}, {"control_limit": 0}):
        cfg = cfg_for(tmp_path, write_dataset(tmp_path / "bench.jsonl"), **overrides)
        evaluate(object(), cfg, tokenizer=embedded_tokenizer)
        assert all(r["control_multiplier"] is None for r in items(cfg.out))


def test_base_models_are_measured_and_graded_whole(tmp_path, scripted, embedded_tokenizer):
    cfg = cfg_for(tmp_path, write_dataset(tmp_path / "bench.jsonl"), budgeted=False)
    evaluate(object(), cfg, tokenizer=embedded_tokenizer)
    records = items(cfg.out)
    assert len(records) == 5  # no control runs without budgets
    q3 = records[2]
    assert q3["length"] == token_length(embedded_tokenizer, "I will just answer \\boxed{5}")
    assert q3["correct"] is True and q3["budget"] is None  # 3 + 2 = 5: graded although it has no format
    q4 = records[3]
    assert q4["length"] == token_length(embedded_tokenizer, q4["response"])  # budget tags counted too


def test_several_datasets_and_a_baseline(tmp_path, scripted, embedded_tokenizer):
    first = write_dataset(tmp_path / "alpha.jsonl", QUESTIONS[:2])
    second = write_dataset(tmp_path / "beta.jsonl", QUESTIONS[2:])
    base = evaluate(object(), cfg_for(tmp_path, f"{first},{second}", budgeted=False, out=str(tmp_path / "base")),
                    tokenizer=embedded_tokenizer)
    result = evaluate(object(), cfg_for(tmp_path, f"{first},{second}", baseline=str(tmp_path / "base")),
                      tokenizer=embedded_tokenizer)
    out = Path(tmp_path / "eval")
    assert (out / "alpha" / "items.jsonl").is_file() and (out / "beta" / "metrics.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    per = summary["benchmarks"]
    assert summary["accuracy"] == pytest.approx((per[first]["accuracy"] + per[second]["accuracy"]) / 2)
    for name in (first, second):
        expected = 1 - per[name]["mean_tokens"] / base["benchmarks"][name]["mean_tokens"]
        assert per[name]["compression"] == pytest.approx(expected)
    assert summary["compression"] == pytest.approx((per[first]["compression"] + per[second]["compression"]) / 2)
    assert result["average"] == summary["average"]


def test_missing_baseline_is_a_user_error(tmp_path, scripted, embedded_tokenizer):
    cfg = cfg_for(tmp_path, write_dataset(tmp_path / "bench.jsonl"), baseline=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="baseline"):
        evaluate(object(), cfg, tokenizer=embedded_tokenizer)


@pytest.mark.parametrize(
    "overrides, message",
    [({"samples": 0}, "samples"), ({"control_multipliers": [1.0, -2.0]}, "multipliers"),
     ({"control_limit": -1}, "control_limit"), ({"limit": 0}, "limit")],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(UserError, match=message):
        EvalConfig(**overrides)


def test_cli_reads_an_empty_multiplier_list_from_yaml(tmp_path):
    from selfbudgeter.config import parse_config

    recipe = tmp_path / "eval.yaml"
    recipe.write_text("control_multipliers: []\nsystem_prompt: null\n")
    (cfg,) = parse_config((EvalConfig,), ["--config", str(recipe), "--baseline", "null"], "eval", "")
    assert cfg.control_multipliers == [] and cfg.system_prompt is None and cfg.baseline is None


def test_rerun_with_the_same_seed_gives_the_same_numbers(tmp_path, tiny_model_dir):
    from selfbudgeter.models import load_model

    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    runs = []
    for name in ("a", "b"):
        cfg = EvalConfig(model=str(tiny_model_dir), dataset="embedded", limit=4, samples=2, max_new_tokens=12,
                         system_prompt=None, out=str(tmp_path / name), seed=5)
        runs.append(evaluate(model, cfg, tokenizer=tokenizer))
    assert items(tmp_path / "a") == items(tmp_path / "b")
    drop = {"wall_seconds", "config"}
    assert {k: v for k, v in runs[0].items() if k not in drop} == {k: v for k, v in runs[1].items() if k not in drop}
    other = evaluate(model, EvalConfig(model=str(tiny_model_dir), dataset="embedded", limit=4, samples=2,
                                       max_new_tokens=12, system_prompt=None, out=str(tmp_path / "c"), seed=6),
                     tokenizer=tokenizer)
    assert [r["response"] for r in items(tmp_path / "c")] != [r["response"] for r in items(tmp_path / "a")]
    assert other["n"] == 8


def test_embedded_records_measure_their_filler(embedded_tokenizer):
    from selfbudgeter import task

    row = task.load_split("test")[0]
    solution = task.minimal_solution(task.parse_question(row.question))
    steps, answer = solution.rsplit("\n", 1)
    padded = f"{steps}\nWait, let me double-check.\n{answer}"
    filler = token_length(embedded_tokenizer, "Wait, let me double-check.")
    scored = ev.score_record(embedded_tokenizer, row, render_response(40, padded), sample=0, budgeted=True,
                             max_budget=1000)
    assert scored["correct"] and scored["filler_tokens"] == filler
    bare = ev.score_record(embedded_tokenizer, row, solution, sample=0, budgeted=False, max_budget=1000)
    assert bare["filler_tokens"] == 0
    broken = ev.score_record(embedded_tokenizer, row, padded, sample=0, budgeted=True, max_budget=1000)
    assert broken["filler_tokens"] is None  # no budget tag: the solution cannot be isolated
    other = ev.score_record(embedded_tokenizer, dataclasses.replace(row, source="gsm8k"), solution, sample=0,
                            budgeted=False, max_budget=1000)
    assert "filler_tokens" not in other
