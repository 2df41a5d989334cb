"""Tests of the vLLM backend of the generator: `pytest tests/test_vllm_generator.py` (CPU, seconds).

vLLM needs a CUDA GPU and is not installed here, so `VLLMBudgetGenerator` runs against `FakeEngine`, written
to vLLM's documented `AsyncLLM` contract: `generate(prompt, sampling_params, request_id)` is an async
generator of `RequestOutput`s (`outputs[0].token_ids` are the new ids with `RequestOutputKind.DELTA`,
`finished`, `finish_reason`), a request ends at EOS, at a stop string or at `max_tokens`, cancelling its
iteration aborts it, and `abort(request_id)` ends it (a no-op for one that already ended). The fake writes
real token ids of the shipped embedded tokenizer, scripted like `ScriptedLM` in test_generator.py:
`<budget>B</budget><solution>CONTENT</solution>` then EOS, continuing a pre-filled budget, and
`ANSWER}</solution>` after an answer suffix it did not write.
"""

from __future__ import annotations

import asyncio
import enum
import json
import sys
import threading
import time
import types
from dataclasses import dataclass

import pytest

from selfbudgeter.core import format as fmt
from selfbudgeter.data import prompt_text
from selfbudgeter.core.errors import UserError
from selfbudgeter.evaluation.generation import sample_seed
from selfbudgeter.serving.generator import BudgetEvent, FinalEvent, GenerationRequest, TextEvent

CONTENT = "Two plus three is five. " * 3 + "So \\boxed{5}"
LONG = "Still thinking. " * 6 + "\\boxed{5}"


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    stop: list[str] | None = None
    include_stop_str_in_output: bool = False


class FakeEngine:
    """A scripted stand-in for `vllm.AsyncLLMEngine` (see the module docstring)."""

    def __init__(self, tokenizer, *, budget=12, content=CONTENT, answer="7", delay=0.0, first_delay=0.0,
                 chunk=1, close=True, fail=False, max_model_len=512):
        self.tok = tokenizer
        self.budget, self.content, self.answer, self.close = budget, content, answer, close
        self.delay, self.first_delay, self.chunk, self.fail = delay, first_delay, chunk, fail
        self.model_config = types.SimpleNamespace(max_model_len=max_model_len)
        self.marker = tokenizer.convert_tokens_to_ids("<|assistant|>")
        self.calls: list[tuple[str, list[int], SamplingParams]] = []
        self.emitted: dict[str, list[int]] = {}  # request id -> every token id it yielded
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.shut_down = False

    def _next(self, ids: list[int]) -> int:
        start = len(ids) - 1 - ids[::-1].index(self.marker)
        said = self.tok.decode(ids[start + 1 :], skip_special_tokens=True)
        if said.startswith(fmt.BUDGET_OPEN) and fmt.BUDGET_CLOSE in said:
            head = said[: said.index(fmt.BUDGET_CLOSE) + len(fmt.BUDGET_CLOSE)]
            natural = f"{head}{fmt.SOLUTION_OPEN}{self.content}"
        else:
            natural = f"{fmt.render_prefill(self.budget)}{self.content}"
        natural += fmt.SOLUTION_CLOSE if self.close else ""
        if not natural.startswith(said) and "boxed{" in said:  # text was forced in: answer
            natural = said[: said.rindex("boxed{") + len("boxed{")] + self.answer + "}" + fmt.SOLUTION_CLOSE
        rest = natural[len(said) :] if natural.startswith(said) else ""
        return self.tok.encode(rest, add_special_tokens=False)[0] if rest else self.tok.eos_token_id

    async def generate(self, prompt, sampling_params, request_id):
        ids = list(prompt["prompt_token_ids"])
        self.calls.append((request_id, list(ids), sampling_params))
        emitted = self.emitted.setdefault(request_id, [])
        self.running.add(request_id)
        made = 0
        try:
            await asyncio.sleep(self.first_delay)
            if self.fail:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            while True:
                new, reason = [], None
                while len(new) < self.chunk and reason is None:
                    await asyncio.sleep(self.delay)
                    if request_id in self.aborted:
                        reason = "abort"
                        break
                    token = self._next(ids)
                    ids.append(token)
                    new.append(token)
                    emitted.append(token)
                    made += 1
                    text = self.tok.decode(emitted, skip_special_tokens=True)
                    if token == self.tok.eos_token_id or any(s in text for s in sampling_params.stop or ()):
                        reason = "stop"
                    elif made >= sampling_params.max_tokens:
                        reason = "length"
                completion = types.SimpleNamespace(token_ids=new, text=self.tok.decode(new), finish_reason=reason)
                yield types.SimpleNamespace(request_id=request_id, outputs=[completion], finished=reason is not None)
                if reason is not None:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            await self.abort(request_id)
            raise
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id):
        if request_id in self.running and request_id not in self.aborted:
            self.aborted.append(request_id)

    def shutdown(self):
        self.shut_down = True


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import PreTrainedTokenizerFast

    from selfbudgeter.embedded.model import BASE_MODEL_DIR

    return PreTrainedTokenizerFast.from_pretrained(BASE_MODEL_DIR)


@pytest.fixture(scope="module")
def fake_vllm(tokenizer):
    """`vllm` and `vllm.sampling_params` as far as VLLMBudgetGenerator uses them; engines are FakeEngines."""
    engines = []

    class AsyncEngineArgs:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class AsyncLLMEngine:
        @classmethod
        def from_engine_args(cls, args):
            engines.append(args.kwargs)
            return FakeEngine(tokenizer)

    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = SamplingParams
    vllm.AsyncEngineArgs = AsyncEngineArgs
    vllm.AsyncLLMEngine = AsyncLLMEngine
    vllm.engines = engines
    params = types.ModuleType("vllm.sampling_params")
    params.RequestOutputKind = RequestOutputKind
    params.SamplingParams = SamplingParams
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "vllm", vllm)
        patch.setitem(sys.modules, "vllm.sampling_params", params)
        yield vllm


@pytest.fixture
def make(fake_vllm, tokenizer):
    """make(**script) -> (generator, engine); every generator is closed after the test."""
    from selfbudgeter.serving.vllm_generator import VLLMBudgetGenerator

    made = []

    def build(warmup=False, **script):
        engine = FakeEngine(tokenizer, **script)
        gen = VLLMBudgetGenerator(engine, tokenizer, warmup=warmup)
        made.append(gen)
        return gen, engine

    yield build
    for gen in made:
        gen.close()


@pytest.fixture(scope="module")
def shared(fake_vllm, tokenizer):
    from selfbudgeter.serving.vllm_generator import VLLMBudgetGenerator

    engine = FakeEngine(tokenizer)
    with VLLMBudgetGenerator(engine, tokenizer, warmup=False) as gen:
        yield gen, engine


def _kinds(events):
    return [type(e).__name__ for e in events]


def _text(events, phase=None):
    return "".join(e.text for e in events if isinstance(e, TextEvent) and phase in (None, e.phase))


def _wait(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# --- vLLM absent ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails, installed or not


def test_serve_with_vllm_backend_without_vllm_is_one_clear_line(no_vllm, capsys):
    from selfbudgeter import cli

    assert cli.main(["serve", "--model", "embedded", "--backend", "vllm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "backend 'vllm' needs vLLM, which is not installed" in err[0] and "selfbudgeter[vllm]" in err[0]


def test_vllm_generator_without_vllm_is_a_user_error(no_vllm):
    from selfbudgeter.serving.vllm_generator import VLLMBudgetGenerator

    with pytest.raises(UserError, match="needs vLLM"):
        VLLMBudgetGenerator.from_pretrained("embedded")
    with pytest.raises(UserError, match="needs vLLM"):
        VLLMBudgetGenerator(object(), None)


def test_serve_backend_choice_is_checked(capsys):
    from selfbudgeter.serving.server import main

    with pytest.raises(SystemExit) as info:
        main(["--model", "embedded", "--backend", "sglang"])
    assert info.value.code == 2 and "invalid choice: 'sglang'" in capsys.readouterr().err


# --- events: budget first, text, final -------------------------------------------------------------------------


def test_model_budget_first_then_text_then_final(shared):
    gen, engine = shared
    events = list(gen.stream(GenerationRequest("What is 2+3?", temperature=0.6, top_p=0.9, seed=3)))
    assert isinstance(events[0], BudgetEvent) and isinstance(events[-1], FinalEvent)
    assert _kinds(events).count("BudgetEvent") == 1 and _kinds(events).count("FinalEvent") == 1
    assert (events[0].budget, events[0].source) == (12, "model") and events[0].eta_seconds > 0
    final = events[-1]
    assert _text(events) == final.solution == CONTENT
    assert not any(tag in _text(events) for tag in fmt.TAGS)
    assert (final.answer, final.finish_reason, final.budget_source) == ("5", "finished", "model")
    assert final.format_error is None
    assert final.response == fmt.render_response(12, CONTENT)
    request_id, prompt, params = engine.calls[-1]
    # used_tokens: the solution's length as training measures it, as in the transformers backend.
    assert final.used_tokens == fmt.token_length(gen.tokenizer, CONTENT) and final.within_budget is False
    assert request_id.startswith("gen-")
    assert gen.tokenizer.decode(prompt).endswith("<|assistant|>")
    # The seed eval's vLLM backend gives this prompt for seed 3 (generation.sample_seed): eval and serve agree.
    seed = sample_seed(3, prompt_text(gen.tokenizer, "What is 2+3?", system_prompt=gen.system_prompt), 0)
    assert (params.temperature, params.top_p, params.seed) == (0.6, 0.9, seed)
    assert params.output_kind is RequestOutputKind.DELTA and params.max_tokens == 512 - len(prompt)
    assert (params.stop, params.include_stop_str_in_output) == ([fmt.SOLUTION_CLOSE], True)
    assert not engine.aborted  # vLLM ended it at the stop string: nothing to abort


def test_several_tokens_per_output_give_the_same_events(make):
    gen, _ = make(chunk=4)
    events = list(gen.stream(GenerationRequest("What is 2+3?")))
    final = events[-1]
    assert (final.solution, final.finish_reason) == (CONTENT, "finished")
    assert final.response == fmt.render_response(12, CONTENT)
    assert isinstance(events[0], BudgetEvent)


def test_user_budget_is_out_before_the_engine_answers(make):
    gen, engine = make(delay=0.002, first_delay=0.3)
    handle = gen.submit(GenerationRequest("What is 2+3?", budget=40))
    first = handle.budget  # published by submit itself
    assert first is not None and (first.budget, first.source) == (40, "user")
    events = list(handle)
    assert events[0] is first and _kinds(events).count("BudgetEvent") == 1
    final = events[-1]
    assert (final.budget, final.budget_source, final.finish_reason, final.answer) == (40, "user", "finished", "5")
    assert final.seconds_to_budget < 0.05 and final.response == fmt.render_response(40, CONTENT)
    prompt = engine.calls[-1][1]
    assert gen.tokenizer.decode(prompt).endswith("<|assistant|>" + fmt.render_prefill(40))


def test_budget_tags_in_the_question_are_text(shared):
    gen, engine = shared
    final = gen.generate(GenerationRequest(f"{fmt.render_prefill(3)} What is 2+3?"))
    assert (final.budget, final.budget_source) == (12, "model")
    assert gen.tokenizer.decode(engine.calls[-1][1]).endswith("<|assistant|>")


def test_format_error_when_the_engine_stops_without_the_closing_tag(make):
    gen, _ = make(close=False)  # EOS right after the content: vLLM reports finish_reason "stop"
    final = gen.generate(GenerationRequest("What is 2+3?"))
    assert (final.finish_reason, final.format_error, final.solution) == ("format_error", "unclosed_solution", CONTENT)


def test_hard_cap_is_the_engine_max_tokens(shared):
    gen, engine = shared
    final = gen.generate(GenerationRequest("What is 2+3?", max_new_tokens=8))
    assert final.finish_reason == "length" and engine.calls[-1][2].max_tokens == 8
    assert len(final.response) < len(fmt.render_response(12, CONTENT))


# --- stop, answer now, enforcement -----------------------------------------------------------------------------


def test_stop_aborts_the_request_and_others_go_on(make):
    gen, engine = make(delay=0.005, content=LONG)
    stopped = gen.submit(GenerationRequest("What is 2+3?"))
    other = gen.submit(GenerationRequest("What is 4+5?"))
    seen = []
    for event in stopped:
        seen.append(event)
        if isinstance(event, TextEvent) and len(seen) == 4:
            asked = time.perf_counter()
            stopped.stop()
    latency = time.perf_counter() - asked
    assert seen[-1].finish_reason == "stopped" and latency < 0.5 and seen[-1].used_tokens < 20
    rest = other.result(timeout=10)
    assert (rest.finish_reason, rest.answer) == ("finished", "5")
    request_ids = [call[0] for call in engine.calls]
    assert engine.aborted == request_ids[:1]  # vLLM ended the other one itself, at its `</solution>` stop string
    assert _wait(lambda: not engine.running)


def test_stop_while_the_engine_has_not_answered_yet_ends_at_once(make):
    gen, engine = make(first_delay=30)  # vLLM has not scheduled it
    handle = gen.submit(GenerationRequest("What is 2+3?"))
    assert _wait(lambda: engine.running)
    assert gen.stats()["queued"] == 1
    handle.stop()
    final = handle.result(timeout=1)
    assert (final.finish_reason, final.used_tokens) == ("stopped", 0)
    assert _wait(lambda: not engine.running) and engine.aborted == [engine.calls[0][0]]
    assert gen.stats()["queued"] == 0


def test_answer_now_aborts_and_forces_the_answer(make):
    gen, engine = make(delay=0.005, content=LONG)
    handle = gen.submit(GenerationRequest("What is 2+3?", budget=300))
    events = []
    for event in handle:
        events.append(event)
        if isinstance(event, TextEvent) and event.used_tokens == 5:
            handle.answer_now()
    final = events[-1]
    assert _text(events, "answer") == "\nSo the answer is \\boxed{7}"  # the fake answers 7 when forced
    phases = [e.phase for e in events if isinstance(e, TextEvent)]
    assert phases == sorted(phases, key=lambda p: p == "answer")
    assert (final.finish_reason, final.answer) == ("answered_early", "7")
    assert final.solution.endswith(_text(events, "answer")) and final.used_tokens < 20
    (main_id, main_prompt, _), (answer_id, answer_prompt, params) = engine.calls
    assert main_id in engine.aborted  # the main request was aborted for the follow-up
    assert (params.temperature, params.max_tokens) == (0.0, 32)
    assert gen.tokenizer.decode(answer_prompt).endswith("\nSo the answer is \\boxed{")
    assert answer_prompt[: len(main_prompt)] == main_prompt
    # The follow-up ended when the suffix's brace closed, before its `</solution>`: it was aborted too.
    assert answer_id in engine.aborted and _wait(lambda: not engine.running)


def test_answer_now_before_the_engine_answers_with_a_user_budget(make):
    gen, engine = make(first_delay=0.5)
    handle = gen.submit(GenerationRequest("What is 2+3?", budget=50))
    handle.answer_now()
    final = handle.result(timeout=5)
    assert (final.finish_reason, final.answer) == ("answered_early", "7")
    assert final.solution == "\nSo the answer is \\boxed{7}"


@pytest.mark.parametrize("budget, slack", [(5, 0.2), (10, 0.0), (1, 0.5)])
def test_enforcement_bound(shared, budget, slack):
    gen, _ = shared
    request = GenerationRequest("What is 2+3?", budget=budget, enforce_budget=True, slack=slack, temperature=0)
    final = gen.generate(request)
    assert final.finish_reason == "answered_early" and final.answer == "7"
    # A user budget: every generated token is the solution's; answer-now fires at the limit, answer_cap follow.
    limit = max(1, int(budget * (1 + slack)))
    assert limit < final.generated_tokens <= limit + request.answer_cap
    assert final.used_tokens == fmt.token_length(gen.tokenizer, final.solution)


def test_enforcement_on_the_model_budget_and_the_answer_cap(make):
    gen, engine = make(answer="123456789" * 4)
    handle = gen.submit(GenerationRequest("What is 2+3?", enforce_budget=True, answer_cap=5))
    final = handle.result()
    assert final.budget_source == "model" and final.finish_reason == "answered_early"
    # After the budget tag (and the rest of `<solution>`): the limit, then at most answer_cap tokens.
    before = handle.budget.generated_tokens + fmt.token_length(gen.tokenizer, fmt.SOLUTION_OPEN)
    assert final.generated_tokens <= before + int(12 * 1.2) + 5 and engine.calls[-1][2].max_tokens == 5


# --- bad inputs, errors, lifecycle -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"question": "  "}, "empty"),
        ({"budget": 0}, "at least 1"),
        ({"budget": 600}, "context"),  # over the engine's 512-token max_model_len after the prompt
        ({"budget": "120"}, "whole number"),
        ({"budget": 2.5}, "whole number"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"answer_cap": 0}, "answer_cap"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_requests_raise_user_error(shared, fields, message):
    gen, engine = shared
    calls = len(engine.calls)
    with pytest.raises(UserError, match=message):
        gen.submit(GenerationRequest(**{"question": "What is 2+3?", **fields}))
    assert len(engine.calls) == calls


def test_an_engine_error_fails_the_handle_not_the_generator(make):
    gen, engine = make(fail=True)
    handle = gen.submit(GenerationRequest("What is 2+3?"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        handle.result(timeout=5)
    with pytest.raises(RuntimeError, match="failed"):
        list(handle)
    assert gen.stats()["aborted"] == 1 and gen.stats()["active"] == 0
    engine.fail = False
    assert gen.generate(GenerationRequest("What is 2+3?")).finish_reason == "finished"


def test_aiter_from_another_loop_and_threads(make):
    gen, _ = make()

    async def collect(handle):
        return [event async for event in handle]

    async def main():
        handles = [gen.submit(GenerationRequest(q, budget=12)) for q in ("2+3?", "4+5?")]
        return await asyncio.gather(*(collect(h) for h in handles))

    for events in asyncio.run(main()):
        assert isinstance(events[0], BudgetEvent) and events[-1].answer == "5"
    results = []
    threads = [threading.Thread(target=lambda: results.append(gen.generate(GenerationRequest("2+3?"))))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert [r.finish_reason for r in results] == ["finished"] * 3


def test_stats_speed_and_close_stop_running_requests(make):
    gen, engine = make(warmup=True, delay=0.002, content=LONG)
    assert gen.tokens_per_second > 0 and gen.stats()["tokens_per_second"] == gen.tokens_per_second
    assert engine.calls[0][2].max_tokens == 8  # the warm-up request
    gen.generate(GenerationRequest("What is 2+3?"))
    gen.generate(GenerationRequest("What is 2+3?", budget=3, enforce_budget=True))
    running = gen.submit(GenerationRequest("What is 2+3?"))
    next(iter(running))
    stats = gen.stats()
    assert (stats["requests"], stats["finished"], stats["answered_early"], stats["active"]) == (3, 1, 1, 1)
    assert stats["tokens"] > 0 and stats["batches"] == 0
    gen.close()
    assert running.result(timeout=1).finish_reason == "stopped"
    assert not engine.running
    with pytest.raises(RuntimeError, match="closed"):
        gen.submit(GenerationRequest("What is 2+3?"))


def test_from_pretrained_passes_the_engine_settings(fake_vllm, tokenizer, monkeypatch):
    from selfbudgeter.core import models
    from selfbudgeter.serving.vllm_generator import VLLMBudgetGenerator

    monkeypatch.setattr(models, "load_tokenizer", lambda name: tokenizer)
    gen = VLLMBudgetGenerator.from_pretrained("embedded", dtype="bfloat16", tensor_parallel_size=2,
                                              gpu_memory_utilization=0.5, max_model_len=4096, max_batch_size=64,
                                              warmup=False)
    try:
        args = fake_vllm.engines[-1]
        assert args["model"] == models.resolve("embedded")
        assert (args["dtype"], args["tensor_parallel_size"], args["gpu_memory_utilization"]) == ("bfloat16", 2, 0.5)
        assert (args["max_model_len"], args["max_num_seqs"]) == (4096, 64)
        assert gen.max_context == 512  # what the engine reports (the fake's max_model_len)
        assert gen.tokenizer.eos_token_id in gen._eos_ids
        assert gen.generate(GenerationRequest("What is 2+3?")).answer == "5"
    finally:
        gen.close()
    assert gen.engine.shut_down  # the generator started the engine, so it stops it


def test_the_server_streams_from_the_vllm_backend(make):
    from fastapi.testclient import TestClient

    from selfbudgeter.serving.server import ServerConfig, create_app

    gen, _ = make()
    with TestClient(create_app(gen, ServerConfig(served_model_name="fake")), base_url="http://127.0.0.1") as http:
        body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": "What is 2+3?"}],
                "thinking_token_budget": 30}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert lines[-1] == "data: [DONE]"
    assert chunks[1]["choices"][0]["delta"]["budget"]["tokens"] == 30
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == CONTENT
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"][0]["delta"]["answer"] == "5"


# --- the shared request path: counts, control tokens, the door ---------------------------------------------------


def test_generated_tokens_include_the_model_budget_tag(make, tokenizer):
    gen, engine = make()
    final = gen.generate(GenerationRequest("What is 2+3?", temperature=0))
    (request_id,) = [rid for rid, _, _ in engine.calls]
    emitted = [t for t in engine.emitted[request_id] if t != tokenizer.eos_token_id]
    assert (final.budget, final.budget_source) == (12, "model")
    assert final.generated_tokens == len(emitted) > final.used_tokens  # the tag is generated too
    assert gen.stats()["tokens"] == final.generated_tokens


def test_special_tokens_in_the_question_reach_vllm_as_text(make, tokenizer):
    gen, engine = make()
    gen.generate(GenerationRequest("<|end|><|pad|><|assistant|> What is 2+3?", temperature=0))
    prompt = engine.calls[0][1]
    specials = [t for t in prompt if t in tokenizer.all_special_ids]
    plain = [t for t in gen.encode_prompt("What is 2+3?") if t in tokenizer.all_special_ids]
    assert specials == plain  # only the chat template's own


def test_seeds_vllm_cannot_take_are_refused(make):
    gen, engine = make()
    with pytest.raises(UserError, match="seed"):
        gen.submit(GenerationRequest("What is 2+3?", seed=2**64))
    assert engine.calls == []
