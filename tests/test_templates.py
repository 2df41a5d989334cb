"""A real reasoning model's chat template: where the budget goes, and that every stage writes the same string.

DeepSeek-R1's template (and its distilled models') ends the generation prompt with `<think>\\n`, so whatever
the model writes first lies inside the think block. The decision (docs/scale.md, "Chat templates that open a
think block"): the budget tag follows the generation prompt, inside the think block, and the response is the
budget format alone, `<budget>N</budget><solution>...</solution>`, ending the turn at `</solution>`; the
think block is never closed. The template below is hand-written in R1's shape (BOS, the system prompt before
the first user turn, `<｜User｜>`, `<｜Assistant｜>`, a tokenizer that adds its own BOS) on the embedded
tokenizer, so nothing is downloaded.

Run: .venv/bin/python -m pytest tests/test_templates.py
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from selfbudgeter.training import grpo
from selfbudgeter.embedded import task
from selfbudgeter.data import SYSTEM_PROMPT, prompt_text
from selfbudgeter.evaluation.evaluate import score_record
from selfbudgeter.core.format import (
    SOLUTION_CLOSE,
    FormatError,
    render_prefill,
    render_response,
    token_length,
    try_parse,
)
from selfbudgeter.training.profile import sample_rows
from selfbudgeter.training.rewards import SelfBudgeterScorer
from selfbudgeter.training.sft import strip_template_bos
from selfbudgeter.training.sft_data import build_sft_rows

BOS, USER, ASSISTANT, EOS = "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"
GENERATION_PROMPT = f"{ASSISTANT}<think>\n"
# R1's template, trimmed to what a single question uses: the system prompt follows BOS, an assistant turn in
# the history loses its reasoning (the text up to `</think>`), and the generation prompt opens a think block.
R1_TEMPLATE = (
    "{{ bos_token }}{%- set ns = namespace(system='') -%}"
    "{%- for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% endif %}"
    "{% endfor -%}{{ ns.system }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + m['content'].split('</think>')[-1] + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def r1():
    """The embedded tokenizer dressed as an R1 tokenizer: its markers, its template, a BOS it adds itself."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from selfbudgeter.embedded.model import BASE_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL_DIR)
    tokenizer.add_special_tokens({"bos_token": BOS, "additional_special_tokens": [USER, ASSISTANT, EOS]})
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.bos_token_id)]
    )
    tokenizer.chat_template = R1_TEMPLATE
    return tokenizer


ROW = task.load_split("test")[5]
SOLUTION = task.minimal_solution(task.parse_question(ROW.question))


def test_the_generation_prompt_opens_a_think_block(r1):
    assert prompt_text(r1, ROW.question, system_prompt=None) == f"{BOS}{USER}{ROW.question}{GENERATION_PROMPT}"
    assert prompt_text(r1, ROW.question) == f"{BOS}{SYSTEM_PROMPT}{USER}{ROW.question}{GENERATION_PROMPT}"
    assert r1(ROW.question)["input_ids"][0] == r1.bos_token_id  # the tokenizer adds a BOS of its own


@pytest.mark.parametrize("system_prompt", [None, SYSTEM_PROMPT])
def test_the_budget_follows_the_generation_prompt_inside_the_think_block(r1, system_prompt):
    plain = prompt_text(r1, ROW.question, system_prompt=system_prompt)
    prefilled = prompt_text(r1, ROW.question, budget=40, system_prompt=system_prompt)
    assert prefilled == plain + "<budget>40</budget><solution>"
    assert prefilled.endswith(f"{GENERATION_PROMPT}{render_prefill(40)}")


def test_the_response_is_what_follows_the_generation_prompt(r1):
    response = render_response(30, SOLUTION)
    parsed = try_parse(response)
    assert parsed.budget == 30 and parsed.solution == SOLUTION
    # The prompt, `<think>\n` included, is never part of the response: parsed with it, the budget is late.
    assert try_parse(prompt_text(r1, ROW.question, system_prompt=None) + response).reason == "late_budget"
    # A prefilled budget and the model's continuation parse as the same response (eval and the reward do this).
    assert try_parse(render_prefill(30) + SOLUTION + SOLUTION_CLOSE) == parsed
    # The turn ends at </solution>: a model that goes on to close the think block breaks the format.
    closed = try_parse(response + "\n</think>\n\nThe answer is 5.")
    assert isinstance(closed, FormatError) and closed.reason == "text_after_solution"


def test_sft_rows_are_the_prefilled_prompt_and_its_continuation(r1):
    response = f"\n{SOLUTION}\n"  # as the base model wrote it, surrounding whitespace included
    samples = [{"id": ROW.id, "sample": 0, "response": response, "correct": True, "finish_reason": "stop"}]
    questions = [{"id": ROW.id, "question": ROW.question, "difficulty": ROW.difficulty}]
    (row,) = build_sft_rows(samples, questions, r1, system_prompt=None)
    assert row["prompt"] == prompt_text(r1, ROW.question, system_prompt=None)
    assert row["prompt"] + row["completion"] == (
        prompt_text(r1, ROW.question, budget=row["budget"], system_prompt=None) + SOLUTION + SOLUTION_CLOSE
    )
    # One length: the label is the profile's length of the response, and what eval and the reward measure.
    (profiled,) = sample_rows(r1, [ROW], [[SimpleNamespace(text=response, finish_reason="stop")]])
    scored = score_record(r1, ROW, row["completion"], sample=0, budgeted=True, max_budget=1000)
    assert row["budget"] == profiled["n_tokens"] == scored["length"] == token_length(r1, SOLUTION)
    assert scored["correct"]
    # SFT tokenises the prompt and prompt + completion (the tokenizer adding its BOS, so the template's goes):
    # one BOS, and the prompt's tokens a prefix of the whole, so the loss starts exactly at the budget tag.
    prompt = strip_template_bos(r1, row["prompt"])
    prompt_ids, ids = r1(prompt)["input_ids"], r1(prompt + row["completion"])["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids and ids.count(r1.bos_token_id) == 1
    assert r1.decode(ids[len(prompt_ids):]) == row["completion"]


def test_grpo_prompts_are_the_same_strings_and_the_reward_reads_them_back(r1):
    questions = task.load_split("test")[:8]
    stage = grpo.GRPOStageArgs(model="unused", system_prompt=None, prefill_fraction=0.5)
    rows = grpo.build_rows(questions, r1, stage, {q.id: 30.0 for q in questions}, seed=0)
    assert {r["prefill_budget"] is None for r in rows} == {True, False}
    for question, row in zip(questions, rows):
        budget = row["prefill_budget"]
        assert row["prompt"] == strip_template_bos(r1, prompt_text(r1, question.question, budget=budget,
                                                                   system_prompt=None))
        assert row["prompt"].endswith(GENERATION_PROMPT + ("" if budget is None else render_prefill(budget)))
    # Without a user budget the prompt is the one SFT trains on (both stages leave the BOS to the tokenizer).
    plain = next(r for r in rows if r["prefill_budget"] is None)
    question = {q.id: q for q in questions}[plain["id"]]
    response = task.minimal_solution(task.parse_question(question.question))
    sample = {"id": question.id, "sample": 0, "response": response, "correct": True, "finish_reason": "stop"}
    (sft_row,) = build_sft_rows([sample], [{"id": question.id, "question": question.question}], r1,
                                system_prompt=None)
    assert plain["prompt"] == strip_template_bos(r1, sft_row["prompt"])
    # The completion under a user budget continues the solution; the reward re-attaches the budget to parse it.
    prefilled = next(r for r in rows if r["prefill_budget"] is not None)
    solution = task.minimal_solution(task.parse_question({q.id: q for q in questions}[prefilled["id"]].question))
    (scored,) = SelfBudgeterScorer(r1).batch([solution + SOLUTION_CLOSE], answer=[prefilled["answer"]],
                                             prefill_budget=[prefilled["prefill_budget"]])
    assert scored.format_ok and scored.correct and scored.budget == prefilled["prefill_budget"]
    assert scored.length == token_length(r1, solution)
