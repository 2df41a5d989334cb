"""Batched sampling: seeded per sample, independent of batching; greedy matches `model.generate`.

Run: `.venv/bin/python -m pytest -q tests/test_generation.py` (a tiny random model, seconds).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from selfbudgeter.core.errors import UserError
from selfbudgeter.evaluation.generation import SeededSampler, generate, row_uniforms, sample_seed, top_p_filter

QUESTIONS = [
    "Start with 3. 1) add 4. What is the final number?",
    "Start with 12. 1) add 7 2) subtract 5 3) add 9. What is the final number?",
    "Start with 40. 1) subtract 2 2) add 1. What is the final number?",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from selfbudgeter.core.models import load_model

    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def prompts(tiny):
    from selfbudgeter.data import prompt_text

    return [prompt_text(tiny[1], q, system_prompt=None) for q in QUESTIONS]


def texts(samples):
    return [[s.text for s in per] for per in samples]


# --- the sampler's arithmetic ---


@pytest.mark.parametrize(
    "logits, top_p, kept",
    [
        ([2.0, 1.0, 0.0, -1.0], 1.0, [True, True, True, True]),
        ([2.0, 1.0, 0.0, -1.0], 0.5, [True, False, False, False]),  # the top token alone has 0.64
        ([2.0, 1.0, 0.0, -1.0], 0.7, [True, True, False, False]),
        ([0.0, 5.0, 1.0], 0.01, [False, True, False]),  # at least one token survives
    ],
)
def test_top_p_filter(logits, top_p, kept):
    out = top_p_filter(torch.tensor([logits]), top_p)
    assert (out[0] > float("-inf")).tolist() == kept


def test_row_uniforms_are_in_the_open_unit_interval_and_depend_on_seed_and_step():
    seeds = torch.arange(5000, dtype=torch.int64)
    u0, u1 = row_uniforms(seeds, 0), row_uniforms(seeds, 1)
    assert 0 < u0.min() and u0.max() < 1
    assert abs(u0.mean().item() - 0.5) < 0.02
    assert not torch.equal(u0, u1)
    assert torch.equal(u0, row_uniforms(seeds, 0))


def test_sampler_draws_from_the_tempered_distribution():
    rows = 20000
    scores = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(rows, 1)
    sampler = SeededSampler(list(range(rows)), prompt_length=0, temperature=0.5, top_p=1.0)
    out = sampler(torch.zeros(rows, 1, dtype=torch.long), scores)
    assert ((out == 0).sum(dim=1) == 1).all()  # one-hot: greedy decoding picks the drawn token
    freq = torch.bincount(out.argmax(dim=1), minlength=4).double() / rows
    expected = torch.softmax(scores[0].double() / 0.5, dim=0)
    assert torch.allclose(freq, expected, atol=0.015)


def test_sample_seed_separates_prompts_samples_and_seeds():
    seeds = {sample_seed(s, p, k) for s in (0, 1) for p in ("a", "b") for k in (0, 1)}
    assert len(seeds) == 8
    assert sample_seed(0, "a", 0) == sample_seed(0, "a", 0)
    assert all(0 <= s < 2**63 for s in seeds)


# --- generate ---


def test_same_seed_same_samples_whatever_the_batching(tiny, prompts):
    model, tok = tiny
    base = generate(model, tok, prompts, n=2, max_new_tokens=12, batch_size=6, seed=3, progress=False)
    one_by_one = generate(model, tok, prompts, n=2, max_new_tokens=12, batch_size=1, seed=3, progress=False)
    reversed_ = generate(model, tok, prompts[::-1], n=2, max_new_tokens=12, batch_size=4, seed=3, progress=False)
    alone = generate(model, tok, prompts[1:2], n=2, max_new_tokens=12, seed=3, progress=False)
    assert texts(base) == texts(one_by_one) == texts(reversed_)[::-1]
    assert texts(alone) == texts(base)[1:2]
    assert all(len(per) == 2 for per in base)
    assert base[0][0].text != base[0][1].text  # two samples of one prompt are different draws


def test_another_seed_gives_other_samples(tiny, prompts):
    model, tok = tiny
    a = generate(model, tok, prompts, max_new_tokens=12, seed=0, progress=False)
    b = generate(model, tok, prompts, max_new_tokens=12, seed=1, progress=False)
    assert texts(a) != texts(b)


def test_greedy_matches_model_generate(tiny, prompts):
    model, tok = tiny
    ours = generate(model, tok, prompts[:1], temperature=0.0, max_new_tokens=10, progress=False)[0][0]
    ids = tok(prompts[0], add_special_tokens=False, return_tensors="pt")
    ref = model.generate(**ids, do_sample=False, max_new_tokens=10, pad_token_id=tok.pad_token_id)
    new = ref[0, ids["input_ids"].shape[1] :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id) + 1]
    assert ours.text == tok.decode(new, skip_special_tokens=True)
    assert ours.n_tokens == len(new)


def test_length_and_stop_reasons(tiny, prompts):
    model, tok = tiny
    samples = generate(model, tok, prompts, n=3, max_new_tokens=5, seed=0, progress=False)
    for per in samples:
        for s in per:
            assert (s.finish_reason == "length") == (s.n_tokens == 5) or s.finish_reason == "stop"
            assert 1 <= s.n_tokens <= 5
    # The random model never learned to stop: over a long run some sample is cut at the cap.
    assert any(s.finish_reason == "length" for per in samples for s in per)


def test_positions_cap_new_tokens(tiny, prompts, monkeypatch):
    model, tok = tiny
    width = len(tok(prompts[0], add_special_tokens=False)["input_ids"])
    monkeypatch.setattr(model.config, "max_position_embeddings", width + 4)
    samples = generate(model, tok, prompts[:1], max_new_tokens=50, progress=False)
    assert samples[0][0].n_tokens <= 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "samples"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"batch_size": 0}, "batch_size"),
        ({"backend": "sglang"}, "backend"),
    ],
)
def test_bad_values_are_user_errors(tiny, prompts, kwargs, message):
    with pytest.raises(UserError, match=message):
        generate(*tiny, prompts, progress=False, **kwargs)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_is_a_user_error(tiny, prompts):
    with pytest.raises(UserError, match="vLLM.*not installed"):
        generate(*tiny, prompts, backend="vllm", progress=False)


def test_vllm_path_passes_token_ids_seeds_and_reads_finish_reasons(tiny, prompts, monkeypatch):
    """Against a stand-in for vLLM's documented interface (vllm.SamplingParams, LLM.generate, RequestOutput)."""
    import sys
    import types

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class FakeLLM:
        def generate(self, requests, params, use_tqdm=True):
            self.requests, self.params = requests, params
            done = types.SimpleNamespace
            return [
                done(outputs=[done(text=f"r{i}-{k}", token_ids=[1] * (k + 2), finish_reason=("length" if k else "stop"))
                              for k in range(p.n)])
                for i, p in enumerate(params)
            ]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=SamplingParams))
    model, tok = tiny
    llm = FakeLLM()
    samples = generate(llm, tok, prompts, n=2, temperature=0.6, top_p=0.9, max_new_tokens=7, seed=4, backend="vllm",
                       progress=False)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert [r["prompt_token_ids"] for r in llm.requests] == ids
    assert [p.seed for p in llm.params] == [sample_seed(4, p, 0) for p in prompts]
    assert {(p.n, p.temperature, p.top_p, p.max_tokens) for p in llm.params} == {(2, 0.6, 0.9, 7)}
    assert [[(s.text, s.n_tokens, s.finish_reason) for s in per] for per in samples][1] == [
        ("r1-0", 2, "stop"), ("r1-1", 3, "length")
    ]


def test_dropping_finished_rows_changes_no_sample(tiny, prompts, monkeypatch):
    """Rows that stopped leave the batch (`_decode` restarts `generate` on the others); samples stay the same."""
    import selfbudgeter.evaluation.generation as generation

    model, tok = tiny
    # A random model rarely ends a turn: let a tenth of the vocabulary end it, so rows stop at different steps.
    monkeypatch.setattr(model.generation_config, "eos_token_id", list(range(1, len(tok), 10)))
    kwargs = dict(n=8, max_new_tokens=20, batch_size=24, seed=5, progress=False)
    monkeypatch.setattr(generation, "COMPACT_SHARE", None)
    whole = generate(model, tok, prompts, **kwargs)
    calls = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw["input_ids"].shape[0]) or original(**kw))
    monkeypatch.setattr(generation, "COMPACT_SHARE", 0.25)
    monkeypatch.setattr(generation, "COMPACT_MIN_ROWS", 2)
    monkeypatch.setattr(generation, "COMPACT_MIN_TOKENS", 1)
    compacted = generate(model, tok, prompts, **kwargs)
    assert len(calls) > 1 and calls == sorted(calls, reverse=True) and calls[-1] < 24  # the batch shrank
    assert [[(s.text, s.n_tokens, s.finish_reason) for s in per] for per in compacted] == [
        [(s.text, s.n_tokens, s.finish_reason) for s in per] for per in whole
    ]
    reasons = {s.finish_reason for per in whole for s in per}
    assert reasons == {"stop", "length"}
