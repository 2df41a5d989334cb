"""The OpenAI-compatible server, driven by the official `openai` client against a real BudgetGenerator.

The model is the tiny random Llama of conftest with EOS suppressed, so every generation runs to its token cap
unless it is stopped: lengths are deterministic and a stream stays open as long as a test needs it. User
budgets are pre-filled, so the budget chunk is deterministic too. Run with `pytest tests/test_server.py`.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfbudgeter.core import format as fmt
from selfbudgeter.serving.server import (
    INLINE_PREPARE_CHARS,
    ApiError,
    Metrics,
    ServerConfig,
    create_app,
    main,
    parse_chat_request,
)

KEY = "test-key"
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


def body(**fields):
    return {"model": "tiny", "messages": QUESTION, **fields}


# --- request parsing (no server) --------------------------------------------------------------------------

CONFIG = ServerConfig(served_model_name="tiny", aliases=("tiny-alias",), max_budget=4096)


@pytest.mark.parametrize(
    "fields, budget",
    [
        # budget fields of vLLM, Anthropic, OpenRouter
        ({"thinking_token_budget": 300}, 300),
        ({"thinking": {"type": "enabled", "budget_tokens": 120}}, 120),
        ({"reasoning": {"max_tokens": 77}}, 77),
        ({"thinking_token_budget": 50, "reasoning": {"max_tokens": 50}}, 50),  # agreeing duplicates
        # reasoning effort presets; an explicit number wins
        ({"reasoning_effort": "low"}, 256),
        ({"reasoning_effort": "medium"}, None),
        ({"reasoning_effort": "xhigh"}, 4096),
        ({"reasoning": {"effort": "minimal"}}, 64),
        ({"thinking": {"type": "disabled"}}, 16),
        ({"reasoning_effort": "high", "thinking_token_budget": 33}, 33),
        # nothing: the model states its own budget
        ({}, None),
    ],
)
def test_budget_fields(fields, budget):
    assert parse_chat_request(body(**fields), CONFIG).budget == budget


def test_effort_preset_is_lowered_to_max_budget():
    config = ServerConfig(max_budget=100)
    assert parse_chat_request({"messages": QUESTION, "reasoning_effort": "high"}, config).budget == 100


@pytest.mark.parametrize(
    "fields, status, param",
    [
        # invalid budgets
        ({"thinking_token_budget": 0}, 400, "thinking_token_budget"),
        ({"thinking_token_budget": -5}, 400, "thinking_token_budget"),
        ({"thinking_token_budget": 10**12}, 400, "thinking_token_budget"),
        ({"thinking_token_budget": "abc"}, 400, "thinking_token_budget"),
        ({"thinking_token_budget": True}, 400, "thinking_token_budget"),
        ({"thinking_token_budget": 12.5}, 400, "thinking_token_budget"),
        ({"thinking": {"budget_tokens": 0}}, 400, "thinking.budget_tokens"),
        ({"thinking_token_budget": 10, "reasoning": {"max_tokens": 20}}, 400, "thinking_token_budget"),
        ({"reasoning_effort": "extreme"}, 400, "reasoning_effort"),
        ({"thinking": "yes"}, 400, "thinking"),
        # the model is resolved at start-up: a request names it, never a path
        ({"model": "/tmp/some/model"}, 404, "model"),
        ({"model": "gpt-4o"}, 404, "model"),
        # messages
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "system", "content": "hi"}]}, 400, "messages"),
        ({"messages": QUESTION + [{"role": "assistant", "content": "<budget>5</budget>"}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "  "}]}, 400, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
         "messages[0].content"),
        # other fields
        ({"n": 2}, 400, "n"),
        ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"max_completion_tokens": 0}, 400, "max_completion_tokens"),
        ({"max_tokens": "10"}, 400, "max_tokens"),
        ({"temperature": 3}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"enforce_budget": "yes"}, 400, "enforce_budget"),
        ({"budget_slack": -1}, 400, "budget_slack"),
    ],
)
def test_invalid_requests(fields, status, param):
    with pytest.raises(ApiError) as info:
        parse_chat_request(body(**fields), CONFIG)
    assert (info.value.status, info.value.param) == (status, param)
    assert set(info.value.body()["error"]) == {"message", "type", "param", "code"}


def test_only_the_last_user_message_is_the_question_and_tags_in_it_are_text():
    messages = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "an earlier question"},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": [{"type": "text", "text": "<budget>5</budget>"}, {"type": "text", "text": "1+1?"}]},
    ]
    params = parse_chat_request({"model": "tiny-alias", "messages": messages}, CONFIG)
    assert params.question == "<budget>5</budget>\n1+1?"
    assert params.budget is None


def test_server_default_for_budget_enforcement():
    config = ServerConfig(enforce_budget=True, budget_slack=0.5)
    params = parse_chat_request({"messages": QUESTION}, config)
    assert (params.enforce_budget, params.slack) == (True, 0.5)
    assert parse_chat_request({"messages": QUESTION, "enforce_budget": False}, config).enforce_budget is False


def test_prometheus_text():
    text = Metrics.prometheus({"requests": 3, "active": 1, "generator": {"x": 1}})
    assert "selfbudgeter_requests_total 3" in text
    assert "# TYPE selfbudgeter_active gauge" in text and "generator" not in text


# --- every bad input is a 4xx in OpenAI's error shape -------------------------------------------------------


@pytest.mark.parametrize(
    "fields, param",
    [
        # wrong JSON types where a string, object or boolean belongs
        ({"reasoning_effort": ["low"]}, "reasoning_effort"),
        ({"reasoning_effort": 3}, "reasoning_effort"),
        ({"reasoning": {"effort": {}}}, "reasoning.effort"),
        ({"thinking": {"type": ["disabled"]}}, "thinking.type"),
        ({"model": ["tiny"]}, "model"),
        ({"model": 7}, "model"),
        ({"stream": 1}, "stream"),
        ({"stream": "true"}, "stream"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"stream": True, "stream_options": {"continuous_usage_stats": 1}}, "stream_options.continuous_usage_stats"),
        ({"n": True}, "n"),
        ({"n": 1.0}, "n"),
        ({"thinking_token_budget": "40"}, "thinking_token_budget"),
        ({"reasoning": {"max_tokens": "40"}}, "reasoning.max_tokens"),
        ({"max_completion_tokens": True}, "max_completion_tokens"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": ["user"], "content": "hi"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content"),
        # numbers out of range; seeds must fit a signed 64-bit integer (torch.Generator, vLLM)
        ({"seed": 2**64}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": -1e-45}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"budget_slack": float("nan")}, "budget_slack"),
        # text that is not Unicode: a lone surrogate cannot be tokenized
        ({"messages": [{"role": "user", "content": "What is \ud800?"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages[0].content"),
    ],
)
def test_wrong_types_and_ranges_are_400(fields, param):
    with pytest.raises(ApiError) as info:
        parse_chat_request(body(**fields), CONFIG)
    assert (info.value.status, info.value.param) == (400, param)
    assert len(info.value.message) < 300
    json.dumps(info.value.body(), ensure_ascii=True)


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"seed": 2**63 - 1}, {"seed": 2**63 - 1}),
        ({"seed": 0, "n": 1, "stream": False}, {"seed": 0, "stream": False}),
        ({"temperature": 1e-45}, {"temperature": 1e-45}),  # accepted; the generator samples it greedily
        ({"reasoning_effort": "high"}, {"budget": 1024, "fit_budget": True}),  # a preset is fitted to the context
        ({"thinking_token_budget": 1024}, {"budget": 1024, "fit_budget": False}),  # an explicit one must fit
        ({"max_completion_tokens": 10**30}, {"max_new_tokens": 10**30}),  # capped by the context in the generator
    ],
)
def test_values_at_the_edges_are_accepted(fields, expected):
    params = parse_chat_request(body(**fields), CONFIG)
    assert {key: getattr(params, key) for key in expected} == expected


def test_echoed_values_are_truncated():
    with pytest.raises(ApiError) as info:
        parse_chat_request(body(model="m" * 100_000), CONFIG)
    assert info.value.status == 404 and len(info.value.message) < 300
    with pytest.raises(ApiError) as info:
        parse_chat_request(body(reasoning_effort="e" * 100_000), CONFIG)
    assert len(info.value.message) < 300


# Hypothesis: generated bodies, from arbitrary JSON to near-valid requests with one field wrong. The parser
# either returns parameters the generator accepts, or raises a 4xx; never anything else (which would be a 500).
FIELDS = ["model", "messages", "n", "stream", "stream_options", "include_usage", "continuous_usage_stats",
          "max_completion_tokens", "max_tokens", "temperature", "top_p", "seed", "enforce_budget", "budget_slack",
          "thinking_token_budget", "thinking", "budget_tokens", "type", "reasoning", "effort", "reasoning_effort",
          "role", "content", "text"]
LEAVES = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
          | st.floats(allow_nan=True, allow_infinity=True)
          | st.text(st.characters(codec=None, exclude_categories=()), max_size=12)  # lone surrogates included
          | st.sampled_from(["tiny", "user", "text", "low", "high", "disabled", "enabled", "medium"]))
JSON = st.recursive(LEAVES, lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), kids, max_size=4), max_leaves=12)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]) | JSON,
                                           "content": st.text(min_size=1, max_size=20) | JSON}), max_size=3)
REQUESTS = st.fixed_dictionaries(
    {"messages": MESSAGES | st.just(QUESTION)},
    optional={name: JSON | LEAVES for name in FIELDS if name not in ("messages", "role", "content", "text")},
)
BODIES = JSON | REQUESTS


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(BODIES)
def test_fuzzed_bodies_are_never_a_server_error(data):
    from selfbudgeter.serving.generator import GenerationRequest, check_request

    try:
        params = parse_chat_request(data, CONFIG)
    except ApiError as err:
        assert 400 <= err.status < 500
        assert len(err.message) < 400
        json.dumps(err.body(), ensure_ascii=True)
    else:
        check_request(GenerationRequest(**params.generation_kwargs()))  # nothing the door lets in fails later


# --- command line -----------------------------------------------------------------------------------------


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--host", "--port", "--api-key", "--max-concurrent", "--max-budget",
                 "--served-model-name", "--enforce-budget"):
        assert flag in out


@pytest.mark.parametrize("argv", [["--model", "m", "--port", "abc"], ["--model", "m", "--max-concurrent", "0"],
                                  ["--port", "80"], ["--model", "m", "--effort-budgets", "huge=5"]])
def test_bad_arguments_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err


def test_missing_model_dir_is_one_line(tmp_path, capsys):
    from selfbudgeter import cli

    assert cli.main(["serve", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


# --- the live server --------------------------------------------------------------------------------------


class LiveServer:
    """uvicorn on a free 127.0.0.1 port in a background thread, with a bounded request budget."""

    def __init__(self, app):
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", limit_max_requests=500,
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from selfbudgeter.serving.generator import BudgetGenerator
    from selfbudgeter.core.models import load_model

    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    # A random model ends at a random EOS; without EOS every generation runs to its cap or until stopped.
    model.generation_config.suppress_tokens = [tokenizer.eos_token_id]
    gen = BudgetGenerator(model, tokenizer, max_batch_size=4)
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def live(generator):
    config = ServerConfig(served_model_name="tiny", aliases=("tiny-alias",), api_key=KEY, max_concurrent=8,
                          max_body_bytes=4096, ping_seconds=0.5)
    server = LiveServer(create_app(generator, config))
    yield server
    server.stop()


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=30)


AUTH = {"Authorization": f"Bearer {KEY}"}


def metrics(live) -> dict:
    return httpx.get(f"{live.url}/metrics", headers=AUTH, timeout=10).json()


def wait_for(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def control(live, cid, action):
    return httpx.post(f"{live.url}/v1/chat/completions/control", json={"id": cid, "action": action},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=10)


def test_non_stream(client, generator):
    out = client.chat.completions.create(model="tiny", messages=QUESTION, max_completion_tokens=12, seed=1,
                                         extra_body={"thinking_token_budget": 50})
    choice = out.choices[0]
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion" and out.model == "tiny"
    assert choice.finish_reason == "length"
    budget = choice.message.model_extra["budget"]
    # used_tokens is the solution's length as training measures it: 12 random tokens, decoded, need not be 12
    length = fmt.token_length(generator.tokenizer, choice.message.content)
    assert (budget["tokens"], budget["source"], budget["used_tokens"]) == (50, "user", length)
    assert budget["within_budget"] is (length <= 50) and budget["eta_seconds"] > 0
    assert "<budget>" not in choice.message.content and "<solution>" not in choice.message.content
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert out.usage.completion_tokens_details.reasoning_tokens == 12
    assert out.usage.model_extra["budget"] == {"tokens": 50, "used_tokens": length}


def test_stream_sends_the_budget_first(client, generator):
    stream = client.chat.completions.create(
        model="tiny", messages=QUESTION, stream=True, max_completion_tokens=15, seed=2,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"thinking_token_budget": 40},
    )
    kinds, text, budgets, finish, usage = [], "", [], None, None
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            extra = delta.model_extra or {}
            if extra.get("budget"):
                budgets.append(extra["budget"])
                assert delta.content is None
                kinds.append("budget")
            elif delta.content:
                text += delta.content
                kinds.append("text")
                # continuous usage: running token count on every content chunk
                assert chunk.usage.model_extra["budget"]["tokens"] == 40
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    assert len(budgets) == 1 and budgets[0]["tokens"] == 40 and budgets[0]["source"] == "user"
    assert isinstance(budgets[0]["eta_seconds"], float)
    assert kinds.index("budget") < kinds.index("text")
    assert "<budget>" not in text and "</solution>" not in text
    assert finish == "length"
    assert usage.completion_tokens == 15 and usage.completion_tokens_details.reasoning_tokens == 15
    assert usage.model_extra["budget"] == {"tokens": 40, "used_tokens": fmt.token_length(generator.tokenizer, text)}


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, stream=True,
                                                 max_completion_tokens=3, extra_body={"thinking_token_budget": 9}))
    assert all(chunk.choices for chunk in chunks) and all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_budget_tag_in_the_question_is_not_a_prefill(client):
    messages = [{"role": "user", "content": "<budget>7</budget><solution> what is 1+1?"}]
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, stream=True,
                                                 max_completion_tokens=8, seed=3))
    budgets = [c.choices[0].delta.model_extra.get("budget") for c in chunks if c.choices]
    # The random model never writes a budget tag itself, so no budget is known at all.
    assert not any(budgets)


def test_reasoning_effort_sets_a_budget(client):
    stream = client.chat.completions.create(model="tiny", messages=QUESTION, stream=True, max_completion_tokens=2,
                                            reasoning_effort="minimal")
    budgets = [c.choices[0].delta.model_extra.get("budget") for c in stream if c.choices]
    assert [b["tokens"] for b in budgets if b] == [64]


def test_budget_enforcement_forces_the_answer(client):
    out = client.chat.completions.create(
        model="tiny", messages=QUESTION, max_completion_tokens=300, seed=4,
        extra_body={"thinking_token_budget": 10, "enforce_budget": True, "budget_slack": 0.0},
    )
    choice = out.choices[0]
    assert choice.model_extra["finish_detail"] == "answered_early" and choice.finish_reason == "stop"
    assert "So the answer is" in choice.message.content
    assert 10 <= out.usage.completion_tokens <= 10 + 32
    assert out.usage.completion_tokens_details.reasoning_tokens == 10


def first_text_chunk(stream):
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            return chunk
    raise AssertionError("the stream ended before any text")


def test_closing_the_stream_stops_generation(client, live, generator):
    before, stopped_before = metrics(live), generator.stats()["stopped"]
    stream = client.chat.completions.create(model="tiny", messages=QUESTION, stream=True, max_completion_tokens=400,
                                            extra_body={"thinking_token_budget": 300})
    first_text_chunk(stream)
    stream.close()
    assert wait_for(lambda: metrics(live)["aborted_by_disconnect"] == before["aborted_by_disconnect"] + 1)
    assert wait_for(lambda: generator.stats()["stopped"] == stopped_before + 1)
    after = metrics(live)
    assert after["active"] == 0
    # stopped long before its 400-token cap
    assert after["tokens_generated"] - before["tokens_generated"] < 300


def test_cancel_through_the_control_call(client, live):
    before = metrics(live)["cancelled"]
    stream = client.chat.completions.create(model="tiny", messages=QUESTION, stream=True, max_completion_tokens=400,
                                            extra_body={"thinking_token_budget": 300})
    cid = first_text_chunk(stream).id
    response = control(live, cid, "cancel")
    assert response.status_code == 200 and response.json()["status"] == "accepted"
    last = list(stream)[-1].choices[0]
    assert last.finish_reason == "abort" and last.model_extra["finish_detail"] == "stopped"
    assert metrics(live)["cancelled"] == before + 1
    assert control(live, cid, "cancel").status_code == 404  # it is over


@pytest.mark.parametrize("action", ["answer_now", "reasoning_end"])
def test_answer_now_through_the_control_call(client, live, action):
    before = metrics(live)["answered_early"]
    stream = client.chat.completions.create(model="tiny", messages=QUESTION, stream=True, max_completion_tokens=400,
                                            extra_body={"thinking_token_budget": 300})
    cid = first_text_chunk(stream).id
    assert control(live, cid, action).status_code == 200
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = chunks[-1].choices[0]
    assert last.finish_reason == "stop" and last.model_extra["finish_detail"] == "answered_early"
    assert "So the answer is" in text
    assert metrics(live)["answered_early"] == before + 1


def test_control_errors(live):
    assert control(live, "chatcmpl-unknown", "cancel").status_code == 404
    bad = control(live, "chatcmpl-unknown", "explode")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "action"
    assert httpx.post(f"{live.url}/v1/chat/completions/control", json={"id": "x", "action": "cancel"},
                      timeout=10).status_code == 401


@pytest.mark.parametrize("budget", [0, -5, 10**12, "abc"])
def test_invalid_budget_is_a_bad_request(client, budget):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=QUESTION, extra_body={"thinking_token_budget": budget})
    assert info.value.body["param"] == "thinking_token_budget"


def test_budget_beyond_the_context_is_a_bad_request(client):
    # Allowed by the server's max_budget (131072 by default) but not by the tiny model's 512-token context.
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny", messages=QUESTION, extra_body={"thinking_token_budget": 5000})


def test_wrong_key_and_unknown_model(live, client):
    stranger = openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model="tiny", messages=QUESTION)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="../weights", messages=QUESTION)
    assert info.value.body["code"] == "model_not_found"


def test_oversized_and_malformed_bodies(live):
    auth = {"Authorization": f"Bearer {KEY}"}
    big = httpx.post(f"{live.url}/v1/chat/completions", headers=auth, timeout=10,
                     json=body(messages=[{"role": "user", "content": "x" * 10_000}]))
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    broken = httpx.post(f"{live.url}/v1/chat/completions", headers={**auth, "Content-Type": "application/json"},
                        content=b"{not json", timeout=10)
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.get(f"{live.url}/v1/nothing-here", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()


def test_models_health_metrics_and_page(live, client):
    assert [m.id for m in client.models.list()] == ["tiny", "tiny-alias"]
    health = httpx.get(f"{live.url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    text = httpx.get(f"{live.url}/metrics?format=prometheus", headers=AUTH, timeout=10).text
    assert "selfbudgeter_requests_total" in text and "selfbudgeter_aborted_by_disconnect_total" in text
    page = httpx.get(f"{live.url}/", timeout=10)
    assert page.status_code == 200 and 'id="answer-now"' in page.text


def test_at_capacity_requests_get_429(generator):
    server = LiveServer(create_app(generator, ServerConfig(served_model_name="tiny", max_concurrent=1)))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=30)
        stream = client.chat.completions.create(model="tiny", messages=QUESTION, stream=True,
                                                max_completion_tokens=400, extra_body={"thinking_token_budget": 300})
        first_text_chunk(stream)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="tiny", messages=QUESTION, max_completion_tokens=2)
        assert info.value.response.headers["retry-after"] == "1"
        stream.close()
        assert wait_for(lambda: httpx.get(f"{server.url}/health", timeout=10).json()["active"] == 0)
        out = client.chat.completions.create(model="tiny", messages=QUESTION, max_completion_tokens=2)
        assert out.choices[0].finish_reason == "length"
    finally:
        server.stop()


def test_generator_failure_is_a_500(live):
    class Broken:
        def submit(self, request):
            raise RuntimeError("boom")

    server = LiveServer(create_app(Broken(), ServerConfig(served_model_name="tiny")))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="tiny", messages=QUESTION)
        assert info.value.status_code == 500 and info.value.body["type"] == "server_error"
    finally:
        server.stop()


def test_raw_stream_is_only_data_lines(live):
    request = body(stream=True, max_completion_tokens=5, thinking_token_budget=20)
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=request, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") or line == ": ping" for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert not any("<budget>" in line for line in lines)


def test_keep_alive_pings_while_no_event_comes():
    import asyncio

    from selfbudgeter.serving.server import _with_pings

    async def slow():
        await asyncio.sleep(0.25)
        yield "event"

    async def collect():
        return [item async for item in _with_pings(slow(), 0.1)]

    out = asyncio.run(collect())
    assert out[-1] == "event" and out.count(None) >= 1


def test_main_wires_the_options_into_the_app(tiny_model_dir, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.setenv("SELFBUDGETER_API_KEY", "from-env")
    assert main(["--model", str(tiny_model_dir), "--port", "8123", "--served-model-name", "tiny", "tiny2",
                 "--max-concurrent", "3", "--max-budget", "200", "--enforce-budget", "--allowed-hosts", "box.lan",
                 "--allowed-origins", "https://ui.example"]) == 0
    assert (served["host"], served["port"]) == ("127.0.0.1", 8123)
    config = served["app"].state.selfbudgeter.config
    assert (config.max_concurrent, config.max_budget, config.enforce_budget) == (3, 200, True)
    assert (config.host, config.port, config.allowed_hosts, config.allowed_origins) == (
        "127.0.0.1", 8123, ("box.lan",), ("https://ui.example",))
    with TestClient(served["app"], base_url="http://127.0.0.1:8123") as http:
        assert http.get("/health", headers={"Host": "evil.example:8123"}).status_code == 403
        assert http.get("/health", headers={"Host": "box.lan"}).status_code == 200
        assert http.get("/v1/models").status_code == 401
        models = http.get("/v1/models", headers={"Authorization": "Bearer from-env"}).json()
        assert [m["id"] for m in models["data"]] == ["tiny", "tiny2"]


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: tens of seconds on a busy CPU
def test_serve_command_starts_a_server(tiny_model_dir):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "SELFBUDGETER_API_KEY": "from-env"}
    argv = [sys.executable, "-m", "selfbudgeter.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port),
            "--served-model-name", "tiny", "tiny2", "--max-concurrent", "2", "--log-level", "warning"]
    child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return child.poll() is None and False
        assert wait_for(up, seconds=120), child.stdout.read() if child.poll() is not None else "no answer"
        assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 401
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer from-env"}, timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["tiny", "tiny2"]
    finally:
        child.terminate()
        child.wait(timeout=30)


# --- raw bodies, through the whole app -----------------------------------------------------------------------


class InstantGenerator:
    """The real request preparation (chat template, tokenizer, budget checks) with no decoding: every row
    ends at once. Lets the app see any body the way `serve` would, in milliseconds."""

    def __new__(cls, tokenizer):
        from selfbudgeter.serving.generator import BudgetGeneratorBase

        class Instant(BudgetGeneratorBase):
            def _start(self, row):
                self._finish(row, "length")

            def _start_answer(self, row):
                self._end_answer(row)

            def _shutdown(self):
                pass

        return Instant(tokenizer, system_prompt=None, max_context=512, answer_suffix="")


@pytest.fixture(scope="module")
def instant(embedded_tokenizer):
    from fastapi.testclient import TestClient

    config = ServerConfig(served_model_name="tiny", max_body_bytes=2 << 20, allowed_hosts=("testserver",))
    with TestClient(create_app(InstantGenerator(embedded_tokenizer), config), raise_server_exceptions=False) as http:
        yield http


JSON_TYPE = {"Content-Type": "application/json"}


def _post(http, content: bytes, headers=JSON_TYPE, path="/v1/chat/completions"):
    return http.post(path, content=content, headers=headers)


@pytest.mark.parametrize(
    "content, headers, status",
    [
        (b"[" * 100_000, JSON_TYPE, 400),  # nesting deeper than the JSON decoder recurses
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, JSON_TYPE, 400),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', JSON_TYPE, 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', JSON_TYPE, 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}", JSON_TYPE, 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}', JSON_TYPE, 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": ["low"]}', JSON_TYPE, 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "reasoning": {"effort": {}}}', JSON_TYPE, 400),
        (b"\xff\xfe{}", JSON_TYPE, 400),
        (b'"a string"', JSON_TYPE, 400),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', {"Content-Type": "text/plain"}, 415),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', {}, 415),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', {"Content-Type": "application/x-www-form-urlencoded"},
         415),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', {"Content-Type": "application/json; charset=utf-8"},
         200),
    ],
)
def test_raw_bodies(instant, content, headers, status):
    response = _post(instant, content, headers)
    assert response.status_code == status, response.text
    if status != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_megabyte_question_is_a_400_about_the_context(instant):
    question = [{"role": "user", "content": "2+3? " * 200_000}]
    response = instant.post("/v1/chat/completions", json=body(messages=question))
    assert response.status_code == 400 and "context" in response.json()["error"]["message"]


@settings(max_examples=120, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(BODIES)
def test_fuzzed_bodies_through_the_app_are_never_a_server_error(instant, data):
    response = _post(instant, json.dumps(data).encode())  # NaN and Infinity go out as JSON's non-standard words
    assert response.status_code < 500, response.text


def test_control_404_does_not_echo_a_huge_id(instant):
    response = instant.post("/v1/chat/completions/control", json={"id": "c" * 100_000, "action": "cancel"})
    assert response.status_code == 404 and len(response.text) < 500
    response = instant.post("/v1/chat/completions/control", json={"id": "c", "action": "a" * 100_000})
    assert response.status_code == 400 and len(response.text) < 500


def test_405_says_what_is_allowed(instant):
    response = instant.get("/v1/chat/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert instant.post("/health", json={}).headers["allow"] == "GET"


# --- cross-site safety -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyless(generator):
    """What `selfbudgeter serve` runs by default: loopback, no API key."""
    server = LiveServer(create_app(generator, ServerConfig(served_model_name="tiny", max_concurrent=8)))
    server.port = int(server.url.rsplit(":", 1)[1])
    yield server
    server.stop()


def test_a_cross_site_post_is_refused(keyless):
    # What any web page can send without a CORS preflight, with the Host a DNS-rebinding domain would give.
    response = httpx.post(f"{keyless.url}/v1/chat/completions", content=json.dumps(body(max_completion_tokens=2)),
                          headers={"Content-Type": "text/plain", "Origin": "http://evil.example",
                                   "Host": f"evil.example:{keyless.port}"}, timeout=10)
    assert response.status_code == 403 and response.json()["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize(
    "headers, status, code",
    [
        ({"Content-Type": "text/plain"}, 415, "unsupported_media_type"),  # a "simple" request: no preflight
        ({"Host": "evil.example:{port}"}, 403, "host_not_allowed"),  # DNS rebinding
        ({"Host": "127.0.0.1:1"}, 403, "host_not_allowed"),  # another port
        ({"Origin": "http://evil.example"}, 403, "origin_not_allowed"),  # CSRF from another site
        ({"Origin": "http://127.0.0.1:1"}, 403, "origin_not_allowed"),  # another local server
        ({"Origin": "null"}, 403, "origin_not_allowed"),  # sandboxed frames, file:// pages
        ({"Origin": "http://127.0.0.1:{port}"}, 200, None),  # the server's own page
        ({"Host": "localhost:{port}", "Origin": "http://localhost:{port}"}, 200, None),
        ({"Host": "[::1]:{port}"}, 200, None),
        ({}, 200, None),  # the openai client and curl send no Origin
    ],
)
def test_cross_site_checks(keyless, headers, status, code):
    headers = {"Content-Type": "application/json", **{k: v.format(port=keyless.port) for k, v in headers.items()}}
    response = httpx.post(f"{keyless.url}/v1/chat/completions", content=json.dumps(body(max_completion_tokens=2)),
                          headers=headers, timeout=30)
    assert response.status_code == status, response.text
    if code:
        assert response.json()["error"]["code"] == code


def test_a_foreign_host_cannot_read_anything(keyless):
    for path in ("/", "/health", "/metrics", "/v1/models"):
        response = httpx.get(f"{keyless.url}{path}", headers={"Host": "rebound.example"}, timeout=10)
        assert response.status_code == 403, path


@pytest.mark.parametrize(
    "config, headers, status",
    [
        ({"allowed_hosts": ("box.lan",)}, {"Host": "box.lan:{port}"}, 200),
        ({"allowed_hosts": ("box.lan",)}, {"Host": "other.lan:{port}"}, 403),
        ({"allowed_hosts": ("*",)}, {"Host": "anything.example"}, 200),
        ({"allowed_origins": ("https://ui.example",)}, {"Origin": "https://ui.example"}, 200),
        ({"allowed_origins": ("https://ui.example",)}, {"Origin": "https://ui.example:8443"}, 403),
        ({"allowed_origins": ("*",)}, {"Origin": "http://evil.example"}, 200),
        ({"host": "0.0.0.0"}, {"Host": "192.168.1.7:{port}"}, 200),  # bound to every interface: any name reaches it
        ({"host": "192.168.1.7"}, {"Host": "192.168.1.7:{port}"}, 200),
        ({"host": "192.168.1.7"}, {"Host": "evil.example:{port}"}, 403),
    ],
)
def test_allowed_hosts_and_origins_widen_the_checks(generator, config, headers, status):
    server = LiveServer(create_app(generator, ServerConfig(served_model_name="tiny", **config)))
    try:
        port = server.url.rsplit(":", 1)[1]
        response = httpx.get(f"{server.url}/health", headers={k: v.format(port=port) for k, v in headers.items()},
                             timeout=10)
        if "Origin" in headers:  # origins are checked on POSTs
            response = httpx.post(f"{server.url}/v1/chat/completions/control", json={"id": "x", "action": "cancel"},
                                  headers=headers, timeout=10)
            status = 404 if status == 200 else status
        assert response.status_code == status, response.text
    finally:
        server.stop()


def test_the_page_forbids_framing_and_foreign_scripts(keyless):
    import base64
    import hashlib
    import re

    response = httpx.get(f"{keyless.url}/", timeout=10)
    csp = response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    script = re.search(r"<script>(.*?)</script>", response.text, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp  # the page's own script runs, nothing else does
    assert " style=" not in response.text  # inline style attributes would need 'unsafe-inline'
    assert httpx.get(f"{keyless.url}/health", timeout=10).headers["x-content-type-options"] == "nosniff"


def test_metrics_need_the_key_when_one_is_set(live):
    assert httpx.get(f"{live.url}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{live.url}/metrics", headers=AUTH, timeout=10).status_code == 200
    assert httpx.get(f"{live.url}/health", timeout=10).status_code == 200  # liveness stays open


# --- isolation, the event loop, usage ----------------------------------------------------------------------------


def _raw_stream(url, request, headers=AUTH):
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=request, timeout=60, headers=headers) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def test_a_row_that_fails_inside_a_batch_fails_alone(generator, monkeypatch):
    from selfbudgeter.serving.generator import BudgetGenerator

    # Same model; a generator that holds requests for a second, so the four below share one batch.
    batching = BudgetGenerator(generator.model, generator.tokenizer, max_batch_size=4, batch_window=1.0, eager=False,
                               warmup=False)
    prepare = batching._prepare

    def poisoning(request, started):
        row = prepare(request, started)
        if "poison" in request.question:
            row.seed = "poison"  # a seed the sampler cannot take: it raises mid-batch, at the row's first step
        return row

    monkeypatch.setattr(batching, "_prepare", poisoning)
    server = LiveServer(create_app(batching, ServerConfig(served_model_name="tiny")))
    results: dict[int, list] = {}
    questions = ["What is 1+1?", "poison: what is 2+2?", "What is 3+3?", "What is 4+4?"]
    # 1e-45 made the logits inf/NaN and failed its batch-mates: now it samples greedily beside them.
    temperatures = [1.0, 1.0, 1e-45, 1.0]

    def ask(i):
        request = body(messages=[{"role": "user", "content": questions[i]}], stream=True, temperature=temperatures[i],
                       seed=i, max_completion_tokens=20, thinking_token_budget=30)
        results[i] = _raw_stream(server.url, request, headers={})

    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert batching.stats()["batches"] == 1
        assert results[1][-1]["error"]["code"] == "generation_failed"
        for i in (0, 2, 3):
            last = [c for c in results[i] if c.get("choices")][-1]["choices"][0]
            assert last["finish_reason"] == "length", results[i][-1]
        stats = httpx.get(f"{server.url}/metrics", timeout=10).json()
        assert (stats["failed"], stats["completed"]) == (1, 3)
        assert wait_for(lambda: httpx.get(f"{server.url}/health", timeout=10).json()["active"] == 0)
    finally:
        server.stop()
        batching.close()


def test_a_tiny_temperature_is_served(client):
    out = client.chat.completions.create(model="tiny", messages=QUESTION, max_completion_tokens=4, temperature=1e-45,
                                         extra_body={"thinking_token_budget": 9})
    assert out.choices[0].finish_reason == "length"


def test_tokenizing_runs_off_the_event_loop(keyless, generator, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    encode = generator._prompt  # where a request's prompt is rendered and tokenized

    def slow(question, *args):
        if "slow" in question:
            entered.set()
            release.wait(60)
        return encode(question, *args)

    monkeypatch.setattr(generator, "_prompt", slow)
    result = {}
    # Long enough to be prepared in a worker thread (short ones take a millisecond on the loop); too long for
    # the tiny model's context once tokenized, short enough to be tokenized at all.
    question = "slow: " + "what is 2+3? " * (INLINE_PREPARE_CHARS // 13 + 1)
    assert INLINE_PREPARE_CHARS < len(question) < generator._max_question_chars
    request = body(messages=[{"role": "user", "content": question}], max_completion_tokens=2)
    thread = threading.Thread(target=lambda: result.update(
        response=httpx.post(f"{keyless.url}/v1/chat/completions", json=request, timeout=90)))
    thread.start()
    try:
        assert entered.wait(30)
        # The request is inside the tokenizer now; the event loop must still answer everyone else.
        assert httpx.get(f"{keyless.url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{keyless.url}/metrics", timeout=10).json()["active"] == 0
    finally:
        release.set()
        thread.join(timeout=90)
    assert result["response"].status_code == 400 and "context" in result["response"].json()["error"]["message"]


def test_usage_counts_every_generated_token(client, live, generator):
    # No budget: the random model never writes a budget tag, so all it writes is a format error.
    out = client.chat.completions.create(model="tiny", messages=QUESTION, max_completion_tokens=5, seed=1)
    assert out.usage.completion_tokens == 5 and out.choices[0].message.model_extra["budget"] is None
    assert out.usage.completion_tokens_details.reasoning_tokens == 5
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_completion_tokens=4, seed=1,
                                                 stream=True, stream_options={"include_usage": True,
                                                                              "continuous_usage_stats": True}))
    running = [c.usage.completion_tokens for c in chunks if c.choices and c.usage is not None]
    assert running == sorted(running) and chunks[-1].usage.completion_tokens == 4


def test_metrics_agree_with_the_generator(client, live, generator):
    assert wait_for(lambda: metrics(live)["active"] == 0 and generator.stats()["active"] == 0)
    served, made = metrics(live)["tokens_generated"], generator.stats()["tokens"]
    client.chat.completions.create(model="tiny", messages=QUESTION, max_completion_tokens=6, seed=1)  # completed
    stream = client.chat.completions.create(model="tiny", messages=QUESTION, stream=True, max_completion_tokens=300)
    first_text_chunk(stream)
    stream.close()  # disconnected mid-way: the generator goes on for a step or so after the server stopped reading
    stream = client.chat.completions.create(model="tiny", messages=QUESTION, stream=True, max_completion_tokens=300)
    control(live, first_text_chunk(stream).id, "cancel")
    list(stream)
    assert wait_for(lambda: generator.stats()["active"] == 0)
    assert wait_for(lambda: metrics(live)["tokens_generated"] - served == generator.stats()["tokens"] - made)
    assert generator.stats()["tokens"] - made >= 8


def test_an_effort_preset_is_fitted_to_the_context(client):
    # "high" is 1024 tokens; the tiny model's whole context is 512.
    stream = client.chat.completions.create(model="tiny", messages=QUESTION, stream=True, max_completion_tokens=2,
                                            reasoning_effort="high")
    budgets = [c.choices[0].delta.model_extra.get("budget") for c in stream if c.choices]
    tokens = [b["tokens"] for b in budgets if b]
    assert len(tokens) == 1 and 400 < tokens[0] < 512


@pytest.fixture(scope="module")
def scripted_live(embedded_tokenizer):
    from test_generator import scripted_model

    from selfbudgeter.serving.generator import BudgetGenerator

    gen = BudgetGenerator(scripted_model(embedded_tokenizer), embedded_tokenizer, warmup=False)
    server = LiveServer(create_app(gen, ServerConfig(served_model_name="tiny")))
    yield server, gen
    server.stop()
    gen.close()


def test_usage_includes_the_budget_tag(scripted_live, embedded_tokenizer):
    server, gen = scripted_live
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
    out = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0)
    budget = out.choices[0].message.model_extra["budget"]
    assert (budget["tokens"], budget["source"]) == (12, "model")  # the scripted model's own budget
    tag = len(embedded_tokenizer.encode(fmt.render_prefill(12), add_special_tokens=False))
    usage = out.usage
    # The budget is compared with the solution's length as training measures it (not with the tokens generated
    # after the budget, which also hold the solution tags); completion_tokens counts every generated token.
    length = fmt.token_length(embedded_tokenizer, out.choices[0].message.content)
    assert (budget["used_tokens"], budget["within_budget"]) == (length, length <= 12)
    reasoning = usage.completion_tokens_details.reasoning_tokens
    assert reasoning >= length and 0 < usage.completion_tokens - reasoning <= tag
    assert usage.model_extra["budget"] == {"tokens": 12, "used_tokens": length}
    assert httpx.get(f"{server.url}/metrics", timeout=10).json()["tokens_generated"] == gen.stats()["tokens"]
