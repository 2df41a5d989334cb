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

from selfbudgeter.evaluation import evaluate as ev
from selfbudgeter.core.errors import UserError
from selfbudgeter.evaluation.evaluate import EvalConfig, control_budget, evaluate
from selfbudgeter.core.format import render_prefill, render_response, token_length
from selfbudgeter.evaluation.generation import Sample

RECORD_KEYS = {"id", "difficulty", "gold", "response", "prefill_budget", "control_multiplier", "budget", "length",
               "format_ok", "format_error", "correct", "grading_error", "predicted", "sample", "decoder", "forced"}

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
        self.temperatures = []

    def __call__(self, model, tokenizer, prompts, cfg, n, desc, temperature=None, max_new_tokens=None):
        self.calls.append((desc, len(prompts), n))
        self.temperatures.append(cfg.temperature if temperature is None else temperature)
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
    assert scripted.temperatures == [0.6, 0.0]  # the control runs are greedy unless told otherwise
    assert all(r["min_solution_tokens"] is None for r in control)  # these rows have no reference solution
    assert all(r["decoder"] == "model" and r["forced"] is False for r in items(cfg.out))
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
    from selfbudgeter.core.config import parse_config

    recipe = tmp_path / "eval.yaml"
    recipe.write_text("control_multipliers: []\nsystem_prompt: null\n")
    (cfg,) = parse_config((EvalConfig,), ["--config", str(recipe), "--baseline", "null"], "eval", "")
    assert cfg.control_multipliers == [] and cfg.system_prompt is None and cfg.baseline is None


def test_rerun_with_the_same_seed_gives_the_same_numbers(tmp_path, tiny_model_dir):
    from selfbudgeter.core.models import load_model

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


def test_records_carry_what_their_task_measures_the_embedded_filler(embedded_tokenizer):
    from selfbudgeter.embedded import task

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
    assert not [key for key in other if key.endswith("_tokens")]  # no task, no task measures


def test_a_registered_task_adds_its_own_measure_without_a_branch(embedded_tokenizer, monkeypatch):
    import sys
    import types

    from selfbudgeter import data

    toy = types.ModuleType("toy_task")
    toy.check_tokens = lambda tokenizer, solution: token_length(tokenizer, "".join(
        line for line in solution.splitlines(keepends=True) if line.startswith("Check")))
    monkeypatch.setitem(sys.modules, "toy_task", toy)
    monkeypatch.setitem(data.TASKS, "toy", data.Task("toy_task", ("test",), {"check": "check_tokens"}))
    row = data.Row("t", "Start with 1 cup. 1) gets 1. How many cups now?", "2", source="toy")
    solution = "1) 1+1=2\nCheck 1) 1+1=2\nSo the answer is \\boxed{2}."
    scored = ev.score_record(embedded_tokenizer, row, render_response(30, solution), sample=0, budgeted=True,
                             max_budget=1000)
    assert scored["check_tokens"] == token_length(embedded_tokenizer, "Check 1) 1+1=2\n")
    assert "filler_tokens" not in scored


# --- budget-following at decode time --------------------------------------------------------------------------

ANSWER_LINE = "So the answer is \\boxed{{{}}}."


def worked(start: int) -> str:
    return f"1) {start}+2={start + 2}\nCheck: {start}+2 is {start + 2}. Yes.\n" + ANSWER_LINE.format(start + 2)


class ScriptedDecoder:
    """Stands in for `generation.generate`: a model that states its own length exactly, ignores user budgets
    (writes the same solution whatever is prefilled), answers a forced answer prompt and writes one more check
    after an extension prompt. q3 breaks the format; q5 states a budget of 3 and overshoots it."""

    def __init__(self, tokenizer, cfg, extension_closes_short=False):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.extension_closes_short = extension_closes_short
        self.calls = []

    def __call__(self, model, tokenizer, prompts, cfg, n, desc, temperature=None, max_new_tokens=None):
        self.calls.append({"desc": desc, "prompts": list(prompts), "n": n, "max_new_tokens": max_new_tokens,
                           "temperature": cfg.temperature if temperature is None else temperature})
        out = []
        for prompt in prompts:
            start = int(re.search(r"Start with (\d+)", prompt).group(1))
            solution = worked(start)
            if prompt.endswith(self.cfg.answer_prompt):
                text = f"{start + 2}}}. Then some more words</solution>"  # the cut keeps "N}" only
            elif prompt.endswith(self.cfg.extend_prompt):
                more = "" if self.extension_closes_short else f"\nCheck again: {start}+2={start + 2}. Yes." * 3
                text = more + "\n" + ANSWER_LINE.format(start + 2) + "</solution>"
            elif prompt.endswith("<solution>"):  # a prefilled user budget: ignored
                text = solution + "</solution>"
            elif start == 3:
                text = "I will just answer \\boxed{5}"
            else:
                budget = 3 if start == 5 else token_length(self.tokenizer, solution)
                text = render_response(budget, solution)
            out.append([Sample(text, token_length(self.tokenizer, text), "stop") for _ in range(n)])
        return out


def decoded_run(tmp_path, monkeypatch, tokenizer, name="decoded", **overrides):
    questions = [{**q, "solution": worked(i)} for i, q in enumerate(QUESTIONS, 1)]
    cfg = cfg_for(tmp_path, write_dataset(tmp_path / "bench.jsonl", questions), out=str(tmp_path / name),
                  control_limit=5, **overrides)
    scripted = ScriptedDecoder(tokenizer, cfg)
    monkeypatch.setattr(ev, "_generate", scripted)
    result = evaluate(object(), cfg, tokenizer=tokenizer)
    return cfg, scripted, result, items(cfg.out)


def test_cap_and_extension_make_records_apart_from_the_model_alone(tmp_path, monkeypatch, embedded_tokenizer):
    tok = embedded_tokenizer
    cfg, scripted, result, records = decoded_run(tmp_path, monkeypatch, tok, decode_budget="cap_extend")
    _, _, alone_result, alone = decoded_run(tmp_path, monkeypatch, tok, name="alone")
    assert [r for r in records if r["decoder"] == "model"] == alone  # the model-alone records are untouched
    decoded = [r for r in records if r["decoder"] == "cap_extend"]
    assert {r["decoder"] for r in records} == {"model", "cap_extend"}
    assert len(decoded) == 5 + 4 * 3  # every main response and every control run (q3 has no budget)

    control = {(r["id"], r["control_multiplier"]): r for r in decoded if r["control_multiplier"] is not None}
    # 0.5x: the solution (its own estimate E tokens) is over the cap int(1.2 B): cut there, answer forced.
    low = control["q2", 0.5]
    limit = ev.cap_tokens(low["prefill_budget"], cfg.budget_slack)
    kept = ev.truncate_tokens(tok, worked(2), limit)
    assert low["forced"] and low["format_ok"] and low["correct"] and low["predicted"] == "4"
    assert low["response"] == render_prefill(low["prefill_budget"]) + kept + cfg.answer_prompt + "4}</solution>"
    assert low["length"] <= limit + token_length(tok, cfg.answer_prompt + "4}")
    # 1x: on budget, nothing to do; the record is the model's response.
    one = control["q2", 1.0]
    assert not one["forced"] and one["response"] == render_prefill(one["prefill_budget"]) + worked(2) + "</solution>"
    # 2x: ends at half the budget, below 0.8 B: the answer line goes, "Wait" comes, one more check is written.
    high = control["q2", 2.0]
    assert high["forced"] and high["format_ok"] and high["correct"]
    body = worked(2).rsplit("\n", 1)[0] + cfg.extend_prompt
    assert high["response"].startswith(render_prefill(high["prefill_budget"]) + body + "\nCheck again: 2+2=4.")
    assert high["response"].count("\\boxed{") == 1 and high["length"] > one["length"]

    main = {r["id"]: r for r in decoded if r["control_multiplier"] is None}
    assert not main["q1"]["forced"] and main["q1"]["response"] == alone[0]["response"]
    assert not main["q3"]["forced"] and main["q3"]["format_error"] == "missing_budget"  # no budget: unchanged
    assert main["q5"]["forced"] and main["q5"]["format_ok"]  # stated 3 tokens and wrote more: capped at 3
    assert main["q5"]["length"] <= 3 + token_length(tok, cfg.answer_prompt + "7}")

    # Continuations are generate calls on prompt + text so far: extensions at the control temperature, the
    # forced answers greedy; extensions get no more room than the largest cap leaves.
    calls = {c["desc"]: c for c in scripted.calls}
    extend = calls["control cap_extend " + cfg.dataset + " extend"]
    assert extend["temperature"] == 0.0 and all(p.endswith(cfg.extend_prompt) for p in extend["prompts"])
    assert calls["cap_extend " + cfg.dataset + " answer"]["temperature"] == 0.0
    assert calls["cap_extend " + cfg.dataset + " answer"]["max_new_tokens"] == cfg.answer_cap
    assert "cap_extend " + cfg.dataset + " extend" not in calls  # no main response ended short of its budget

    # Metrics: the top level is the model alone (it ignores budgets); the decoder has its own summary.
    for key in ("accuracy", "mean_tokens", "control_slope", "control_within_20", "control"):
        assert result[key] == alone_result[key], key
    assert result["control_slope"] == pytest.approx(0.0, abs=1e-9)
    forced = result["decoders"]["cap_extend"]
    assert forced["control_slope"] > 0.3 and forced["forced_rate"] == pytest.approx(1 / 5)
    assert forced["control"][-1]["mean_length"] > result["control"][-1]["mean_length"]  # 2x: extended
    assert forced["control"][-1]["forced_rate"] == 1.0 and result["control"][-1]["forced_rate"] == 0.0
    assert all(r["min_solution_tokens"] == token_length(tok, worked(int(r["id"][1:])))
               for r in records if r["control_multiplier"] is not None)


@pytest.mark.parametrize(
    "mode, forced",
    [
        ("none", set()),
        ("cap", {0.5}),
        ("extend", {2.0}),
        ("cap_extend", {0.5, 2.0}),
    ],
)
def test_each_decoder_forces_only_its_side(tmp_path, monkeypatch, embedded_tokenizer, mode, forced):
    _, _, result, records = decoded_run(tmp_path, monkeypatch, embedded_tokenizer, decode_budget=mode)
    decoded = [r for r in records if r["decoder"] != "model" and r["control_multiplier"] is not None]
    # q5 stated 3 tokens for a longer solution: its user budgets are all far below what it writes.
    assert {r["control_multiplier"] for r in decoded if r["forced"] and r["id"] != "q5"} == forced
    assert all(r["forced"] == ("cap" in mode) for r in decoded if r["id"] == "q5")
    assert all(r["decoder"] == mode for r in decoded)
    assert list(result["decoders"]) == ([] if mode == "none" else [mode])


def test_extensions_repeat_up_to_max_extensions(tmp_path, monkeypatch, embedded_tokenizer):
    questions = [{**q, "solution": worked(i)} for i, q in enumerate(QUESTIONS, 1)]
    cfg = cfg_for(tmp_path, write_dataset(tmp_path / "bench.jsonl", questions), control_limit=1,
                  control_multipliers=[3.0], decode_budget="extend", max_extensions=2)
    scripted = ScriptedDecoder(embedded_tokenizer, cfg, extension_closes_short=True)
    monkeypatch.setattr(ev, "_generate", scripted)
    evaluate(object(), cfg, tokenizer=embedded_tokenizer)
    [record] = [r for r in items(cfg.out) if r["decoder"] == "extend" and r["control_multiplier"] == 3.0]
    assert record["response"].count(cfg.extend_prompt) == 2 and record["correct"]
    assert [c["desc"] for c in scripted.calls].count(f"control extend {cfg.dataset} extend") == 2


def test_base_models_get_no_decoder(tmp_path, scripted, embedded_tokenizer):
    cfg = cfg_for(tmp_path, write_dataset(tmp_path / "bench.jsonl"), budgeted=False, decode_budget="cap")
    evaluate(object(), cfg, tokenizer=embedded_tokenizer)
    assert {r["decoder"] for r in items(cfg.out)} == {"model"}  # no budget is known


@pytest.mark.parametrize(
    "prefill, text, expected",
    [
        # (head, solution, closed, budget, after) or None
        ("", "<budget>12</budget><solution>1) 2+3=5</solution>", ("<budget>12</budget><solution>", "1) 2+3=5",
                                                                 True, 12, "")),
        ("", "<budget>12</budget> <solution>abc</solution>\n", ("<budget>12</budget> <solution>", "abc", True, 12,
                                                                 "\n")),
        ("<budget>40</budget><solution>", "abc", ("", "abc", False, 40, "")),  # ran out of tokens
        ("<budget>40</budget><solution>", "abc</solu", ("", "abc", False, 40, "")),  # a half-written closing tag
        ("", "no budget at all", None),
        ("", "<budget>0</budget><solution>abc</solution>", None),
        ("", "<budget>12</budget>abc", None),
        ("<budget>40</budget><solution>", "abc</solution> and more", None),
        ("<budget>40</budget><solution>", "abc<budget>3</budget>", None),
    ],
)
def test_draft(prefill, text, expected):
    d = ev.draft("PROMPT" + prefill, prefill, text, "stop", max_budget=1000)
    if expected is None:
        assert d is None
        return
    assert (d.head, d.solution, d.closed, d.budget, d.after) == expected
    assert d.context == "PROMPT" + prefill + d.head + d.solution
    assert d.response == prefill + text.replace("</solu", "") if not d.closed else d.response == prefill + text


@pytest.mark.parametrize(
    "text, prompt, expected",
    [
        ("7}.</solution>", "\nSo the answer is \\boxed{", "7}"),
        ("\\frac{1}{2}} and on", "\\boxed{", "\\frac{1}{2}}"),  # nested braces
        ("7</solution>", "\\boxed{", "7"),  # closed the solution without closing the brace
        ("7 7 7", "\\boxed{", "7 7 7"),  # ran out of tokens
        ("42\nmore", "\nAnswer: ", "42\nmore"),  # no brace to close: up to the closing tag or the end
    ],
)
def test_forced_answer(text, prompt, expected):
    assert ev.forced_answer(text, prompt) == expected


@pytest.mark.parametrize(
    "solution, expected",
    [
        ("1) 2+3=5\nSo the answer is \\boxed{5}.", "1) 2+3=5"),
        ("1) 2+3=5\nSo the answer is \\boxed{5}.\n\n", "1) 2+3=5"),
        ("\\boxed{5}", ""),
    ],
)
def test_without_answer_line(solution, expected):
    assert ev.without_answer_line(solution) == expected


@pytest.mark.parametrize("budget, slack, limit", [(100, 0.2, 120), (10, 0.0, 10), (1, 0.2, 1), (7, 0.5, 10)])
def test_cap_tokens(budget, slack, limit):
    assert ev.cap_tokens(budget, slack) == limit


def test_truncate_tokens_cuts_in_the_one_length(embedded_tokenizer):
    text = worked(4)
    for n in (1, 5, 9):
        cut = ev.truncate_tokens(embedded_tokenizer, text, n)
        assert text.startswith(cut) and token_length(embedded_tokenizer, cut) == n
    assert ev.truncate_tokens(embedded_tokenizer, text, 10_000) == text


def test_decoders_on_the_embedded_model(embedded_tokenizer):
    """The real sampler on the tiny embedded base model: the cap answers every over-long solution within its
    limit plus the forced answer, and an extension continues a closed solution after the extension text."""
    from selfbudgeter.embedded import task
    from selfbudgeter.data import prompt_text
    from selfbudgeter.core.models import load_model

    model, tokenizer = load_model("embedded", device="cpu", dtype="float32")
    rows = task.load_split("validation")[:3]
    cfg = EvalConfig(decode_budget="cap", max_new_tokens=24, answer_cap=6, batch_size=8)
    budgets = (2, 3, 5)
    prompts = [prompt_text(tokenizer, row.question, budget=b, system_prompt=None) for row, b in zip(rows, budgets)]
    firsts = ev._generate(model, tokenizer, prompts, cfg, 1, "first pass", temperature=0.0)
    drafts = [ev.draft(prompt, render_prefill(b), s.text, s.finish_reason, cfg.max_budget)
              for prompt, b, (s,) in zip(prompts, budgets, firsts)]
    drafts = [d for d in drafts if d is not None]
    assert drafts  # a prefilled budget tag is always a budget and an open solution
    firsts = [d.solution for d in drafts]
    assert ev.decode_budget(model, tokenizer, drafts, cfg, temperature=0.0, desc="cap") > 0
    for d, first in zip(drafts, firsts):
        limit = ev.cap_tokens(d.budget, cfg.budget_slack)
        assert d.forced and d.closed
        assert d.solution.startswith(ev.truncate_tokens(tokenizer, first, limit) + cfg.answer_prompt)
        assert token_length(tokenizer, d.solution) <= limit + token_length(tokenizer, cfg.answer_prompt) + 6 + 1
        assert d.response.endswith("</solution>")

    row = rows[0]
    prompt = prompt_text(tokenizer, row.question, system_prompt=None)
    closed = ev.Draft(prompt, "", "", row.solution, True, 400, "stop")
    cfg = EvalConfig(decode_budget="extend", max_new_tokens=12, batch_size=8)
    assert ev.decode_budget(model, tokenizer, [closed], cfg, temperature=0.0, desc="extend") > 0
    assert closed.forced and closed.solution.startswith(ev.without_answer_line(row.solution) + cfg.extend_prompt)
    assert token_length(tokenizer, closed.solution) > token_length(
        tokenizer, ev.without_answer_line(row.solution) + cfg.extend_prompt)


def test_new_config_defaults():
    cfg = EvalConfig()
    assert cfg.control_multipliers == [0.5, 0.75, 1.0, 1.5, 2.0]
    assert (cfg.control_temperature, cfg.decode_budget, cfg.budget_slack, cfg.max_extensions) == (0.0, "none", 0.2, 1)
    assert cfg.answer_prompt == "\nSo the answer is \\boxed{" and cfg.extend_prompt == "\nWait, let me check."


@pytest.mark.parametrize(
    "overrides, message",
    [({"decode_budget": "trim"}, "decode_budget"), ({"budget_slack": 1.0}, "budget_slack"),
     ({"budget_slack": -0.1}, "budget_slack"), ({"max_extensions": -1}, "max_extensions"),
     ({"control_temperature": -1.0}, "control_temperature"), ({"answer_cap": 0}, "answer_cap")],
)
def test_bad_decoder_values(overrides, message):
    with pytest.raises(UserError, match=message):
        EvalConfig(**overrides)


def test_every_eval_recipe_loads_with_the_new_keys():
    from selfbudgeter.core.config import parse_config

    for recipe in ("embedded/eval", "deepseek-r1-distill-qwen-1.5b/eval", "deepseek-r1-distill-qwen-7b/eval"):
        (cfg,) = parse_config((EvalConfig,), ["--config", recipe], "eval", "")
        assert cfg.control_multipliers == [0.5, 0.75, 1.0, 1.5, 2.0], recipe
        assert cfg.decode_budget == "none" and cfg.control_temperature == 0.0, recipe
