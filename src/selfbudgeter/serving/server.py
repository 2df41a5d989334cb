"""`selfbudgeter serve`: an OpenAI-compatible chat server that shows the model's own budget and lets users stop it.

Endpoints (the `openai` Python client works unchanged; extension fields ride in `extra_body` / `model_extra`):

    POST /v1/chat/completions          stream and non-stream chat completions
    POST /v1/chat/completions/control  {"id": "chatcmpl-...", "action": "cancel" | "answer_now" | "reasoning_end"}
    GET  /v1/models                    the served model name and its aliases
    GET  /health                       liveness and load
    GET  /metrics                      counters as JSON, or Prometheus text (`?format=prometheus` or Accept: text/plain)
    GET  /                             a small web page (prompt, budget and ETA, progress, Stop, Answer now)

Request fields beyond OpenAI's own (see `parse_chat_request`):
  budget      `thinking_token_budget: N` (vLLM), `thinking: {"budget_tokens": N}` (Anthropic) or
              `reasoning: {"max_tokens": N}` (OpenRouter): the server writes `<budget>N</budget>` into the
              model's turn, so the model plans a solution of about N tokens. Several given must agree.
  effort      `reasoning_effort` (or `reasoning: {"effort": ...}`) picks a budget from `EFFORT_BUDGETS`;
              an explicit number wins over an effort. `medium` (OpenAI's default) and no field at all let
              the model estimate its own budget, which is the point of SelfBudgeter. A preset is lowered to
              what fits the context after the prompt; an explicit budget that does not fit is a 400.
  cap         `max_completion_tokens` (or legacy `max_tokens`): hard cap, ends with finish_reason "length".
  enforcement `enforce_budget: true, budget_slack: 0.2`: at budget * (1 + slack) tokens the model is made to
              answer at once. The server default is `--enforce-budget`.

Where this deviates from an OpenAI server:
1. Only the last user message is the question. The model answers one question at a time, so earlier turns
   and system/developer messages are ignored (the generator supplies the budget-format system prompt the
   model was trained with); a conversation ending in an assistant message (continuation) is refused.
2. A budget tag inside a user message is plain text: only the request fields above set a budget.
3. The whole solution (reasoning and final answer) streams as `delta.content`: where the reasoning ends is
   only known once it has ended, and sending it twice (`reasoning_content` too) makes some UIs print it twice.
   The extracted final answer comes as `answer` on the message (non-stream) or on the last delta.
4. `finish_reason` is "stop", "length" or "abort" (cancelled); the generator's own reason
   ("finished", "answered_early", "format_error", ...) is the choice's `finish_detail`.
5. At `max_concurrent` running generations a request gets 429 with `Retry-After` (the client retries it).
6. `usage.completion_tokens` counts every generated token, the budget tag included (as OpenAI counts a
   reasoning model's hidden reasoning); `completion_tokens_details.reasoning_tokens` is the solution's share
   and `usage.budget.used_tokens` the count the budget is measured against: in the last usage, the
   solution's `format.token_length` (what training rewards); before it, a running count of its tokens.

Safety defaults (one bad request must not hurt others, and a web page must not drive a local server):
- Every bad input is a 4xx in OpenAI's error shape: wrong JSON types, NaN, deep nesting, lone surrogates;
  seeds must fit a signed 64-bit integer. Echoed values are truncated.
- Preparing a request (chat template, tokenizer) runs off the event loop for questions over
  `INLINE_PREPARE_CHARS` (a few milliseconds below); a question far longer than the context is refused
  before it is tokenized. A row that fails while its batch decodes ends alone.
- POSTs need `Content-Type: application/json` (415): a cross-site page can only send JSON after a CORS
  preflight, which this server never grants. `Host` must be a loopback name or the bound address on the
  port the request came in on (403, against DNS rebinding), and a POST's `Origin`, when sent, must be the
  server's own (403, against CSRF); `--allowed-hosts` / `--allowed-origins` widen both.
- The page is served with a hash-based Content-Security-Policy, `X-Frame-Options: DENY` and no referrer;
  every response has `X-Content-Type-Options: nosniff`. With `--api-key`, /metrics needs the key too;
  /health stays open for liveness probes and the page.

Backends (`--backend`): `transformers` (default, any device; `generator.BudgetGenerator`) or `vllm` (CUDA
GPUs, `pip install 'selfbudgeter[vllm]'`; `vllm_generator.VLLMBudgetGenerator`). Both have the same
interface and events, so `create_app` does not know which one it serves.
"""


import argparse
import asyncio
import inspect
import ipaddress
import json
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from ..core.errors import UserError
from ..core.format import DEFAULT_MAX_BUDGET, FormatError, validate_budget
from ..core.grading import BOXED, EXTRACTION_HELP, EXTRACTIONS
from . import generator as genlib

logger = logging.getLogger(__name__)

API_KEY_ENV = "SELFBUDGETER_API_KEY"
BACKENDS = ("transformers", "vllm")
DEFAULT_BATCH_SIZE = 16  # transformers backend: generations decoded in one `generate` call
WEB_PAGE = Path(__file__).resolve().parent / "web" / "index.html"
# Questions up to this many characters are prepared (chat template, tokenizer) on the event loop: 0.2-3 ms
# with the embedded tokenizer. A thread hop for every request cost more than it saved: under a burst of 32
# streams the budget chunk came after 0.41-0.44 s instead of 0.12-0.14 s (benchmarks/server_load.py, 2-core
# CPU shared with a training job), as submits trickled in behind the decoding thread. Longer questions go
# to a worker thread, so the loop never waits on the seconds a megabyte of text can take.
INLINE_PREPARE_CHARS = 4096

# reasoning_effort -> budget in tokens (None: the model states its own). Fixed numbers rather than fractions of
# a "typical" budget: a typical budget is only known after serving traffic, and a preset must mean the same
# thing on every request. Presets above the server's --max-budget are lowered to it. Override with
# --effort-budgets.
EFFORT_BUDGETS: dict[str, int | None] = {
    "none": 16,
    "minimal": 64,
    "low": 256,
    "medium": None,
    "high": 1024,
    "xhigh": 4096,
}

# generator FinalEvent.finish_reason -> OpenAI finish_reason ("abort" is vLLM's name for a cancelled request).
FINISH_REASONS = {
    "finished": "stop",
    "answered_early": "stop",
    "format_error": "stop",
    "length": "length",
    "stopped": "abort",
}


@dataclass
class ServerConfig:
    served_model_name: str = "selfbudgeter"
    aliases: tuple[str, ...] = ()
    api_key: str | None = None
    max_concurrent: int = 64
    max_budget: int = DEFAULT_MAX_BUDGET
    max_body_bytes: int = 1 << 20  # a question is text; a megabyte is far beyond any context window
    enforce_budget: bool = False
    budget_slack: float = 0.2
    effort_budgets: dict[str, int | None] = field(default_factory=lambda: dict(EFFORT_BUDGETS))
    ping_seconds: float = 10.0  # `: ping` keep-alive while no token comes (proxies drop idle streams)
    retry_after_seconds: int = 1
    # The address the server is bound to: requests must name it (or a loopback name) in `Host`, which
    # defeats DNS rebinding. The port checked is the one each request came in on (`port` when unknown).
    host: str = "127.0.0.1"
    port: int = 0
    allowed_hosts: tuple[str, ...] = ()  # more names for `Host` (a reverse proxy's); "*": any
    allowed_origins: tuple[str, ...] = ()  # more origins that may POST (a separate web UI's); "*": any

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise UserError(f"max_concurrent must be at least 1, got {self.max_concurrent}")
        if self.max_budget < 1:
            raise UserError(f"max_budget must be at least 1, got {self.max_budget}")
        if self.max_body_bytes < 1024:
            raise UserError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.budget_slack < 0:
            raise UserError(f"budget_slack must be >= 0, got {self.budget_slack}")

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.served_model_name, *self.aliases)


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
             415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _shown(value: Any) -> str:
    """A request value as an error message echoes it: short whatever its size or depth."""
    import reprlib

    shown = reprlib.Repr()
    shown.maxstring = shown.maxother = shown.maxlong = 40
    shown.maxlevel, shown.maxlist, shown.maxdict = 2, 4, 4
    return shown.repr(value)


@dataclass(frozen=True)
class ChatParams:
    """A validated chat request: what the generator needs plus how to answer."""

    question: str
    budget: int | None
    max_new_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    enforce_budget: bool
    slack: float
    stream: bool
    include_usage: bool
    continuous_usage: bool
    fit_budget: bool = False  # a reasoning_effort preset: lowered to what fits the context, never refused

    def generation_kwargs(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "budget": self.budget,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "enforce_budget": self.enforce_budget,
            "slack": self.slack,
            "fit_budget": self.fit_budget,
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # NaN and infinities fail every range check below, but say so here too: `nan <= 2` is merely False.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optional(body: dict[str, Any], param: str, check: Callable[[Any], bool], kind: str, default: Any = None,
              name: str | None = None) -> Any:
    """body[param], or `default` when absent or null; a 400 naming the field when `check` refuses it."""
    value = body.get(param)
    if value is None:
        return default
    if not check(value):
        raise _bad(f"{name or param} must be {kind}; got {_shown(value)}", name or param)
    return value


def _text(value: str, param: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad("the text is not valid Unicode (it contains a lone surrogate)", param) from None
    return value


def _message_text(content: Any, index: int) -> str:
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return _text(content, param)
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad("only text content parts are supported", param)
            texts.append(_text(part["text"], param))
        return "\n".join(texts)
    raise _bad("message content must be a string or a list of text parts", param)


def _question(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    last_user = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad("each message must be an object with a role", f"messages[{i}]")
        if message["role"] == "user":
            last_user = i
    if last_user is None:
        raise _bad("messages contain no user message", "messages")
    if last_user != len(messages) - 1:
        raise _bad("the last message must be the user's question; continuing an assistant message is not "
                   "supported (set the budget with thinking_token_budget instead)", "messages")
    text = _message_text(messages[last_user].get("content"), last_user)
    if not text.strip():
        raise _bad("the question is empty", f"messages[{last_user}].content")
    return text


def _checked_budget(value: Any, param: str, max_budget: int) -> int:
    if not _is_int(value):  # "40" is a caller's bug, not a budget (format.validate_budget also reads tag text)
        raise _bad(f"{param} must be an integer from 1 to {max_budget}; got {_shown(value)}", param, "invalid_budget")
    try:
        return validate_budget(value, max_budget)
    except FormatError as err:
        raise _bad(f"{param} must be an integer from 1 to {max_budget}; got {_shown(value)} ({err.reason})",
                   param, "invalid_budget") from None


def _budget(body: dict[str, Any], config: ServerConfig) -> tuple[int | None, bool]:
    """The budget the request sets, and whether it is a preset (fitted to the context rather than refused)."""
    is_object = lambda value: isinstance(value, dict)  # noqa: E731
    thinking = _optional(body, "thinking", is_object, "an object", {})
    reasoning = _optional(body, "reasoning", is_object, "an object", {})
    given = {
        "thinking_token_budget": body.get("thinking_token_budget"),
        "thinking.budget_tokens": thinking.get("budget_tokens"),
        "reasoning.max_tokens": reasoning.get("max_tokens"),
    }
    budgets = {param: _checked_budget(v, param, config.max_budget) for param, v in given.items() if v is not None}
    if len(set(budgets.values())) > 1:
        raise _bad(f"conflicting budgets: {', '.join(f'{k}={v}' for k, v in budgets.items())}", next(iter(budgets)))
    if budgets:
        return next(iter(budgets.values())), False
    is_str = lambda value: isinstance(value, str)  # noqa: E731
    effort, param = _optional(body, "reasoning_effort", is_str, "a string"), "reasoning_effort"
    if effort is None:
        effort, param = _optional(reasoning, "effort", is_str, "a string", name="reasoning.effort"), "reasoning.effort"
    kind = _optional(thinking, "type", is_str, "a string", name="thinking.type")
    if effort is None and kind == "disabled":
        effort, param = "none", "thinking.type"
    if effort is None:
        return None, False
    if effort not in config.effort_budgets:
        raise _bad(f"{param} must be one of {', '.join(config.effort_budgets)}; got {_shown(effort)}", param)
    preset = config.effort_budgets[effort]
    return (None, False) if preset is None else (min(preset, config.max_budget), True)


def parse_chat_request(body: Any, config: ServerConfig) -> ChatParams:
    """Validate a chat-completions body; raise ApiError (400/404) naming the offending field. Everything it
    lets through passes `generator.check_request`, so no request fails later for a value it could have seen."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = _optional(body, "model", lambda v: isinstance(v, str), "a string")
    if model is not None and model not in config.model_names:
        raise ApiError(404, f"the model {_shown(model)} does not exist; this server serves "
                       f"{', '.join(map(repr, config.model_names))}", param="model", code="model_not_found")
    question = _question(body.get("messages"))
    _optional(body, "n", lambda v: _is_int(v) and v == 1, "1 (one choice per request)")

    is_bool = lambda value: isinstance(value, bool)  # noqa: E731
    stream = _optional(body, "stream", is_bool, "a boolean", False)
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise _bad("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict):
            raise _bad("stream_options must be an object", "stream_options")
    options = options or {}
    include_usage = _optional(options, "include_usage", is_bool, "a boolean", False,
                              name="stream_options.include_usage")
    continuous = _optional(options, "continuous_usage_stats", is_bool, "a boolean", False,
                           name="stream_options.continuous_usage_stats")

    positive = lambda value: _is_int(value) and value >= 1  # noqa: E731
    cap = _optional(body, "max_completion_tokens", positive, "a positive integer")
    if cap is None:
        cap = _optional(body, "max_tokens", positive, "a positive integer")

    temperature = _optional(body, "temperature", lambda v: _is_number(v) and 0 <= v <= 2, "a number from 0 to 2",
                            0.6)
    top_p = _optional(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]", 1.0)
    seed = _optional(body, "seed", lambda v: _is_int(v) and 0 <= v <= genlib.MAX_SEED,
                     f"an integer from 0 to {genlib.MAX_SEED} (2**63 - 1)")

    enforce = _optional(body, "enforce_budget", is_bool, "a boolean", config.enforce_budget)
    slack = _optional(body, "budget_slack", lambda v: _is_number(v) and 0 <= v <= 10, "a number from 0 to 10",
                      config.budget_slack)
    budget, fit = _budget(body, config)

    return ChatParams(
        question=question,
        budget=budget,
        max_new_tokens=cap,
        temperature=float(temperature),
        top_p=float(top_p),
        seed=seed,
        enforce_budget=enforce,
        slack=float(slack),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        fit_budget=fit,
    )


class Metrics:
    """Server counters. Touched only from the event loop, so no lock."""

    COUNTERS = ("requests", "rejected_busy", "errors", "completed", "answered_early", "cancelled",
                "aborted_by_disconnect", "failed", "tokens_generated")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.COUNTERS, 0)
        self.started = time.time()

    def add(self, name: str, amount: int = 1) -> None:
        self.counts[name] += amount

    def snapshot(self, active: int, generator_stats: dict[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = {**self.counts, "active": active, "uptime_seconds": round(time.time() - self.started, 1)}
        if generator_stats:
            out["generator"] = generator_stats
        return out

    @staticmethod
    def prometheus(snapshot: dict[str, Any]) -> str:
        lines = []
        for name, value in snapshot.items():
            if not _is_number(value):
                continue
            kind = "gauge" if name in ("active", "uptime_seconds") else "counter"
            metric = f"selfbudgeter_{name}" + ("_total" if kind == "counter" else "")
            lines += [f"# TYPE {metric} {kind}", f"{metric} {value}"]
        return "\n".join(lines) + "\n"


@dataclass
class _Live:
    """One running generation, findable by its completion id for the control call."""

    handle: Any
    generated_tokens: int = 0  # as of the last event the server saw
    cancelled: bool = False


class _State:
    def __init__(self, generator: Any, config: ServerConfig) -> None:
        self.generator = generator
        self.config = config
        self.metrics = Metrics()
        self.live: dict[str, _Live] = {}
        self.starting = 0  # requests whose prompt is being prepared off the loop: each holds a slot
        self._counting: set[asyncio.Task] = set()

    def finish(self, cid: str, final: Any | None, *, failed: bool = False) -> None:
        """Account for a generation that ended. `final` is None when it ended early: the client went away,
        or (`failed`) the server could not go on. Idempotent: the first call counts."""
        live = self.live.pop(cid, None)
        if live is None:
            return
        if final is None:
            live.handle.stop()  # frees the batch slot within one decode step
            if failed:
                self.metrics.add("failed")
            elif live.cancelled:
                self.metrics.add("cancelled")
            else:
                self.metrics.add("aborted_by_disconnect")
                logger.info("%s: client went away after %d tokens; generation stopped", cid, live.generated_tokens)
            self._count_when_ended(live, failed)
            return
        self.metrics.add("tokens_generated", final.generated_tokens)
        if live.cancelled or final.finish_reason == "stopped":
            self.metrics.add("cancelled")
        else:
            self.metrics.add("completed")
            if final.finish_reason == "answered_early":
                self.metrics.add("answered_early")

    def _count_when_ended(self, live: _Live, failed: bool) -> None:
        """Count a stopped generation's tokens from its final event, which comes within a decode step of the
        stop: tokens made after the server stopped listening were made all the same, and the generator
        counts them too."""

        async def count() -> None:
            final = None
            try:
                async for event in _events(live.handle):
                    final = event
            except Exception:  # it failed: the tokens seen are all that can be known
                pass
            made = getattr(final, "generated_tokens", None) if isinstance(final, genlib.FinalEvent) else None
            self.metrics.add("tokens_generated", live.generated_tokens if made is None else made)

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if failed or loop is None:
            self.metrics.add("tokens_generated", live.generated_tokens)
            return
        task = loop.create_task(asyncio.wait_for(count(), timeout=120))
        self._counting.add(task)
        task.add_done_callback(self._counting.discard)

    def stats(self) -> dict[str, Any]:
        stats = getattr(self.generator, "stats", None)
        try:
            return stats() if callable(stats) else {}
        except Exception:  # metrics must answer even when the generator is in trouble
            logger.exception("generator.stats() failed")
            return {}


def _budget_info(event: Any) -> dict[str, Any]:
    eta = event.eta_seconds
    return {"tokens": event.budget, "source": event.source,
            "eta_seconds": None if eta is None else round(float(eta), 2)}


def _usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int, budget: int | None,
           used_tokens: int, eta: float | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "budget": {"tokens": budget, "used_tokens": used_tokens},
    }
    if eta is not None:
        usage["budget"]["eta_seconds"] = round(float(eta), 2)
    return usage


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _events(handle: Any) -> AsyncIterator[Any]:
    iterator = handle.aiter()
    if inspect.isawaitable(iterator):
        iterator = await iterator
    async for event in iterator:
        yield event


async def _with_pings(events: AsyncIterator[Any], seconds: float) -> AsyncIterator[Any]:
    """The events, with None whenever `seconds` pass without one (the caller sends a keep-alive)."""
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(events.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=seconds)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                event = task.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        if pending is not None:
            pending.cancel()


class _Tracker:
    """Follows one generation's events into the numbers a response reports.

    `completion_tokens` is every generated token (budget tag, solution, forced answer), as OpenAI counts a
    reasoning model's hidden reasoning in it; `reasoning_tokens` is the solution's share, without the budget
    tag and the answer forced by answer-now; `budget.used_tokens` is what the budget is measured against."""

    def __init__(self, classes: dict[str, type], prompt_tokens: int) -> None:
        self.classes = classes
        self.prompt_tokens = prompt_tokens
        self.budget: Any = None
        self.tag_tokens = 0
        self.answer_from: int | None = None  # generated tokens when the forced answer began
        self.generated_tokens = 0
        self.used_tokens = 0
        self.eta: float | None = None

    def kind(self, event: Any) -> str:
        for name, cls in self.classes.items():
            if isinstance(event, cls):
                return name
        raise TypeError(f"unexpected generator event {type(event).__name__}")

    def see_budget(self, event: Any) -> None:
        self.budget = event
        self.tag_tokens = self.generated_tokens = event.generated_tokens

    def see_text(self, event: Any) -> None:
        self.used_tokens = event.used_tokens
        self.generated_tokens = event.generated_tokens
        self.eta = event.eta_seconds
        if event.phase == "answer" and self.answer_from is None:
            self.answer_from = event.generated_tokens

    def usage(self, final: Any | None = None) -> dict[str, Any]:
        generated = final.generated_tokens if final is not None else self.generated_tokens
        used = final.used_tokens if final is not None else self.used_tokens
        answer = 0 if self.answer_from is None else generated - self.answer_from
        reasoning = max(0, generated - self.tag_tokens - answer)
        budget = final.budget if final is not None else (self.budget.budget if self.budget else None)
        return _usage(self.prompt_tokens, generated, reasoning, budget, used, None if final else self.eta)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN and Infinity; OpenAI's API does not


def _stop_submitted(future: Any) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().stop()


def _error_response(err: ApiError):
    """OpenAI's error shape. ASCII JSON: an echoed lone surrogate cannot break the encoding."""
    from starlette.responses import Response

    return Response(json.dumps(err.body()), status_code=err.status, headers=err.headers,
                    media_type="application/json")


def _page_policy(page: str) -> str:
    """Content-Security-Policy for the web page: its own inline script and style (by hash) and requests to
    this server; nothing else runs or loads, and no other site may frame it."""
    import base64
    import hashlib
    import re

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"
                        for text in found) or "'none'"

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _split_host(host: str) -> tuple[str, int | None] | None:
    """`Host` as (name, port); None when malformed. `[::1]:8000` -> ("::1", 8000)."""
    host = host.strip().lower()
    if host.startswith("["):
        name, sep, rest = host[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    else:
        name, sep, port = host.partition(":")
        port = port if sep else None
    if not name or (port is not None and not (port.isascii() and port.isdigit() and len(port) <= 5)):
        return None
    return name, int(port) if port is not None else None


def _host_allowed(host: str, config: ServerConfig, listening_port: int | None = None) -> bool:
    """Whether a request's `Host` names this server. DNS rebinding points a hostile name at the server's
    address, so the browser sends that name: only loopback names and the bound address, on the port the
    server listens on, and `allowed_hosts` pass. A server bound to every interface (0.0.0.0, ::) is reached
    by names it cannot know: there only `allowed_hosts`, when given, restrict it."""
    if not host or "*" in config.allowed_hosts:
        return True  # no Host at all: HTTP/1.0, never a browser
    split = _split_host(host)
    if split is None:
        return False
    name, port = split
    if name in {h.lower() for h in config.allowed_hosts}:
        return True  # a reverse proxy's name; its port is the proxy's
    listening = listening_port or config.port
    if listening and (port or 80) != listening:
        return False
    bound = config.host.strip("[]").lower()
    if _is_loopback(name) or name == bound:
        return True
    return bound in ("0.0.0.0", "::", "") and not config.allowed_hosts


def _origin_allowed(origin: str, host: str, config: ServerConfig) -> bool:
    """Whether a POST's `Origin` may use the server: its own page (same origin as `Host`) or one of
    `allowed_origins`. "null" (sandboxed frames, file:// pages) never is."""
    origin = origin.strip().lower().rstrip("/")
    allowed = {o.strip().lower().rstrip("/") for o in config.allowed_origins}
    if "*" in allowed or origin in allowed:
        return True
    scheme, sep, netloc = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and netloc == host.strip().lower()


def _cross_site_error(method: str, headers: dict[str, str], config: ServerConfig,
                      listening_port: int | None = None) -> ApiError | None:
    host = headers.get("host", "")
    if not _host_allowed(host, config, listening_port):
        return ApiError(403, f"Host {_shown(host)} is not this server's address (DNS rebinding?); serve other "
                        "names with --allowed-hosts", param=None, code="host_not_allowed")
    origin = headers.get("origin")
    if method not in ("GET", "HEAD", "OPTIONS") and origin is not None and not _origin_allowed(origin, host, config):
        return ApiError(403, f"requests from the web page at {_shown(origin)} are refused (cross-site); allow it "
                        "with --allowed-origins", code="origin_not_allowed")
    return None


class _Guard:
    """ASGI middleware: the cross-site checks every request passes before any route sees it, and
    `X-Content-Type-Options: nosniff` on every response."""

    def __init__(self, app: Any, config: ServerConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for key, value in scope.get("headers", []):
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        server = scope.get("server") or (None, None)  # the socket the request came in on
        error = _cross_site_error(scope["method"], headers, self.config, server[1])
        if error is not None:
            await _error_response(error)(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(generator: Any, config: ServerConfig | None = None):
    """The FastAPI app serving `generator` (a BudgetGenerator or VLLMBudgetGenerator, already loaded) under
    `config`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServerConfig()
    state = _State(generator, config)
    classes = {"budget": genlib.BudgetEvent, "text": genlib.TextEvent, "final": genlib.FinalEvent}
    page = WEB_PAGE.read_text(encoding="utf-8") if WEB_PAGE.exists() else "<p>web page missing</p>"
    page_headers = {"Content-Security-Policy": _page_policy(page), "X-Frame-Options": "DENY",
                    "Referrer-Policy": "no-referrer"}
    created = int(time.time())

    class SSEResponse(StreamingResponse):
        """A StreamingResponse that runs `on_close` however it ends: Starlette cancels the body on a disconnect,
        and a body generator suspended at `yield` would only see that when garbage-collected."""

        def __init__(self, content, *, on_close, **kwargs):
            super().__init__(content, **kwargs)
            self.on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    app = FastAPI(title="selfbudgeter", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.selfbudgeter = state
    app.add_middleware(_Guard, config=config)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        if request.url.path.startswith("/v1/chat/completions"):
            state.metrics.add("errors")
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        # 405 carries `Allow` in the exception's headers.
        return _error_response(ApiError(err.status_code, str(err.detail), code=None, headers=err.headers))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        logger.exception("internal error on %s", request.url.path)
        return _error_response(ApiError(500, "internal server error; see the server log", code="internal_error"))

    def authorize(request: Request) -> None:
        if not config.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not _constant_time_equal(token.strip(), config.api_key):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request) -> Any:
        # A cross-site page can POST text/plain or a form without a CORS preflight; JSON needs one.
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            raise ApiError(415, f"send the body as JSON with Content-Type: application/json (got "
                           f"{_shown(media or None)})", code="unsupported_media_type")
        limit = config.max_body_bytes
        too_big = ApiError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise too_big
        data = bytearray()
        async for chunk in request.stream():  # also bounds chunked bodies that carry no Content-Length
            data += chunk
            if len(data) > limit:
                raise too_big
        try:
            return json.loads(data, parse_constant=_no_constant)
        except (ValueError, RecursionError) as err:  # bad encoding or syntax, NaN, >4300 digits, deep nesting
            reason = "it nests too deeply" if isinstance(err, RecursionError) else str(err)[:200]
            raise _bad(f"the request body is not valid JSON: {reason}") from None

    async def prepare(request: Any) -> Any:
        """generator.submit off the event loop: it renders the chat template and tokenizes the question."""
        future = asyncio.get_running_loop().run_in_executor(None, generator.submit, request)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:  # the client left meanwhile: stop what the submit starts
            future.add_done_callback(_stop_submitted)
            raise

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page, headers=page_headers)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.served_model_name, "active": len(state.live),
                "max_concurrent": config.max_concurrent, "auth": bool(config.api_key)}

    @app.get("/metrics")
    async def metrics(request: Request):
        authorize(request)
        snapshot = state.metrics.snapshot(len(state.live), state.stats())
        accept = request.headers.get("accept", "")
        wants_text = request.query_params.get("format") == "prometheus" or (
            "text/plain" in accept and "application/json" not in accept)
        if wants_text:
            return PlainTextResponse(Metrics.prometheus(snapshot), media_type="text/plain; version=0.0.4")
        return snapshot

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        data = [{"id": name, "object": "model", "created": created, "owned_by": "selfbudgeter",
                 "max_budget": config.max_budget} for name in config.model_names]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions/control")
    async def control(request: Request):
        authorize(request)
        body = await read_json(request)
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        cid, action = body.get("id"), body.get("action")
        if action not in ("cancel", "answer_now", "reasoning_end"):
            raise _bad(f"action must be cancel, answer_now or reasoning_end; got {_shown(action)}", "action")
        live = state.live.get(cid) if isinstance(cid, str) else None
        if live is None:
            raise ApiError(404, f"no running completion with id {_shown(cid)}", param="id",
                           code="completion_not_found")
        if action == "cancel":
            live.cancelled = True
            live.handle.stop()
        else:
            live.handle.answer_now()
        logger.info("%s: %s requested", cid, action)
        return {"id": cid, "action": action, "status": "accepted"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        state.metrics.add("requests")
        params = parse_chat_request(await read_json(request), config)
        if len(state.live) + state.starting >= config.max_concurrent:
            state.metrics.add("rejected_busy")
            raise ApiError(429, f"the server is running its maximum of {config.max_concurrent} generations; "
                           "retry shortly", code="server_busy",
                           headers={"Retry-After": str(config.retry_after_seconds)})
        state.starting += 1
        try:
            generation = genlib.GenerationRequest(**params.generation_kwargs())
            if len(params.question) <= INLINE_PREPARE_CHARS:
                handle = generator.submit(generation)
            else:
                handle = await prepare(generation)
        except (UserError, ValueError) as err:
            raise _bad(str(err), "thinking_token_budget" if "budget" in str(err).lower() else None) from None
        finally:
            state.starting -= 1
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        state.live[cid] = _Live(handle)
        prompt_tokens = getattr(handle, "prompt_tokens", 0)
        tracker = _Tracker(classes, prompt_tokens if isinstance(prompt_tokens, int) else 0)
        logger.debug("%s: submitted (budget=%s, stream=%s)", cid, params.budget, params.stream)
        if params.stream:
            return SSEResponse(_stream(cid, params, tracker), on_close=lambda: state.finish(cid, None),
                                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _complete(request, cid, tracker)

    def chunk(cid: str, delta: dict[str, Any] | None, *, finish: str | None = None,
              extra: dict[str, Any] | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                                   "model": config.served_model_name, "choices": []}
        if delta is not None:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **(extra or {})}
            payload["choices"].append(choice)
        if usage is not None:
            payload["usage"] = usage
        return payload

    async def _stream(cid: str, params: ChatParams, tracker: _Tracker) -> AsyncIterator[str]:
        live = state.live[cid]
        final = None
        try:
            yield _sse(chunk(cid, {"role": "assistant", "content": ""}))
            async for event in _with_pings(_events(live.handle), config.ping_seconds):
                if event is None:
                    yield ": ping\n\n"
                    continue
                kind = tracker.kind(event)
                usage = None
                if kind == "budget":
                    tracker.see_budget(event)
                    live.generated_tokens = event.generated_tokens
                    if params.continuous_usage:
                        usage = tracker.usage()
                    yield _sse(chunk(cid, {"content": None, "budget": _budget_info(event)}, usage=usage))
                elif kind == "text":
                    tracker.see_text(event)
                    live.generated_tokens = event.generated_tokens
                    if params.continuous_usage:
                        usage = tracker.usage()
                    yield _sse(chunk(cid, {"content": event.text}, usage=usage))
                else:
                    final = event
                    extra = {"finish_detail": final.finish_reason}
                    usage = tracker.usage(final) if params.continuous_usage else None
                    finish = FINISH_REASONS.get(final.finish_reason, "stop")
                    yield _sse(chunk(cid, {"answer": final.answer}, finish=finish, extra=extra, usage=usage))
                    state.finish(cid, final)
                    if params.include_usage:
                        yield _sse(chunk(cid, None, usage=tracker.usage(final)))
                    break
            if final is None:
                raise RuntimeError("the generator ended without a final event")
        except Exception as err:  # headers are sent: the error goes in-band, where the openai client raises it
            logger.exception("%s: generation failed", cid)
            state.finish(cid, None, failed=True)
            yield _sse(ApiError(500, f"generation failed: {type(err).__name__}", code="generation_failed").body())
        yield "data: [DONE]\n\n"

    async def _complete(request: Request, cid: str, tracker: _Tracker):
        live = state.live[cid]
        parts: list[str] = []

        async def collect():
            async for event in _events(live.handle):
                kind = tracker.kind(event)
                if kind == "budget":
                    tracker.see_budget(event)
                    live.generated_tokens = event.generated_tokens
                elif kind == "text":
                    tracker.see_text(event)
                    live.generated_tokens = event.generated_tokens
                    parts.append(event.text)
                else:
                    return event
            raise RuntimeError("the generator ended without a final event")

        # Poll for a disconnect while waiting: a client that times out should free its batch slot too.
        task = asyncio.ensure_future(collect())
        final = None
        try:
            while not (await asyncio.wait({task}, timeout=0.25))[0]:
                if await request.is_disconnected():
                    state.finish(cid, None)
                    return JSONResponse({}, status_code=499)  # nobody reads it; nginx's "client closed request"
            final = task.result()
        except Exception:
            state.finish(cid, None, failed=True)
            raise
        finally:
            task.cancel()
            if final is None:  # this request itself was cancelled (server shutdown)
                state.finish(cid, None)
        state.finish(cid, final)
        budget = None
        if final.budget is not None:
            budget = {"tokens": final.budget, "source": final.budget_source,
                      "eta_seconds": _budget_info(tracker.budget)["eta_seconds"] if tracker.budget else None,
                      "used_tokens": final.used_tokens, "within_budget": final.within_budget}
        message = {"role": "assistant", "content": "".join(parts) or final.solution, "budget": budget,
                   "answer": final.answer}
        return {
            "id": cid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": config.served_model_name,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": FINISH_REASONS.get(final.finish_reason, "stop"),
                         "finish_detail": final.finish_reason}],
            "usage": tracker.usage(final),
        }

    return app


def _constant_time_equal(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage dump
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _effort_budgets(text: str) -> dict[str, int | None]:
    budgets = dict(EFFORT_BUDGETS)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in EFFORT_BUDGETS:
            raise argparse.ArgumentTypeError(f"expected NAME=N with NAME in {', '.join(EFFORT_BUDGETS)}; got {item!r}")
        if value in ("", "model", "none", "None"):
            budgets[name] = None
            continue
        try:
            budgets[name] = validate_budget(value)
        except FormatError as err:
            raise argparse.ArgumentTypeError(f"{name}: {err}") from None
    return budgets


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def make_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="selfbudgeter serve",
        description="Serve a self-budgeting model behind an OpenAI-compatible API (/v1/chat/completions) with "
        "budget streaming, stop and answer-now, plus a web page at /. The model is loaded once, at start-up.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Example: selfbudgeter serve --model runs/demo/grpo --port 8000, then open http://127.0.0.1:8000/ "
        "or use the openai client with base_url=http://127.0.0.1:8000/v1. "
        f"The API key may also come from ${API_KEY_ENV}.",
    )
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="model directory (or `embedded`, or a cached hub id) to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs care")
    parser.add_argument("--port", type=_port, default=8000)
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help=f"require `Authorization: Bearer KEY` on /v1 and /metrics (default: ${API_KEY_ENV}, "
                        "else none)")
    parser.add_argument("--allowed-hosts", nargs="+", default=[], metavar="NAME",
                        help="names besides the bound address and localhost that clients may reach the server by "
                        "(the Host header; a reverse proxy's name), or `*` for any")
    parser.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                        help="web origins besides the server's own page that may POST to it "
                        "(e.g. https://ui.example.com), or `*` for any")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="name clients put in `model`; extra names are aliases (default: the model folder's name)")
    parser.add_argument("--max-concurrent", type=_positive, default=64,
                        help="running generations beyond which requests get 429")
    parser.add_argument("--max-budget", type=_positive, default=DEFAULT_MAX_BUDGET,
                        help="largest budget a request may set")
    parser.add_argument("--max-body-bytes", type=_positive, default=1 << 20, help="largest request body")
    parser.add_argument("--enforce-budget", action="store_true",
                        help="by default, make the model answer once it uses budget*(1+slack) tokens")
    parser.add_argument("--budget-slack", type=float, default=0.2, help="default slack for budget enforcement")
    parser.add_argument("--effort-budgets", type=_effort_budgets, default=dict(EFFORT_BUDGETS), metavar="NAME=N,...",
                        help="reasoning_effort presets to change, e.g. low=128,high=2048 "
                        "(`medium=model`: the model decides)")
    parser.add_argument("--backend", default="transformers", choices=BACKENDS,
                        help="generation backend: transformers (any device) or vllm (CUDA GPUs, "
                        "pip install 'selfbudgeter[vllm]')")
    parser.add_argument("--max-batch-size", type=_positive, default=None,
                        help=f"generations decoded together (unset: {DEFAULT_BATCH_SIZE} with transformers, "
                        "vLLM's own max_num_seqs with vllm)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weight dtype")
    parser.add_argument("--answer-extraction", "--answer_extraction", dest="answer_extraction", default=BOXED,
                        choices=EXTRACTIONS, help=EXTRACTION_HELP)
    parser.add_argument("--tensor-parallel-size", type=_positive, default=1,
                        help="vllm: GPUs one model is split over")
    parser.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9,
                        help="vllm: share of each GPU's memory the engine takes (weights + KV cache)")
    parser.add_argument("--max-model-len", type=_positive, default=None,
                        help="vllm: context length to reserve KV cache for (unset: the model's)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_generator(args: argparse.Namespace):
    """The generator `args.backend` names, with the model loaded: the one place `serve` picks a backend."""
    if args.backend == "vllm":
        from .vllm_generator import VLLMBudgetGenerator

        return VLLMBudgetGenerator.from_pretrained(
            args.model,
            dtype=args.dtype,
            tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            max_batch_size=args.max_batch_size,
            answer_extraction=args.answer_extraction,
        )
    from .generator import BudgetGenerator

    return BudgetGenerator.from_pretrained(args.model, dtype=args.dtype, answer_extraction=args.answer_extraction,
                                           max_batch_size=args.max_batch_size or DEFAULT_BATCH_SIZE)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from ..core import models

    models.resolve(args.model)  # a missing path fails here, in one line, before any heavy import
    names = args.served_model_name or [Path(str(args.model)).name or str(args.model)]
    config = ServerConfig(
        served_model_name=names[0],
        aliases=tuple(names[1:]),
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_concurrent=args.max_concurrent,
        max_budget=args.max_budget,
        max_body_bytes=args.max_body_bytes,
        enforce_budget=args.enforce_budget,
        budget_slack=args.budget_slack,
        effort_budgets=args.effort_budgets,
        host=args.host,
        port=args.port,
        allowed_hosts=tuple(args.allowed_hosts),
        allowed_origins=tuple(args.allowed_origins),
    )
    if not config.api_key and not _is_loopback(args.host):
        logger.warning("serving on %s without an API key: anyone who can reach it can use the model", args.host)

    import uvicorn

    generator = load_generator(args)
    try:
        app = create_app(generator, config)
        logger.info("serving %s as %r on http://%s:%d/", args.model, config.served_model_name, args.host, args.port)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        generator.close()
    return 0
