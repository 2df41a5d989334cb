"""Stage 1a: correct responses only, deduplicated, capped, budget = token length of the solution.

Run: `.venv/bin/python -m pytest -q tests/test_sft_data.py` (the embedded tokenizer only; seconds).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from selfbudgeter.core.errors import UserError
from selfbudgeter.core.format import token_length
from selfbudgeter.training.rewards import score_response
from selfbudgeter.training.sft_data import SFTDataConfig, build, build_sft_rows


def s(qid, index, response, correct, finish="stop"):
    return {"id": qid, "sample": index, "response": response, "correct": correct, "finish_reason": finish}


R1 = "1) 7-4=3\nSo the answer is \\boxed{3}."
R2 = "1) 7-4=3\nWait, let me double-check.\nSo the answer is \\boxed{3}."
R3 = "1) 7-4=3\nThat seems right.\nSo the answer is \\boxed{3}."
QUESTIONS = [
    {"id": "a", "question": "Start with 7 beads. 1) subtract 4. How many beads now?", "answer": "3", "difficulty": 1},
    {"id": "b", "question": "Start with 2 cups. 1) add 5. How many cups now?", "answer": "7", "difficulty": 1},
    {"id": "c", "question": "Start with 5 pens. 1) add 1. How many pens now?", "answer": "6", "difficulty": 1},
]
SAMPLES = [
    s("a", 0, "  " + R1 + "\n", True),  # whitespace around: stripped, so equal to sample 1
    s("a", 1, R1, True),
    s("a", 2, R2, True),
    s("a", 3, R3, True),
    s("b", 0, "So the answer is \\boxed{8}.", False),
    s("b", 1, "1) 2+5=7\nSo the answer is \\boxed{7}.", True),
    s("b", 2, "1) 2+5=7\nHmm, is that", True, finish="length"),
    s("c", 0, "wrong", False),
]


def rows_for(tokenizer, **kwargs):
    dropped = Counter()
    return build_sft_rows(SAMPLES, QUESTIONS, tokenizer, dropped=dropped, **kwargs), dropped


def test_only_correct_deduplicated_and_capped(embedded_tokenizer):
    rows, dropped = rows_for(embedded_tokenizer, max_per_question=2)
    by_id = Counter(r["id"] for r in rows)
    assert by_id == {"a": 2, "b": 1}  # a: 3 distinct correct, capped at 2; b: 1 finished correct; c: none
    assert dropped == {"wrong": 2, "duplicate": 1, "over_cap": 1, "truncated": 1}
    solutions = [r["completion"] for r in rows if r["id"] == "a"]
    assert len(set(solutions)) == 2
    assert all(x.split("<solution>")[1][: -len("</solution>")] in (R1, R2, R3) for x in solutions)


def test_budget_is_the_token_length_and_scores_back_exactly(embedded_tokenizer):
    rows, _ = rows_for(embedded_tokenizer, max_per_question=3)
    golds = {q["id"]: q["answer"] for q in QUESTIONS}
    for row in rows:
        scored = score_response(embedded_tokenizer, row["completion"], golds[row["id"]])
        assert scored.format_ok and scored.correct
        assert scored.budget == row["budget"] == scored.length
        solution = row["completion"].split("<solution>", 1)[1].rsplit("</solution>", 1)[0]
        assert row["budget"] == token_length(embedded_tokenizer, solution)
        assert solution == solution.strip()


def test_rows_carry_prompt_and_difficulty(embedded_tokenizer):
    from selfbudgeter.data import prompt_text

    rows, _ = rows_for(embedded_tokenizer, system_prompt=None)
    row = next(r for r in rows if r["id"] == "b")
    assert row["prompt"] == prompt_text(embedded_tokenizer, QUESTIONS[1]["question"], system_prompt=None)
    assert set(row) == {"prompt", "completion", "id", "budget", "difficulty"} and row["difficulty"] == 1


def test_choice_is_seeded_per_question(embedded_tokenizer):
    picks = {}
    for seed in range(8):
        rows = build_sft_rows(SAMPLES, QUESTIONS, embedded_tokenizer, max_per_question=1, seed=seed)
        again = build_sft_rows(SAMPLES, QUESTIONS[::-1], embedded_tokenizer, max_per_question=1, seed=seed)
        a = [r["completion"] for r in rows if r["id"] == "a"]
        assert a == [r["completion"] for r in again if r["id"] == "a"]  # question order does not matter
        picks[seed] = a[0]
    assert len(set(picks.values())) > 1  # and the seed does


def test_truncated_kept_on_request(embedded_tokenizer):
    # A correct response cut at the cap still has its boxed answer; kept only when asked.
    rows, dropped = rows_for(embedded_tokenizer, drop_truncated=False, max_per_question=5)
    assert Counter(r["id"] for r in rows)["b"] == 2 and "truncated" not in dropped


def test_response_that_breaks_the_format_is_dropped(embedded_tokenizer):
    samples = [s("a", 0, "3 </solution> \\boxed{3}", True)]
    dropped = Counter()
    assert build_sft_rows(samples, QUESTIONS[:1], embedded_tokenizer, dropped=dropped) == []
    assert dropped == {"bad_format": 1}


def test_max_rows_caps_the_total(embedded_tokenizer):
    rows, dropped = rows_for(embedded_tokenizer, max_per_question=5, max_rows=2)
    assert len(rows) == 2 and dropped["max_rows"] == 2


def write_profile(folder, samples, questions):
    folder.mkdir()
    (folder / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in samples))
    (folder / "questions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in questions))


def test_build_writes_train_and_stats(tmp_path, embedded_tokenizer):
    write_profile(tmp_path / "profile", SAMPLES, QUESTIONS)
    cfg = SFTDataConfig(profile=str(tmp_path / "profile"), out=str(tmp_path / "sft"), system_prompt=None,
                        max_per_question=2)
    stats = build(cfg, tokenizer=embedded_tokenizer)
    rows = [json.loads(x) for x in (tmp_path / "sft" / "train.jsonl").read_text().splitlines()]
    on_disk = json.loads((tmp_path / "sft" / "stats.json").read_text())
    assert stats == on_disk
    assert on_disk["rows"] == len(rows) == 3 and on_disk["questions_covered"] == 2
    assert on_disk["questions_profiled"] == 3
    budgets = sorted(r["budget"] for r in rows)
    b = on_disk["budget"]
    assert (b["min"], b["max"], b["mean"]) == (budgets[0], budgets[-1], pytest.approx(sum(budgets) / 3))
    assert b["min"] <= b["q1"] <= b["median"] <= b["q3"] <= b["max"]


@pytest.mark.parametrize(
    "samples, message",
    [
        (None, "not exist"),  # no profile at all
        ([{"id": "a", "sample": 0}], "lacks response"),
        ([s("c", 0, "wrong", False)], "no usable correct response"),
    ],
)
def test_bad_profiles_are_user_errors(tmp_path, embedded_tokenizer, samples, message):
    if samples is not None:
        write_profile(tmp_path / "profile", samples, QUESTIONS)
    cfg = SFTDataConfig(profile=str(tmp_path / "profile"), out=str(tmp_path / "sft"))
    with pytest.raises(UserError, match=message):
        build(cfg, tokenizer=embedded_tokenizer)
