"""Report tests: synthetic evaluation folders in tmp_path in, metrics.json, report.md and PNGs out.

Run: .venv/bin/python -m pytest -q tests/test_report.py
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from selfbudgeter.evaluation import report
from selfbudgeter.core.errors import UserError
from selfbudgeter.evaluation.report import PLOTS, build_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MULTIPLIERS = (0.5, 1.0, 2.0)


def synthetic_records(kind: str, n: int = 60, seed: int = 0) -> list[dict]:
    """Records shaped like the evaluator's: `kind` is "plain" (no budgets) or "budgeted" (with control runs)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        difficulty = int(i % 5) + 1
        need = 60 * difficulty
        base = {"id": f"q{i}", "difficulty": difficulty, "gold": "1", "sample": 0, "prefill_budget": None,
                "control_multiplier": None, "grading_error": None}
        if kind == "plain":
            length = int(need * 4 * rng.uniform(0.6, 1.6))
            records.append({**base, "response": "...", "budget": None, "length": length, "format_ok": False,
                            "format_error": "missing_budget", "correct": bool(rng.random() < 0.6),
                            "predicted": "1"})
            continue
        budget = int(need * rng.uniform(0.8, 1.3))
        broken = i % 20 == 19
        records.append({**base, "response": "<budget>...", "budget": None if broken else budget,
                        "length": int(budget * rng.uniform(0.8, 1.2)), "format_ok": not broken,
                        "format_error": "unclosed_solution" if broken else None,
                        "correct": bool(rng.random() < 0.7), "predicted": "1"})
        for multiplier in MULTIPLIERS:
            prefill = max(1, int(budget * multiplier))
            records.append({**base, "response": "...", "prefill_budget": prefill, "control_multiplier": multiplier,
                            "budget": prefill, "length": int(prefill * rng.uniform(0.85, 1.15)),
                            "format_ok": True, "format_error": None, "correct": bool(rng.random() < 0.65),
                            "predicted": "1"})
    return records


def write_run(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "metrics.json").write_text(json.dumps({"model": folder.name, "seconds": 1.5}))
    return folder


def capped(records: list[dict], slack: float = 0.2) -> list[dict]:
    """What a cap decoder makes of budgeted records: lengths cut at int(budget * (1 + slack)), those forced."""
    out = []
    for r in records:
        if r["budget"] is None:
            out.append({**r, "decoder": "cap", "forced": False})
            continue
        limit = int(r["budget"] * (1 + slack))
        out.append({**r, "decoder": "cap", "forced": r["length"] > limit, "length": min(r["length"], limit)})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    budgeted = synthetic_records("budgeted", seed=2)
    return {
        "base": write_run(root / "base", synthetic_records("plain", seed=1)),
        "selfbudgeter": write_run(root / "selfbudgeter", budgeted + capped(budgeted, slack=0.1)),
        "grpo_accuracy": write_run(root / "grpo_accuracy", synthetic_records("plain", seed=3)),
    }


@pytest.fixture(scope="module")
def built(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return out, build_report(runs, out, baseline="base")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_metrics_json_has_one_entry_per_run(built, runs):
    out, summaries = built
    written = json.loads((out / "metrics.json").read_text())
    assert written == summaries
    assert list(written) == list(runs)
    for name, summary in written.items():
        for key in ("accuracy", "mean_tokens", "compression", "within_20", "length_budget_slope",
                    "spearman_budget_difficulty", "control_slope", "format_failure_rate", "n"):
            assert key in summary, (name, key)
        assert summary["evaluator"]["model"] == name
    assert written["base"]["compression"] == 0.0
    assert written["selfbudgeter"]["compression"] > 0.5  # budgeted lengths are about a quarter of the base's
    assert written["base"]["within_20"] is None
    assert written["selfbudgeter"]["control_slope"] == pytest.approx(1.0, abs=0.1)
    assert [row["multiplier"] for row in written["selfbudgeter"]["control"]] == list(MULTIPLIERS)


def test_every_plot_is_a_readable_png(built):
    out, _ = built
    for name in PLOTS.values():
        width, height = png_size(out / name)
        assert width >= 400 and height >= 300, name


def test_report_md_has_the_table_and_embeds_every_plot(built):
    out, _ = built
    text = (out / "report.md").read_text()
    columns = ["model", "accuracy", "mean tokens", "compression", "within ±20%", "slope", "Spearman", "control slope",
               "format failures"]
    assert "| " + " | ".join(columns) + " |" in text
    for name in ("base", "selfbudgeter", "grpo_accuracy"):
        assert f"| {name} |" in text
    for name in PLOTS.values():
        assert f"]({name})" in text
    assert "## User-budget control" in text
    assert "| selfbudgeter · cap |" in text  # the decoder's row in the results table
    assert text.count("| selfbudgeter · cap | 0.5x |") == 1  # and in the per-multiplier control table
    assert "accuracy (hardest third)" in text and "within ±20% (reachable)" in text


def test_decoder_records_stay_out_of_the_model_alone_numbers(built, runs, tmp_path):
    _, summaries = built
    alone = [r for r in report.load_records(runs["selfbudgeter"]) if r.get("decoder") is None]
    only = build_report({"selfbudgeter": write_run(tmp_path / "alone", alone)}, tmp_path / "out")["selfbudgeter"]
    for key in ("n", "accuracy", "mean_tokens", "within_20", "control_slope", "control_within_20", "control"):
        assert summaries["selfbudgeter"][key] == only[key], key
    cap = summaries["selfbudgeter"]["decoders"]["cap"]
    # Lengths reach 1.2x (main) and 1.15x (control) of their budgets: those over 1.1x are cut.
    assert cap["n"] == only["n"] and 0 < cap["forced_rate"] < 1 and cap["mean_tokens"] < only["mean_tokens"]
    assert all(0 < row["forced_rate"] < 1 for row in cap["control"])
    assert all(row["forced_rate"] == 0 for row in only["control"])
    assert [row["multiplier"] for row in cap["control_accuracy"]] == list(MULTIPLIERS)
    rows = report.table_rows(summaries)
    assert [row[0] for row in rows[1:]] == ["base", "selfbudgeter", "selfbudgeter · cap", "grpo_accuracy"]
    assert list(report.control_tables(summaries)) == [("selfbudgeter", "model"), ("selfbudgeter", "cap")]


def test_report_records_the_environment_that_made_it(built):
    import torch
    import transformers

    out, _ = built
    env = json.loads((out / "environment.json").read_text())
    assert env["packages"]["torch"] == torch.__version__
    assert env["packages"]["transformers"] == transformers.__version__
    assert env["cpus"] >= 1
    last = (out / "report.md").read_text().strip().splitlines()[-1]
    assert last.startswith("Made with Python ") and f"torch {torch.__version__}" in last


def test_plots_without_data_are_skipped(tmp_path):
    run = write_run(tmp_path / "base", synthetic_records("plain"))
    build_report({"base": run}, tmp_path / "out", baseline=None)
    drawn = {p.name for p in (tmp_path / "out").glob("*.png")}
    assert drawn == {PLOTS["lengths"], PLOTS["accuracy_vs_length"]}
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Not drawn for lack of data" in text
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["base"]["compression"] is None


def test_many_difficulty_values_are_binned(tmp_path):
    records = synthetic_records("budgeted")
    for i, r in enumerate(records):
        r["difficulty"] = i * 0.37
    run = write_run(tmp_path / "sb", records)
    build_report({"sb": run}, tmp_path / "out")
    assert f"({PLOTS['budget_by_difficulty']})" in (tmp_path / "out" / "report.md").read_text()
    values = [r["difficulty"] for r in records]
    groups, labels, group_of = report._difficulty_groups(values)
    assert len(groups) == report.DIFFICULTY_BINS == len(labels)
    # Quantile bins: every value lands in one, and the bins hold equal shares (to one record).
    sizes = Counter(group_of(v) for v in values)
    assert sorted(sizes) == groups and max(sizes.values()) - min(sizes.values()) <= 1


def test_main_writes_the_report(runs, tmp_path, capsys):
    argv = [arg for name, path in runs.items() for arg in ("--run", f"{name}={path}")]
    assert report.main(argv + ["--baseline", "base", "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").is_file()
    assert "selfbudgeter" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--run", "a={base}", "--baseline", "nope"], "baseline"),
        (["--run", "a={base}", "--run", "a={base}"], "twice"),
        (["--run", "a={missing}"], "not a folder"),
        (["--run", "a={empty}"], "items.jsonl"),
        (["--run", "a={bad}"], r"items\.jsonl:2: invalid JSON"),
    ],
)
def test_bad_input_is_a_user_error(runs, tmp_path, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "items.jsonl").write_text('{"length": 1}\n{oops\n')
    paths = {"base": runs["base"], **{name: tmp_path / name for name in ("missing", "empty", "bad")}}
    argv = [a.format(**paths) for a in argv] + ["--out", str(tmp_path / "out")]
    with pytest.raises(UserError, match=message):
        report.main(argv)


def test_malformed_run_spec_is_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        report.make_parser().parse_args(["--run", "no-equals-sign", "--out", "x"])


def test_tiny_runs_still_draw(tmp_path):
    one = synthetic_records("budgeted", n=1)  # one main record and one per multiplier
    same = synthetic_records("plain", n=3)
    for r in same:
        r["length"] = 100  # a violin of identical values
    runs = {"one": write_run(tmp_path / "one", one), "same": write_run(tmp_path / "same", same)}
    summaries = build_report(runs, tmp_path / "out", baseline="same")
    assert summaries["one"]["length_budget_slope"] is None  # a single budget has no fit
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Not drawn" not in text
    for name in PLOTS.values():
        png_size(tmp_path / "out" / name)  # a PNG, or the assertion inside fails
        assert f"({name})" in text, name


def test_one_table_builder_serves_the_report_eval_and_the_profile(capsys):
    from selfbudgeter.core import metrics
    from selfbudgeter.evaluation.evaluate import print_results
    from selfbudgeter.training.profile import print_summary

    summaries = {"base": metrics.summarize(synthetic_records("plain")),
                 "selfbudgeter": metrics.summarize(synthetic_records("budgeted"))}
    rows = report.table_rows(summaries)
    assert rows[1][-2] == "no budgets" and report.never_budgets(summaries["base"])
    assert not report.never_budgets(summaries["selfbudgeter"])
    assert report.markdown_table(rows)[2] == "| " + " | ".join(rows[1]) + " |"
    report.print_table(rows, "a title", "a note")
    printed = capsys.readouterr().out
    assert all(cell in printed for row in rows for cell in row) and "a title" in printed and "a note" in printed

    print_results({**summaries["selfbudgeter"], "dataset": "embedded", "model": "m"}, "runs/eval")
    printed = capsys.readouterr().out
    assert all(cell in printed for cell in ["dataset", *rows[2][1:]]) and "written to runs/eval/" in printed

    block = {"questions": 2, "accuracy": 0.5, "solved": 1.0, "mean_tokens": 40.0, "median_b_max": 30.0,
             "truncated": 0.0}
    print_summary({**block, "by_difficulty": {"1": block}, "model": "m", "dataset": "d"}, "runs/profile")
    printed = capsys.readouterr().out
    assert "profile of m on d" in printed and "50.0%" in printed and "written to runs/profile/" in printed
