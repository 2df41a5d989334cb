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
              the model estimate its own budget, which is the point of SelfBudgeter.
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
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from .errors import UserError
from .format import DEFAULT_MAX_BUDGET, FormatError, validate_budget

logger = logging.getLogger(__name__)

API_KEY_ENV = "SELFBUDGETER_API_KEY"
BACKENDS = ("transformers", "vllm")
DEFAULT_BATCH_SIZE = 16  # transformers backend: generations decoded in one `generate` call
WEB_PAGE = Path(__file__).resolve().parent / "web" / "index.html"

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

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

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
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _message_text(content: Any, index: int) -> str:
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad("only text content parts are supported", param)
            texts.append(part["text"])
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
    try:
        return validate_budget(value, max_budget)
    except FormatError as err:
        shown = value if not isinstance(value, str) else repr(value[:20])
        raise _bad(f"{param} must be an integer from 1 to {max_budget}; got {shown} ({err.reason})",
                   param, "invalid_budget") from None


def _budget(body: dict[str, Any], config: ServerConfig) -> int | None:
    thinking = body.get("thinking")
    reasoning = body.get("reasoning")
    if thinking is not None and not isinstance(thinking, dict):
        raise _bad("thinking must be an object", "thinking")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise _bad("reasoning must be an object", "reasoning")
    thinking, reasoning = thinking or {}, reasoning or {}
    given = {
        "thinking_token_budget": body.get("thinking_token_budget"),
        "thinking.budget_tokens": thinking.get("budget_tokens"),
        "reasoning.max_tokens": reasoning.get("max_tokens"),
    }
    budgets = {param: _checked_budget(v, param, config.max_budget) for param, v in given.items() if v is not None}
    if len(set(budgets.values())) > 1:
        raise _bad(f"conflicting budgets: {', '.join(f'{k}={v}' for k, v in budgets.items())}", next(iter(budgets)))
    if budgets:
        return next(iter(budgets.values()))
    effort, param = body.get("reasoning_effort"), "reasoning_effort"
    if effort is None and reasoning.get("effort") is not None:
        effort, param = reasoning["effort"], "reasoning.effort"
    if effort is None and thinking.get("type") == "disabled":
        effort, param = "none", "thinking.type"
    if effort is None:
        return None
    if effort not in config.effort_budgets:
        raise _bad(f"{param} must be one of {', '.join(config.effort_budgets)}; got {effort!r}", param)
    preset = config.effort_budgets[effort]
    return None if preset is None else min(preset, config.max_budget)


def parse_chat_request(body: Any, config: ServerConfig) -> ChatParams:
    """Validate a chat-completions body; raise ApiError (400/404) naming the offending field."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model not in config.model_names:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                       f"{', '.join(map(repr, config.model_names))}", param="model", code="model_not_found")
    question = _question(body.get("messages"))
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad("only n=1 is supported", "n")

    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise _bad("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict):
            raise _bad("stream_options must be an object", "stream_options")
    options = options or {}
    include_usage = bool(options.get("include_usage"))
    continuous = bool(options.get("continuous_usage_stats"))

    cap = None
    for param in ("max_completion_tokens", "max_tokens"):
        value = body.get(param)
        if value is not None:
            if not _is_int(value) or value < 1:
                raise _bad(f"{param} must be a positive integer; got {value!r}", param)
            cap = value
            break

    temperature = body.get("temperature", 0.6)
    temperature = 0.6 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise _bad(f"temperature must be a number from 0 to 2; got {temperature!r}", "temperature")
    top_p = body.get("top_p", 1.0)
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise _bad(f"top_p must be a number in (0, 1]; got {top_p!r}", "top_p")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _bad(f"seed must be an integer; got {seed!r}", "seed")

    enforce = body.get("enforce_budget", config.enforce_budget)
    enforce = config.enforce_budget if enforce is None else enforce
    if not isinstance(enforce, bool):
        raise _bad("enforce_budget must be a boolean", "enforce_budget")
    slack = body.get("budget_slack", config.budget_slack)
    slack = config.budget_slack if slack is None else slack
    if not _is_number(slack) or not 0 <= slack <= 10:
        raise _bad(f"budget_slack must be a number from 0 to 10; got {slack!r}", "budget_slack")

    return ChatParams(
        question=question,
        budget=_budget(body, config),
        max_new_tokens=cap,
        temperature=float(temperature),
        top_p=float(top_p),
        seed=seed,
        enforce_budget=enforce,
        slack=float(slack),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
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
    used_tokens: int = 0
    cancelled: bool = False


class _State:
    def __init__(self, generator: Any, config: ServerConfig) -> None:
        self.generator = generator
        self.config = config
        self.metrics = Metrics()
        self.live: dict[str, _Live] = {}

    def finish(self, cid: str, final: Any | None, *, failed: bool = False) -> None:
        """Account for a generation that ended. `final` is None when it ended early: the client went away,
        or (`failed`) the server could not go on. Idempotent: the first call counts."""
        live = self.live.pop(cid, None)
        if live is None:
            return
        if final is None:
            live.handle.stop()  # frees the batch slot within one decode step
            self.metrics.add("tokens_generated", live.used_tokens)
            if failed:
                self.metrics.add("failed")
            elif live.cancelled:
                self.metrics.add("cancelled")
            else:
                self.metrics.add("aborted_by_disconnect")
                logger.info("%s: client went away after %d tokens; generation stopped", cid, live.used_tokens)
            return
        self.metrics.add("tokens_generated", final.used_tokens)
        if live.cancelled or final.finish_reason == "stopped":
            self.metrics.add("cancelled")
        else:
            self.metrics.add("completed")
            if final.finish_reason == "answered_early":
                self.metrics.add("answered_early")

    def stats(self) -> dict[str, Any]:
        stats = getattr(self.generator, "stats", None)
        try:
            return stats() if callable(stats) else {}
        except Exception:  # metrics must answer even when the generator is in trouble
            logger.exception("generator.stats() failed")
            return {}


def _budget_info(event: Any) -> dict[str, Any]:
    eta = event.eta_seconds
    return {"tokens": event.tokens, "source": event.source,
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
    """Follows one generation's events into the numbers a response reports."""

    def __init__(self, classes: dict[str, type], count_prompt: Callable[[], int]) -> None:
        self.classes = classes
        self._count_prompt = count_prompt
        self._prompt_tokens: int | None = None
        self.budget: Any = None
        self.reasoning_tokens = 0
        self.used_tokens = 0
        self.eta: float | None = None

    def kind(self, event: Any) -> str:
        for name, cls in self.classes.items():
            if isinstance(event, cls):
                return name
        raise TypeError(f"unexpected generator event {type(event).__name__}")

    def see_text(self, event: Any) -> None:
        self.used_tokens = event.used_tokens
        self.eta = event.eta_seconds
        if event.phase == "solution":
            self.reasoning_tokens = event.used_tokens

    @property
    def prompt_tokens(self) -> int:
        # Counted on first use, after the budget went out: it costs a chat-template render and a tokenization.
        if self._prompt_tokens is None:
            self._prompt_tokens = self._count_prompt()
        return self._prompt_tokens

    def usage(self, final: Any | None = None) -> dict[str, Any]:
        used = final.used_tokens if final is not None else self.used_tokens
        reasoning = self.reasoning_tokens if self.reasoning_tokens <= used else used
        if final is not None and final.finish_reason != "answered_early":
            reasoning = used  # no forced answer: every generated token belongs to the solution
        budget = final.budget if final is not None else (self.budget.tokens if self.budget else None)
        return _usage(self.prompt_tokens, used, reasoning, budget, used, None if final else self.eta)


def _prompt_tokens(generator: Any, handle: Any, params: ChatParams) -> int:
    """Prompt length for `usage`: the handle's own count when it has one, else the prompt rendered the way
    the generator renders it (data.prompt_text); 0 when neither is possible."""
    count = getattr(handle, "prompt_tokens", None)
    if isinstance(count, int):
        return count
    tokenizer = getattr(generator, "tokenizer", None)
    if tokenizer is None:
        return 0
    from .data import SYSTEM_PROMPT, prompt_text

    try:
        system = getattr(generator, "system_prompt", SYSTEM_PROMPT)
        text = prompt_text(tokenizer, params.question, budget=params.budget, system_prompt=system)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception:
        logger.debug("could not count prompt tokens", exc_info=True)
        return 0


def create_app(generator: Any, config: ServerConfig | None = None):
    """The FastAPI app serving `generator` (a BudgetGenerator or VLLMBudgetGenerator, already loaded) under
    `config`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from . import generator as genlib

    config = config or ServerConfig()
    state = _State(generator, config)
    classes = {"budget": genlib.BudgetEvent, "text": genlib.TextEvent, "final": genlib.FinalEvent}
    page = WEB_PAGE.read_text(encoding="utf-8") if WEB_PAGE.exists() else "<p>web page missing</p>"
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

    def error_response(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        if request.url.path.startswith("/v1/chat/completions"):
            state.metrics.add("errors")
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return error_response(ApiError(err.status_code, str(err.detail), code=None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        logger.exception("internal error on %s", request.url.path)
        return error_response(ApiError(500, "internal server error; see the server log", code="internal_error"))

    def authorize(request: Request) -> None:
        if not config.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not _constant_time_equal(token.strip(), config.api_key):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request) -> Any:
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
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _bad(f"the request body is not valid JSON: {err}") from None

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.served_model_name, "active": len(state.live),
                "max_concurrent": config.max_concurrent, "auth": bool(config.api_key)}

    @app.get("/metrics")
    async def metrics(request: Request):
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
            raise _bad(f"action must be cancel, answer_now or reasoning_end; got {action!r}", "action")
        live = state.live.get(cid) if isinstance(cid, str) else None
        if live is None:
            raise ApiError(404, f"no running completion with id {cid!r}", param="id", code="completion_not_found")
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
        if len(state.live) >= config.max_concurrent:
            state.metrics.add("rejected_busy")
            raise ApiError(429, f"the server is running its maximum of {config.max_concurrent} generations; "
                           "retry shortly", code="server_busy",
                           headers={"Retry-After": str(config.retry_after_seconds)})
        try:
            handle = generator.submit(genlib.GenerationRequest(**params.generation_kwargs()))
        except (UserError, ValueError) as err:
            raise _bad(str(err), "thinking_token_budget" if "budget" in str(err).lower() else None) from None
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        state.live[cid] = _Live(handle)
        tracker = _Tracker(classes, lambda: _prompt_tokens(generator, handle, params))
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
                    tracker.budget = event
                    if params.continuous_usage:
                        usage = tracker.usage()
                    yield _sse(chunk(cid, {"content": None, "budget": _budget_info(event)}, usage=usage))
                elif kind == "text":
                    tracker.see_text(event)
                    live.used_tokens = event.used_tokens
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
                    tracker.budget = event
                elif kind == "text":
                    tracker.see_text(event)
                    live.used_tokens = event.used_tokens
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
                        help=f"require `Authorization: Bearer KEY` on /v1 (default: ${API_KEY_ENV}, else none)")
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
        )
    from .generator import BudgetGenerator

    return BudgetGenerator.from_pretrained(args.model, dtype=args.dtype,
                                           max_batch_size=args.max_batch_size or DEFAULT_BATCH_SIZE)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from . import models

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
