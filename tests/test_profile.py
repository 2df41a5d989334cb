"""Stage 0: aggregation and b_max, the resumable sample file, and a profile run killed and resumed.

Run: `.venv/bin/python -m pytest -q tests/test_profile.py` (a tiny random model; ~20 s, most of it the
subprocess that is killed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfbudgeter.training import profile as profile_mod
from selfbudgeter.data import Row
from selfbudgeter.core.errors import UserError
from selfbudgeter.training.profile import ProfileConfig, aggregate, read_finished, summarize


def s(qid, index, n_tokens, correct, difficulty=None, finish="stop"):
    return {"id": qid, "sample": index, "response": "...", "n_tokens": n_tokens, "correct": correct,
            "predicted": None, "grading_error": None, "finish_reason": finish, "difficulty": difficulty}


# --- aggregation ---

SAMPLES = [
    # q1: correct lengths 100, 300, 200 -> median 200 (the wrong 900 does not count)
    s("q1", 0, 100, True, 1), s("q1", 1, 900, False, 1), s("q1", 2, 300, True, 1), s("q1", 3, 200, True, 1),
    # q2: two correct -> median of an even count is the mean of the middle two
    s("q2", 1, 50, True, 2), s("q2", 0, 70, True, 2), s("q2", 2, 400, False, 2, "length"), s("q2", 3, 10, False, 2),
    # q3: none correct -> b_max null (infinity in METHOD.md: hard questions are not constrained)
    s("q3", 0, 500, False, 2), s("q3", 1, 600, False, 2), s("q3", 2, 700, False, 2), s("q3", 3, 800, False, 2),
]


@pytest.mark.parametrize(
    "qid, correct, accuracy, b_max, truncated",
    [
        ("q1", 3, 0.75, 200.0, 0),
        ("q2", 2, 0.5, 60.0, 1),
        ("q3", 0, 0.0, None, 0),
    ],
)
def test_aggregate_counts_and_b_max(qid, correct, accuracy, b_max, truncated):
    (question,) = [q for q in aggregate(SAMPLES) if q["id"] == qid]
    assert (question["samples"], question["correct"], question["accuracy"]) == (4, correct, accuracy)
    assert question["b_max"] == b_max
    assert question["truncated"] == truncated


def test_aggregate_follows_the_rows_order_and_carries_their_text():
    rows = [Row("q3", "Q three?", "3", difficulty=2), Row("q1", "Q one?", "1", difficulty=1),
            Row("q9", "never sampled", "9")]
    questions = aggregate(SAMPLES, rows)
    assert [q["id"] for q in questions] == ["q3", "q1"]  # q2 is not in rows, q9 has no samples
    assert questions[1]["question"] == "Q one?" and questions[1]["answer"] == "1"


def test_summarize_per_difficulty():
    questions = aggregate(SAMPLES)
    summary = summarize(SAMPLES, questions)
    assert summary["accuracy"] == pytest.approx(5 / 12)
    assert summary["solved"] == pytest.approx(2 / 3)
    assert list(summary["by_difficulty"]) == ["1", "2"]
    level2 = summary["by_difficulty"]["2"]
    assert (level2["questions"], level2["samples"], level2["accuracy"]) == (2, 8, 0.25)
    assert level2["median_b_max"] == 60.0
    assert summary["truncated"] == pytest.approx(1 / 12)


# --- the resumable file ---


def test_read_finished_drops_torn_lines_and_half_written_questions(tmp_path):
    path = tmp_path / "samples.jsonl"
    complete = [s("a", k, 10, True) for k in range(2)]
    half = [s("b", 0, 10, True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in complete + half) + '{"id": "b", "sam', encoding="utf-8")
    kept = read_finished(path, k=2)
    assert kept == complete
    assert [json.loads(line) for line in path.read_text().splitlines()] == complete  # rewritten on disk


def test_read_finished_refuses_a_broken_middle_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"id": "a", "sample": 0}\nnot json\n{"id": "a", "sample": 1}\n', encoding="utf-8")
    with pytest.raises(UserError, match="invalid JSON"):
        read_finished(path, k=2)


# --- real runs on the tiny model ---


def tiny_cfg(model_dir: Path, out: Path, **overrides) -> ProfileConfig:
    values = dict(model=str(model_dir), dataset="embedded", split="test", limit=6, samples=2, max_new_tokens=12,
                  batch_size=4, chunk_size=2, system_prompt=None, out=str(out), device="cpu")
    values.update(overrides)
    return ProfileConfig(**values)


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile-full")
    summary = profile_mod.profile(tiny_cfg(tiny_model_dir, out))
    return out, summary


def test_profile_writes_its_files(uninterrupted):
    out, summary = uninterrupted
    samples = rows_of(out)
    assert len(samples) == 12 and {(r["id"], r["sample"]) for r in samples} == {
        (f"embedded-test-{i}", k) for i in range(6) for k in range(2)
    }
    assert set(samples[0]) == {"id", "sample", "response", "n_tokens", "correct", "predicted", "grading_error",
                               "finish_reason", "difficulty"}
    questions = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    assert [q["id"] for q in questions] == [f"embedded-test-{i}" for i in range(6)]
    assert all(q["question"] and q["answer"] and q["samples"] == 2 for q in questions)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["samples"] == summary["samples"] == 12
    assert "by_difficulty" in on_disk and on_disk["config"]["samples"] == 2


def test_interrupted_profile_resumes_to_the_same_rows(tiny_model_dir, tmp_path, uninterrupted, monkeypatch):
    out = tmp_path / "profile"
    real = profile_mod.append_rows
    calls = []

    def crash_after_first_chunk(path, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            # Die in the middle of the second chunk: one row on disk and a torn line after it.
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:25])
            raise KeyboardInterrupt
        real(path, rows)

    monkeypatch.setattr(profile_mod, "append_rows", crash_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        profile_mod.profile(tiny_cfg(tiny_model_dir, out))
    monkeypatch.setattr(profile_mod, "append_rows", real)
    assert not (out / "samples.jsonl").read_text().endswith("\n")  # the torn line is there to be dropped
    profile_mod.profile(tiny_cfg(tiny_model_dir, out, batch_size=3))  # batching does not change samples
    resumed = rows_of(out)
    assert len(resumed) == len({(r["id"], r["sample"]) for r in resumed}) == 12  # no duplicates, none lost
    expected = rows_of(uninterrupted[0])
    key = lambda r: (r["id"], r["sample"])  # noqa: E731
    assert sorted(resumed, key=key) == sorted(expected, key=key)


def test_profile_killed_for_real_then_resumed(tiny_model_dir, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    args = ["--model", str(tiny_model_dir), "--dataset", "embedded", "--split", "test", "--limit", "6",
            "--samples", "2", "--max_new_tokens", "12", "--batch_size", "4", "--chunk_size", "1",
            "--system_prompt", "null", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Each chunk sleeps a little so that the kill lands mid-run however fast the machine is.
    code = (
        "import sys, time; from selfbudgeter.training import profile as p; real = p.append_rows\n"
        "p.append_rows = lambda path, rows: (real(path, rows), time.sleep(0.5))\n"
        "sys.exit(p.main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    samples = out / "samples.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if samples.exists() and samples.read_text().count("\n") >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the profile finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = rows_of(out)
    assert 4 <= len(before) < 12
    assert profile_mod.main(args) == 0
    key = lambda r: (r["id"], r["sample"])  # noqa: E731
    assert sorted(rows_of(out), key=key) == sorted(rows_of(uninterrupted[0]), key=key)


def test_resume_with_other_sampling_settings_is_refused(tiny_model_dir, uninterrupted):
    with pytest.raises(UserError, match="temperature"):
        profile_mod.profile(tiny_cfg(tiny_model_dir, uninterrupted[0], temperature=1.0))


@pytest.mark.parametrize("field, value", [("samples", 0), ("limit", 0), ("chunk_size", 0)])
def test_bad_config_values_are_user_errors(field, value):
    with pytest.raises(UserError, match=field):
        ProfileConfig(**{field: value})
