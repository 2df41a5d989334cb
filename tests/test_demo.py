"""The demo's plan and bookkeeping (the full run is `make demo`; its figures are in the README)."""

import json

import pytest

from selfbudgeter import demo


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
    import selfbudgeter.profile as profile

    monkeypatch.setattr(profile, "main", lambda argv: 3)
    with pytest.raises(RuntimeError, match="exited with 3"):
        demo._stage("profile", [])
