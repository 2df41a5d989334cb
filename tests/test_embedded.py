"""The embedded tokenizer and the shipped base model."""

import random

import pytest

from selfbudgeter.embedded import model as embedded, task
from selfbudgeter.core.format import TAGS, parse_response, render_prefill, render_response


@pytest.mark.parametrize(
    "text",
    [
        render_response(1, "x"),
        render_response(131072, "1) 3+4=7\nSo the answer is \\boxed{7}."),
        render_prefill(57),
        *TAGS,
        "<budget>abc</budget><solution>", "<budget>-5</budget>", "<budget>1000000000000</budget>",
        "</solution> trailing", "٣ unicode digit, émoji 🙂 and tabs\t",
    ],
)
def test_tokenizer_round_trips_budget_format_strings(embedded_tokenizer, text):
    ids = embedded_tokenizer.encode(text, add_special_tokens=False)
    assert embedded_tokenizer.decode(ids) == text
    # TRL decodes completions with skip_special_tokens=True: the tags must survive it
    assert embedded_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_digits_are_single_tokens(embedded_tokenizer):
    tokens = embedded_tokenizer.convert_ids_to_tokens(embedded_tokenizer.encode("1234567890", add_special_tokens=False))
    assert tokens == list("1234567890")


def test_tags_are_not_special_tokens(embedded_tokenizer):
    assert not set(TAGS) & set(embedded_tokenizer.all_special_tokens)


def test_shipped_base_model_answers_in_its_format():
    import torch

    from selfbudgeter.data import prompt_text

    from selfbudgeter.core.models import load_model

    model, tokenizer = load_model("embedded", device="cpu")
    row = task.load_split("test")[0]
    ids = tokenizer(prompt_text(tokenizer, row.question, system_prompt=None), return_tensors="pt",
                    add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=320, do_sample=False)
    text = tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert text.startswith("1) ")  # step-by-step reasoning, R1-style, without a budget
    assert "\\boxed{" in text
    essential, filler = task.split_filler(text)
    assert filler  # and it overthinks


def test_prefill_continues_a_budgeted_response(embedded_tokenizer):
    from selfbudgeter.data import prompt_text

    prompt = prompt_text(embedded_tokenizer, task.load_split("test")[3].question, budget=40, system_prompt=None)
    assert prompt.endswith(render_prefill(40))
    assert parse_response(prompt.split("<|assistant|>")[1] + "x</solution>").budget == 40
