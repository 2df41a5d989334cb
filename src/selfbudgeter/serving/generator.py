"""Budget-first generation: the library the chat CLI and the server both drive.

A request is a question (and optionally a user budget). A request that finds the generator idle starts at
once (`eager`, the default); while a batch decodes, requests that arrive within `batch_window` of each other
are batched into the next `model.generate` call. Calls run in worker threads, and each row's tokens become
events: one `BudgetEvent` as soon as the budget is known (decoded, or pre-filled by the user), `TextEvent`s of
solution text (never tag characters), and one `FinalEvent`. Every request can be stopped or asked to
answer now, from any thread, while its batch-mates keep going.

How it sits on transformers, and where it goes beyond the plain `generate` call:
1. Per-row control inside one batched `generate`: a `BaseStreamer` receives each step's tokens for the whole
   batch and a `StoppingCriteria` returns a per-row bool tensor, so one row can end (stop, answer now,
   its own token cap, `</solution>`) while the others continue; when every row has ended, `generate` returns.
2. Per-row sampling: a `LogitsProcessor` draws each row's token with its own temperature and top-p through
   `generation.draw`, the sampler of `eval` and `profile` (a counter-based random number per seed and step),
   and leaves only the chosen token finite; `generate` then runs greedy. A request's seed therefore
   reproduces its output whatever its batch-mates are, and a request with seed S gets the text
   `generation.generate` gives its prompt for seed S (the row's seed is `generation.sample_seed(S, prompt
   text, 0)`, as there), up to floating point and as long as the model's `generation_config` adds no logits
   processors of its own (`generate` of `eval` ignores them, `serve` applies them).
3. Answer-now runs a short greedy follow-up for that row alone from prompt + response so far + an
   answer-forcing suffix (`answer_suffix`, default `"\\nSo the answer is \\\\boxed{"`), ending when the
   suffix's open brace closes, at `</solution>`, at EOS or after `answer_cap` tokens. Follow-ups run on
   their own thread so they do not wait for the batch the row came from.
4. Several batches may run at once (`max_concurrent_batches`): a request that arrives while a long batch is
   decoding starts at once instead of queueing behind it. This is not continuous batching; rows do not join
   a running `generate` call.

Token accounting (the spec leaves it open): `generated_tokens` counts every token the model generated for a
request (budget tag, solution, forced answer; EOS and padding excluded), and `max_new_tokens` caps it, like
OpenAI's `max_completion_tokens`. `used_tokens` is what a budget is compared with: on the `FinalEvent` it is
`format.token_length` of the solution, the length training rewards and evaluation measure (the text between
the solution tags, the answer-forcing suffix included); on a `TextEvent` it is the running count of tokens
generated since the solution began, the cheap estimate of it (it may be a few tokens over while a closing
tag is being written). With `enforce_budget`, answer-now fires when the running count reaches
`int(budget * (1 + slack))`, so at most `answer_cap` more tokens are generated after that.

Containment: a row whose sampling or event parsing raises ends alone (its handle raises the error) while its
batch-mates go on; only an error of the batched forward pass itself fails the whole batch. Requests are
checked before they queue (`check_request`): seeds fit a signed 64-bit integer (what vLLM takes),
temperatures below `generation.SAMPLING_EPS` sample greedily (vLLM's rule; 1e-45 would overflow the
logits), and text the user typed is encoded as text, never as the chat template's control tokens.

Beyond the spec: `GenerationHandle` also supports `async for` directly, `done`, `budget` and
`result(timeout)`; every iterator over a handle sees every event (events are kept per handle); an error in
generation is raised from iteration and `result()`. `BudgetGenerator` is a context manager.

Backends: everything above that is not decoding (validation, prompts, parsing into events, enforcement,
answer-now's suffix and forced tokens, accounting) lives in `BudgetGeneratorBase`; `BudgetGenerator` decodes
with transformers and `vllm_generator.VLLMBudgetGenerator` with vLLM's async engine.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

from ..core import format as fmt
from ..core.errors import UserError
from ..core.grading import BOXED, extractor
from ..data import SYSTEM_PROMPT, prompt_text
from ..evaluation.generation import SAMPLING_EPS, draw, sample_seed, seed_tensor

logger = logging.getLogger(__name__)

DEFAULT_ANSWER_SUFFIX = "\nSo the answer is \\boxed{"
# Used for ETAs until the first decode steps are measured (warm-up disabled or too short to time).
FALLBACK_TOKENS_PER_SECOND = 20.0
# Weight of the newest decode step in the speed EMA: smooths per-step jitter over ~20 steps.
SPEED_EMA = 0.05
# Tokens of prompt kept as left context when decoding incrementally (a SentencePiece leading space, a
# byte-level merge across the prompt boundary): the same window vLLM's detokenizer uses.
DECODE_CONTEXT = 5
# Largest seed: vLLM's SamplingParams (and torch.Generator.manual_seed) take a signed 64-bit integer.
MAX_SEED = 2**63 - 1


class _Default:
    """The generator's default system prompt (None would mean: no system prompt)."""

    def __repr__(self) -> str:
        return "DEFAULT"


_UNSET: Any = _Default()


@dataclass(frozen=True)
class GenerationRequest:
    question: str  # user text; budget tags inside it are plain text, never a prefill
    budget: int | None = None  # user budget, written into the assistant turn via format.render_prefill
    max_new_tokens: int | None = None  # hard cap on generated tokens; None = model default or remaining context
    temperature: float = 0.6
    top_p: float = 1.0
    seed: int | None = None
    enforce_budget: bool = False  # at int(budget * (1 + slack)) used tokens, answer now by itself
    slack: float = 0.2
    answer_cap: int = 32  # max tokens of the forced final answer after answer-now
    system_prompt: str | None = _UNSET  # default: the generator's
    fit_budget: bool = False  # lower a budget that does not fit the context after the prompt instead of refusing it


@dataclass(frozen=True)
class BudgetEvent(fmt.BudgetEvent):
    """The budget is known: `format.BudgetEvent` (`budget`), with where it came from and when."""

    source: str  # "model" | "user"
    eta_seconds: float  # budget / measured decode speed
    elapsed: float  # seconds since the request started
    generated_tokens: int = 0  # tokens generated so far: the budget tag's, or 0 for a user budget


@dataclass(frozen=True)
class TextEvent(fmt.TextEvent):
    """Solution text (`format.TextEvent`: never tag characters), with the counts so far."""

    used_tokens: int  # tokens generated since the solution began (the FinalEvent has the exact length)
    eta_seconds: float | None
    phase: str  # "solution" | "answer" (text forced by answer-now)
    generated_tokens: int = 0  # every generated token so far, budget tag included


@dataclass(frozen=True)
class FinalEvent:
    answer: str | None  # grading.extract_answer of the solution
    solution: str  # full solution text
    response: str  # full raw response (budget tag + solution), for logging
    budget: int | None
    budget_source: str | None
    used_tokens: int  # format.token_length of the solution when there is a budget, else 0
    within_budget: bool | None  # used_tokens <= budget
    finish_reason: str  # "finished" | "stopped" | "answered_early" | "length" | "format_error"
    format_error: str | None
    seconds_to_budget: float | None
    seconds_total: float
    generated_tokens: int = 0  # every generated token: budget tag, solution and forced answer (EOS excluded)


Event = BudgetEvent | TextEvent | FinalEvent
FINISH_REASONS = ("finished", "stopped", "answered_early", "length", "format_error")


class GenerationHandle:
    """One submitted request: iterate its events, stop it, or ask it to answer now. Thread-safe."""

    def __init__(self, request: GenerationRequest, generator: BudgetGeneratorBase):
        self.id = f"gen-{uuid.uuid4().hex[:12]}"
        self.request = request
        self._generator = generator
        self._events: list[Event] = []
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._stop = threading.Event()
        self._answer_now = threading.Event()
        self.prompt_tokens = 0  # length of the prompt the model reads, set when the request is prepared

    def stop(self) -> None:
        """End generation within one decode step; the FinalEvent says "stopped"."""
        self._stop.set()
        self._generator._on_control(self)

    def answer_now(self) -> None:
        """Close the reasoning and force the final answer (at most `answer_cap` tokens)."""
        self._answer_now.set()
        self._generator._on_control(self)

    @property
    def done(self) -> bool:
        with self._cond:
            return self._error is not None or bool(self._events) and isinstance(self._events[-1], FinalEvent)

    @property
    def budget(self) -> BudgetEvent | None:
        with self._cond:
            return next((e for e in self._events if isinstance(e, BudgetEvent)), None)

    def __iter__(self) -> Iterator[Event]:
        index = 0
        while True:
            with self._cond:
                while index >= len(self._events) and self._error is None:
                    self._cond.wait()
                if index >= len(self._events):
                    raise RuntimeError(f"generation {self.id} failed: {self._error}") from self._error
                event = self._events[index]
            index += 1
            yield event
            if isinstance(event, FinalEvent):
                return

    async def aiter(self) -> AsyncIterator[Event]:
        """Events for asyncio code; waiting never blocks the event loop."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        with self._cond:
            self._waiters.append((loop, wake))
        try:
            index = 0
            while True:
                # Clear before reading: an event pushed after the read sets `wake` again.
                wake.clear()
                with self._cond:
                    new, error = self._events[index:], self._error
                if not new:
                    if error is not None:
                        raise RuntimeError(f"generation {self.id} failed: {error}") from error
                    await wake.wait()
                    continue
                index += len(new)
                for event in new:
                    yield event
                    if isinstance(event, FinalEvent):
                        return
        finally:
            with self._cond:
                self._waiters.remove((loop, wake))

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.aiter()

    def result(self, timeout: float | None = None) -> FinalEvent:
        """Wait for the FinalEvent (TimeoutError after `timeout` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not (self._events and isinstance(self._events[-1], FinalEvent)):
                if self._error is not None:
                    raise RuntimeError(f"generation {self.id} failed: {self._error}") from self._error
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"generation {self.id} not finished after {timeout} s")
                self._cond.wait(left)
            return self._events[-1]  # type: ignore[return-value]

    def _push(self, event: Event) -> None:
        with self._cond:
            if self._events and isinstance(self._events[-1], FinalEvent):
                return  # a token that raced with stop(): the request has already ended
            self._events.append(event)
            self._cond.notify_all()
            waiters = list(self._waiters)
        self._wake(waiters)

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()
            waiters = list(self._waiters)
        self._wake(waiters)

    @staticmethod
    def _wake(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
        for loop, wake in waiters:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass


class _Detokenizer:
    """Incremental decoding of one row: emits the new text suffix, waiting out incomplete characters."""

    def __init__(self, tokenizer, context_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(context_ids[-DECODE_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # a multi-byte character or a merge not complete yet
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]


class _TagFilter:
    """Keeps budget-format tags out of emitted text. Inside a well-formed solution the format parser already
    hides them; after a format error it passes the rest through raw, tags included. Removed: the four tags,
    and a closing tag that lost its `>` (`</budget`, which no prose or code writes; `<budget` without `>`
    may be code, `cost<budget`, and stays). Text that may still become a tag is held back; at the end a held
    partial tag is dropped (tag characters, not text), as the format parser does at the end of a solution."""

    PATTERN = re.compile("|".join([re.escape(fmt.BUDGET_OPEN), re.escape(fmt.SOLUTION_OPEN),
                                   re.escape(fmt.BUDGET_CLOSE[:-1]) + ">?", re.escape(fmt.SOLUTION_CLOSE[:-1]) + ">?"]))

    def __init__(self) -> None:
        self.held = ""

    def feed(self, text: str) -> str:
        text = self.held + text
        while True:  # removing one tag may join the text around it into another
            stripped = self.PATTERN.sub("", text)
            if stripped == text:
                break
            text = stripped
        hold = max((n for tag in fmt.TAGS for n in range(1, len(tag)) if text.endswith(tag[:n])), default=0)
        self.held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]


class _Row:
    """The state of one request while it runs."""

    def __init__(self, handle: GenerationHandle, prompt_ids: list[int], max_new: int, max_budget: int, started: float,
                 seed: int):
        request = handle.request
        self.handle = handle
        self.request = request
        self.prompt_ids = prompt_ids
        self.max_new = max_new
        self.started = started
        self.parser = fmt.StreamParser(max_budget)
        self.generated: list[int] = []  # every generated token id (EOS excluded)
        self.response = ""  # raw text of the response, tags included
        self.solution = ""  # what the TextEvents carried
        self.budget: int | None = None
        self.budget_source: str | None = None
        self.budget_time: float | None = None
        self.used = 0  # tokens generated since the solution began (the running estimate of its length)
        self.solution_from: int | None = None  # generated tokens before the solution's first
        self.in_solution = False  # the solution tag is behind us: forced text lands inside the solution
        self.closed = False  # no more tokens from the main generation
        self.final: FinalEvent | None = None
        self.answering = False  # handed to the answer thread
        self.running = False  # a worker has taken it: only that worker (or the answer thread) ends it
        self.lock = threading.Lock()
        self.seed = seed  # the row's own: generation.sample_seed of the request's seed and the prompt text
        self.seeds = None  # `seed` as generation.draw takes it, made at the first step
        self.detok: _Detokenizer | None = None
        self.budget_hint: int | None = None  # the user's budget, validated
        self.tags = _TagFilter()


class _Streamer:
    """Receives every decode step's tokens for the batch and turns them into per-row events."""

    def __init__(self, gen: BudgetGenerator, rows: list[_Row]):
        self.gen = gen
        self.rows = rows
        self.prompt_seen = False
        self.last_step: float | None = None

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt ids
            self.prompt_seen = True
            return
        now = time.perf_counter()
        if self.last_step is not None:  # the first step's interval includes the prefill
            self.gen._record_step(now - self.last_step)
        self.last_step = now
        for row, token in zip(self.rows, value.tolist()):
            if not row.closed:
                try:
                    self.gen._on_token(row, token)
                except Exception as err:  # this row's failure, not its batch-mates'
                    self.gen._fail_row(row, err)

    def end(self) -> None:
        pass


def _make_criteria(rows: list[_Row]):
    import torch
    from transformers import StoppingCriteria

    class RowsDone(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            flags = [row.closed or row.handle._stop.is_set() for row in rows]
            return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

    return RowsDone()


def _make_sampler(gen: BudgetGenerator, rows: list[_Row], width: int):
    import torch
    from transformers import LogitsProcessor

    class RowSampler(LogitsProcessor):
        """Each row's token from `generation.draw` with the row's seed and settings; the step counts from the
        batch's prompt width, as `generation.SeededSampler` does."""

        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - width
            chosen = torch.argmax(scores, dim=-1)
            for i, row in enumerate(rows):
                if row.closed:
                    continue
                try:
                    if row.seeds is None:
                        row.seeds = seed_tensor([row.seed])
                    request = row.request
                    chosen[i] = draw(scores[i : i + 1], row.seeds, step, request.temperature, request.top_p)[0]
                except Exception as err:  # the row ends with its error; the batch goes on without it
                    gen._fail_row(row, err)
            out = torch.full_like(scores, float("-inf"))
            out.scatter_(1, chosen[:, None], 0.0)
            return out

    return RowSampler()


@dataclass
class _Stats:
    requests: int = 0
    finished: int = 0
    stopped: int = 0
    aborted: int = 0
    answered_early: int = 0
    length: int = 0
    format_error: int = 0
    tokens: int = 0
    batches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)



class BudgetGeneratorBase:
    """What every backend shares: validating requests and building their prompts, parsing the response into
    events, enforcement, the answer-now suffix and forced-answer tokens, finishing, speed and stats.

    A backend decodes: `_start(row)` runs a submitted row and calls `_on_token` for each generated token;
    `_start_answer(row)` is called once a row has stopped decoding to answer now, and runs the greedy
    follow-up through `_begin_answer`, `_answer_token` and `_end_answer`; `_shutdown()` ends its workers.
    It may also override `_on_control` (stop or answer-now was asked, from any thread), `_queue_size`,
    `_model_context` and `_generation_defaults`.
    """

    def __init__(
        self,
        tokenizer,
        *,
        system_prompt: str | None,
        max_context: int | None,
        answer_suffix: str,
        answer_extraction: str = BOXED,
    ):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.answer_suffix = answer_suffix
        # How FinalEvent.answer is read: `boxed` (grading.extract_answer), or `lenient` for a model trained on
        # prose answers that box nothing (grading.extract_answer_lenient, docs/grading.md).
        try:
            self._extract_answer = extractor(answer_extraction)
        except ValueError as err:
            raise UserError(str(err)) from None
        self.max_context = max_context or self._model_context()
        self._suffix_ids = tokenizer.encode(answer_suffix, add_special_tokens=False) if answer_suffix else []
        self._special_texts = _special_texts(tokenizer)
        self._max_question_chars = _max_question_chars(tokenizer, self.max_context)
        self._eos_ids = self._eos_token_ids()
        self._step_seconds: float | None = None
        self._speed_lock = threading.Lock()
        self._stats = _Stats()
        self._active: set[GenerationHandle] = set()
        self._queued: dict[str, _Row] = {}  # submitted, not yet taken by a worker
        self._active_lock = threading.Lock()
        self._closed = False

    # --- public API ------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Validate and queue a request; its budget event is out at once when the user set the budget."""
        if self._closed:
            raise RuntimeError("the generator is closed")
        started = time.perf_counter()
        row = self._prepare(request, started)
        handle = row.handle
        with self._stats.lock:
            self._stats.requests += 1
        with self._active_lock:
            self._active.add(handle)
        if request.budget is not None:
            # The user's budget is known before any decoding: the parser sees the pre-filled tags first.
            self._feed(row, fmt.render_prefill(row.budget_hint), source="user")
            row.in_solution = True
            row.solution_from = 0  # every generated token is the solution's
        self._queued[handle.id] = row
        self._start(row)
        return handle

    def generate(self, request: GenerationRequest) -> FinalEvent:
        return self.submit(request).result()

    def stream(self, request: GenerationRequest) -> Iterator[Event]:
        return iter(self.submit(request))

    @property
    def tokens_per_second(self) -> float:
        """Decode speed of one request (steps per second), an EMA over measured decode steps."""
        with self._speed_lock:
            step = self._step_seconds
        return 1.0 / step if step else FALLBACK_TOKENS_PER_SECOND

    def stats(self) -> dict:
        with self._active_lock:
            active = len(self._active)
        with self._stats.lock:
            s = self._stats
            return {
                "requests": s.requests,
                "active": active,
                "queued": self._queue_size(),
                "finished": s.finished,
                "stopped": s.stopped,
                "aborted": s.aborted,
                "answered_early": s.answered_early,
                "length": s.length,
                "format_error": s.format_error,
                "tokens": s.tokens,
                "batches": s.batches,
                "tokens_per_second": self.tokens_per_second,
            }

    def close(self) -> None:
        """Stop every request still running or queued and end the backend's workers."""
        if self._closed:
            return
        self._closed = True
        with self._active_lock:
            active = list(self._active)
        for handle in active:
            handle.stop()
        self._shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- what a backend provides ------------------------------------------------------------------------

    def _start(self, row: _Row) -> None:
        raise NotImplementedError

    def _start_answer(self, row: _Row) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        raise NotImplementedError

    def _queue_size(self) -> int:
        return len(self._queued)

    def _generation_defaults(self):
        """The model's `GenerationConfig` (eos ids, a default `max_new_tokens`), or None."""
        return None

    def _on_control(self, handle: GenerationHandle) -> None:
        """stop() or answer_now() was called on `handle`, from any thread."""
        if handle._stop.is_set():
            self._stop_queued(handle)

    # --- preparing requests ----------------------------------------------------------------------------

    def _model_context(self) -> int:
        length = getattr(self.tokenizer, "model_max_length", None)
        return int(length) if length and length < 10**7 else 4096

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self._generation_defaults(), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
        return ids

    def _prepare(self, request: GenerationRequest, started: float) -> _Row:
        check_request(request)
        q = request.question
        if len(q) > self._max_question_chars:  # refused without the seconds a megabyte takes to tokenize
            raise UserError(f"the question is {len(q)} characters: more than the model's context of "
                            f"{self.max_context} tokens can hold")
        system = self.system_prompt if request.system_prompt is _UNSET else request.system_prompt
        text, base_ids = self._prompt(q, None, system)
        room = self.max_context - len(base_ids)
        if room < 1:
            raise UserError(f"the prompt is {len(base_ids)} tokens; the model's context is {self.max_context}")
        budget = None
        if request.budget is not None:
            try:
                if isinstance(request.budget, str):  # "120" is not an int: a caller bug, not a budget
                    raise fmt.FormatError("budget_not_integer", "a string")
                budget = fmt.validate_budget(request.budget, None if request.fit_budget else room)
            except fmt.FormatError as err:
                raise UserError(_budget_message(request.budget, err, room)) from None
            if request.fit_budget:
                budget = min(budget, room)
            text, prompt_ids = self._prompt(q, budget, system)
            left = self.max_context - len(prompt_ids)
            if request.fit_budget and 1 <= left < budget:
                # The pre-filled tag takes room too: fit the budget to what is left after it (fewer digits
                # only shorten the tag).
                budget = left
                text, prompt_ids = self._prompt(q, budget, system)
        else:
            prompt_ids = base_ids
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise UserError(f"the prompt is {len(prompt_ids)} tokens; the model's context is {self.max_context}")
        default_cap = getattr(self._generation_defaults(), "max_new_tokens", None)
        max_new = min(request.max_new_tokens or default_cap or room, room)
        # The seed `generation.generate` gives this prompt's first sample: the same seed, the same text.
        seed = sample_seed(request.seed, text, 0) if request.seed is not None else random.randrange(2**63)
        row = _Row(GenerationHandle(request, self), prompt_ids, max_new, max(1, room), started, seed)
        row.handle.prompt_tokens = len(prompt_ids)
        row.budget_hint = budget
        row.detok = _Detokenizer(self.tokenizer, prompt_ids)
        return row

    def encode_prompt(self, question: str, *, budget: int | None = None,
                      system_prompt: str | None = _UNSET) -> list[int]:
        """Token ids of the model's prompt for `question` (see `data.prompt_text`). The chat template's control
        tokens are control tokens; the user's text is text: a special token the user typed (`<|im_end|>`,
        `<|assistant|>`) is encoded as the characters it is made of, so a user cannot forge turns. A question
        without special-token text is encoded as the whole prompt text, exactly as in training."""
        system = self.system_prompt if system_prompt is _UNSET else system_prompt
        return self._prompt(question, budget, system)[1]

    def _prompt(self, question: str, budget: int | None, system: str | None) -> tuple[str, list[int]]:
        """The prompt text (`data.prompt_text`, what `eval` samples from) and its ids (`encode_prompt`)."""
        text = prompt_text(self.tokenizer, question, budget=budget, system_prompt=system)
        found = [special for special in self._special_texts if special in question]
        if not found:
            return text, self._encode(text)
        # Where the question sits in the prompt: render once more with a marker the template leaves alone.
        marker = f"SELFBUDGETERQUESTION{uuid.uuid4().hex}"
        template = prompt_text(self.tokenizer, marker, budget=budget, system_prompt=system)
        if template.count(marker) == 1:
            head, tail = template.split(marker)
            for inner in (question, question.strip()):  # some templates trim the content
                if head + inner + tail == text:
                    return text, self._encode(head) + self._encode(inner, special=False) + self._encode(tail)
        raise UserError(f"the question contains {found[0]!r}, a control token of this model, and its chat "
                        "template changes the question so that it cannot be kept as plain text")

    def _encode(self, text: str, special: bool = True) -> list[int]:
        # The chat template already wrote any BOS the model wants. `special=False`: special-token text is
        # split into ordinary tokens (transformers' `split_special_tokens`).
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"])

    # --- speed ------------------------------------------------------------------------------------------

    def _record_step(self, seconds: float) -> None:
        with self._speed_lock:
            if self._step_seconds is None:
                self._step_seconds = seconds
            else:
                self._step_seconds += SPEED_EMA * (seconds - self._step_seconds)

    def _eta(self, remaining: int) -> float:
        return max(0, remaining) / self.tokens_per_second

    # --- events -----------------------------------------------------------------------------------------

    def _feed(self, row: _Row, text: str, source: str = "model", phase: str = "solution") -> bool:
        """Pass decoded text through the row's parser and publish its events; True at `</solution>`."""
        row.response += text
        ended = False
        for event in row.parser.feed(text):
            if isinstance(event, fmt.BudgetEvent):
                row.budget, row.budget_source = event.budget, source
                row.budget_time = time.perf_counter()
                row.in_solution = source == "user"
                row.handle._push(
                    BudgetEvent(
                        budget=event.budget,
                        source=source,
                        eta_seconds=self._eta(event.budget),
                        elapsed=row.budget_time - row.started,
                        generated_tokens=len(row.generated),
                    )
                )
            elif isinstance(event, fmt.TextEvent):
                row.in_solution = True
                self._emit_text(row, event.text, phase)
            elif isinstance(event, fmt.SolutionEndEvent):
                ended = True
            elif isinstance(event, fmt.FormatErrorEvent):
                row.in_solution = True
                logger.debug("%s: format error %s (%s)", row.handle.id, event.reason, event.detail)
        return ended

    def _emit_text(self, row: _Row, text: str, phase: str) -> None:
        text = row.tags.feed(text)
        if not text:
            return
        if row.solution_from is None and row.budget is not None:
            # The token being fed carries the solution's first text.
            row.solution_from = max(0, len(row.generated) - 1)
            self._count_used(row)
        row.solution += text
        if phase == "answer":
            eta = None
        else:
            eta = self._eta(row.budget - row.used) if row.budget is not None else None
        row.handle._push(TextEvent(text=text, used_tokens=row.used, eta_seconds=eta, phase=phase,
                                   generated_tokens=len(row.generated)))

    def _on_token(self, row: _Row, token: int) -> None:
        """One generated token of a row in the main generation (called on the thread that decodes it)."""
        if row.handle._stop.is_set():
            self._finish(row, "stopped")
            return
        if token in self._eos_ids:
            self._finish(row, "finished")
            return
        row.generated.append(token)
        self._count_used(row)
        ended = self._feed(row, row.detok.add([token]))
        if ended:
            self._finish(row, "finished")
            return
        if len(row.generated) >= row.max_new:
            self._finish(row, "length")
            return
        limit = self._enforce_limit(row)
        if limit is not None and row.used >= limit:
            row.handle.answer_now()
        # Answer-now waits until the solution has begun, so the forced suffix lands inside it (a few
        # tokens at most: the budget tag comes first).
        if row.handle._answer_now.is_set() and row.in_solution:
            row.closed = row.answering = True
            self._start_answer(row)

    @staticmethod
    def _count_used(row: _Row) -> None:
        if row.solution_from is not None:
            row.used = len(row.generated) - row.solution_from

    @staticmethod
    def _enforce_limit(row: _Row) -> int | None:
        if not row.request.enforce_budget or row.budget is None:
            return None
        return max(1, int(row.budget * (1 + row.request.slack)))

    def _finish(self, row: _Row, reason: str) -> None:
        with row.lock:
            if row.final is not None:
                return
            self._finalize(row, reason)

    def _stop_queued(self, handle: GenerationHandle) -> None:
        """A request stopped before any worker took it ends now, not when a worker becomes free."""
        row = self._queued.get(handle.id)
        if row is None:
            return
        with row.lock:
            if row.running or row.final is not None:
                return
            self._finalize(row, "stopped")

    def _finalize(self, row: _Row, reason: str) -> None:
        row.closed = True
        self._queued.pop(row.handle.id, None)
        format_error = None
        if reason == "finished":
            # Flush what the parser holds back and learn whether the response was complete.
            for event in row.parser.close():
                if isinstance(event, fmt.TextEvent):
                    self._emit_text(row, event.text, "solution")
        if row.parser.error is not None:
            format_error = row.parser.error.reason
            truncated = reason != "finished" and format_error in ("unclosed_solution", "missing_solution")
            if truncated:  # cut short on purpose, not a model error
                format_error = None
            elif reason == "finished":
                reason = "format_error"
        now = time.perf_counter()
        # The solution's length as training and evaluation measure it, not the running count: that one also
        # has the solution tags' tokens and misses the answer suffix's.
        used = 0 if row.budget is None else fmt.token_length(self.tokenizer, row.solution)
        final = FinalEvent(
            answer=self._extract_answer(row.solution),
            solution=row.solution,
            response=row.response,
            budget=row.budget,
            budget_source=row.budget_source,
            used_tokens=used,
            within_budget=None if row.budget is None else used <= row.budget,
            finish_reason=reason,
            format_error=format_error,
            seconds_to_budget=None if row.budget_time is None else row.budget_time - row.started,
            seconds_total=now - row.started,
            generated_tokens=len(row.generated),
        )
        row.final = final
        with self._stats.lock:
            setattr(self._stats, reason, getattr(self._stats, reason) + 1)
            self._stats.tokens += len(row.generated)
        with self._active_lock:
            self._active.discard(row.handle)
        row.handle._push(final)

    def _abort(self, rows: list[_Row], err: BaseException) -> None:
        for row in rows:
            with row.lock:
                if row.final is not None:
                    continue
                row.closed = True
                row.final = err  # type: ignore[assignment]  # nothing may end it again
                self._queued.pop(row.handle.id, None)
                with self._stats.lock:
                    self._stats.aborted += 1
                    self._stats.tokens += len(row.generated)
                with self._active_lock:
                    self._active.discard(row.handle)
                row.handle._fail(err)

    def _fail_row(self, row: _Row, err: BaseException) -> None:
        """One row failed while its batch decodes: it ends with the error, its batch-mates go on."""
        logger.error("%s failed; it ends alone, its batch-mates go on", row.handle.id, exc_info=err)
        self._abort([row], err)

    # --- answer now ---------------------------------------------------------------------------------------

    def _begin_answer(self, row: _Row) -> tuple[list[int], int, dict] | None:
        """Write the answer suffix into the row. Returns the follow-up's context ids, its token cap (may be
        < 1: nothing left to generate) and the state `_answer_token` keeps; None when the row has ended."""
        if row.handle._stop.is_set():
            self._finish(row, "stopped")
            return None
        if self.answer_suffix:
            row.detok.add(self._suffix_ids)  # the suffix becomes decode context, not emitted text
            if self._feed(row, self.answer_suffix, phase="answer"):
                self._finish(row, "answered_early")
                return None
        context = row.prompt_ids + row.generated + self._suffix_ids
        cap = min(row.request.answer_cap, row.max_new - len(row.generated), self.max_context - len(context))
        depth = self.answer_suffix.count("{") - self.answer_suffix.count("}")
        return context, cap, {"depth": depth, "done": False}

    def _answer_token(self, row: _Row, token: int, state: dict) -> bool:
        """One token of the forced answer; True once the answer is complete (or the row was stopped)."""
        if state["done"] or row.handle._stop.is_set() or token in self._eos_ids:
            state["done"] = True
            return True
        row.generated.append(token)
        self._count_used(row)
        text = row.detok.add([token])
        text, closed = _cut_at_close(text, state)
        if self._feed(row, text, phase="answer") or closed:
            state["done"] = True
        return state["done"]

    def _end_answer(self, row: _Row) -> None:
        self._finish(row, "stopped" if row.handle._stop.is_set() else "answered_early")


class BudgetGenerator(BudgetGeneratorBase):
    """Budget-first generation with per-request stop and answer-now over batched `model.generate`."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        system_prompt: str | None = SYSTEM_PROMPT,
        max_batch_size: int = 16,
        max_context: int | None = None,
        batch_window: float = 0.02,
        eager: bool = True,
        max_concurrent_batches: int = 2,
        answer_suffix: str = DEFAULT_ANSWER_SUFFIX,
        answer_extraction: str = BOXED,
        warmup: bool = True,
    ):
        if max_batch_size < 1:
            raise UserError(f"max_batch_size must be >= 1, not {max_batch_size}")
        if max_concurrent_batches < 1:
            raise UserError(f"max_concurrent_batches must be >= 1, not {max_concurrent_batches}")
        if batch_window < 0:
            raise UserError(f"batch_window must be >= 0, not {batch_window}")
        self.model = model
        super().__init__(tokenizer, system_prompt=system_prompt, max_context=max_context, answer_suffix=answer_suffix,
                         answer_extraction=answer_extraction)
        self.max_batch_size = max_batch_size
        self.batch_window = batch_window
        self.eager = eager
        self._queue: queue.Queue = queue.Queue()
        self._answers: queue.Queue = queue.Queue()
        self._collect_lock = threading.Lock()
        self._decoding: list[list[_Row]] = []  # the batches inside model.generate now
        self._decoding_lock = threading.Lock()
        if warmup:
            self._warmup()
        self._workers = [
            threading.Thread(target=self._batch_loop, name=f"budget-generator-{i}", daemon=True)
            for i in range(max_concurrent_batches)
        ]
        self._workers.append(threading.Thread(target=self._answer_loop, name="budget-generator-answers", daemon=True))
        for worker in self._workers:
            worker.start()

    @classmethod
    def from_pretrained(cls, name_or_path, *, device: str = "auto", dtype: str = "auto", **kw) -> BudgetGenerator:
        from ..core.models import load_model

        model, tokenizer = load_model(name_or_path, device=device, dtype=dtype)
        return cls(model, tokenizer, **kw)

    def __enter__(self) -> BudgetGenerator:
        return self

    # --- backend ------------------------------------------------------------------------------------------

    def _model_context(self) -> int:
        context = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return int(context) if context else super()._model_context()

    def _generation_defaults(self):
        return getattr(self.model, "generation_config", None)

    def _start(self, row: _Row) -> None:
        self._queue.put(row)

    def _start_answer(self, row: _Row) -> None:
        self._answers.put(row)

    def _queue_size(self) -> int:
        return self._queue.qsize()

    def _shutdown(self) -> None:
        for _ in self._workers:
            self._queue.put(None)
        self._answers.put(None)
        for worker in self._workers:
            worker.join(timeout=30)

    # --- speed ------------------------------------------------------------------------------------------

    def _warmup(self) -> None:
        """Time a few decode steps so the first request's ETA is measured, not guessed."""
        import torch

        ids = self._encode(prompt_text(self.tokenizer, "1+1", system_prompt=self.system_prompt))
        streamer = _TimingStreamer(self)
        with torch.inference_mode():
            self.model.generate(
                torch.tensor([ids], device=self.model.device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.model.device),
                generation_config=self._generation_config(6, min_new_tokens=6),
                streamer=streamer,
            )

    def _generation_config(self, max_new_tokens: int, min_new_tokens: int | None = None):
        import copy

        config = copy.deepcopy(self.model.generation_config)
        # Sampling happens in RowSampler; generate picks its single finite token greedily.
        config.do_sample = False
        config.temperature = None
        config.top_p = None
        config.top_k = None
        config.num_beams = 1
        config.max_length = None
        config.max_new_tokens = max_new_tokens
        config.min_new_tokens = min_new_tokens
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        return config

    # --- worker threads ---------------------------------------------------------------------------------

    def _next_batch(self) -> list[_Row] | None:
        with self._collect_lock:
            first = self._queue.get()
            if first is None:
                return None
            batch = [first]
            with self._decoding_lock:
                # A batch whose rows have all ended is returning from generate: it is not busy any more.
                busy = any(not row.closed for running in self._decoding for row in running)
            wait = busy or not self.eager
            # An eager idle generator starts at once: the window would only delay the budget. While a batch
            # decodes, requests arriving close together wait up to the window to share the next one.
            deadline = time.perf_counter() + (self.batch_window if wait else 0.0)
            while len(batch) < self.max_batch_size:
                left = deadline - time.perf_counter()
                try:
                    row = self._queue.get(timeout=max(left, 0)) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if row is None:
                    self._queue.put(None)  # the shutdown signal belongs to some worker: pass it on
                    break
                batch.append(row)
            return batch

    def _batch_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            with self._decoding_lock:
                self._decoding.append(batch)
            try:
                self._run_batch(batch)
            except Exception as err:  # a model error must not kill the worker or hang the callers
                logger.exception("generation failed for a batch of %d", len(batch))
                # Rows already handed to the answer thread are that thread's to end.
                self._abort([row for row in batch if not row.answering], err)
            finally:
                with self._decoding_lock:
                    self._decoding.remove(batch)

    def _run_batch(self, batch: list[_Row]) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        rows = []
        for row in batch:
            with row.lock:
                if row.final is not None:
                    continue  # stopped while queued
                row.running = True
            self._queued.pop(row.handle.id, None)
            if row.handle._stop.is_set():
                self._finish(row, "stopped")
            elif row.handle._answer_now.is_set():
                row.closed = row.answering = True
                self._start_answer(row)
            else:
                rows.append(row)
        if not rows:
            return
        with self._stats.lock:
            self._stats.batches += 1
        pad = self.tokenizer.pad_token_id
        width = max(len(r.prompt_ids) for r in rows)
        device = self.model.device
        # Left padding: every row's next token lands in the same column.
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=device)
        logger.debug("batch of %d rows, prompt width %d", len(rows), width)
        with torch.inference_mode():
            self.model.generate(
                ids,
                attention_mask=mask,
                generation_config=self._generation_config(max(r.max_new for r in rows)),
                logits_processor=LogitsProcessorList([_make_sampler(self, rows, width)]),
                stopping_criteria=StoppingCriteriaList([_make_criteria(rows)]),
                streamer=_Streamer(self, rows),
            )
        for row in rows:
            if not row.closed:
                # generate ended the row without our streamer seeing why (its own max length): a length stop.
                self._finish(row, "length")

    def _answer_loop(self) -> None:
        while True:
            row = self._answers.get()
            if row is None:
                return
            try:
                self._answer(row)
            except Exception as err:
                logger.exception("answer-now failed for %s", row.handle.id)
                self._abort([row], err)

    def _answer(self, row: _Row) -> None:
        """Force the final answer: greedy continuation of prompt + response so far + the answer suffix."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        start = self._begin_answer(row)
        if start is None:
            return
        context, cap, state = start
        if cap >= 1:
            gen = self

            class AnswerStreamer:
                prompt_seen = False

                def put(self, value):
                    if not self.prompt_seen:
                        self.prompt_seen = True
                        return
                    gen._answer_token(row, int(value.reshape(-1)[0]), state)

                def end(self):
                    pass

            class AnswerDone(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs):
                    done = state["done"] or row.handle._stop.is_set()
                    return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

            device = self.model.device
            with torch.inference_mode():
                self.model.generate(
                    torch.tensor([context], device=device),
                    attention_mask=torch.ones(1, len(context), dtype=torch.long, device=device),
                    generation_config=self._generation_config(cap),
                    stopping_criteria=StoppingCriteriaList([AnswerDone()]),
                    streamer=AnswerStreamer(),
                )
        self._end_answer(row)


class _TimingStreamer:
    def __init__(self, gen: BudgetGenerator):
        self.gen = gen
        self.calls = 0
        self.last: float | None = None

    def put(self, value) -> None:
        now = time.perf_counter()
        self.calls += 1
        # Call 1 is the prompt, call 2 follows the prefill: only later intervals are decode steps.
        if self.calls >= 3:
            self.gen._record_step(now - self.last)
        self.last = now

    def end(self) -> None:
        pass


def _cut_at_close(text: str, state: dict) -> tuple[str, bool]:
    """Text up to the brace that closes the answer suffix's open brace; whether it closed."""
    if state["depth"] <= 0:
        return text, False
    for i, char in enumerate(text):
        if char == "{":
            state["depth"] += 1
        elif char == "}":
            state["depth"] -= 1
            if state["depth"] == 0:
                return text[: i + 1], True
    return text, False


def check_request(request: GenerationRequest) -> None:
    """The checks that need no model: types and ranges of every field (UserError naming the field). The
    budget against the context and the prompt's length are checked when the request is prepared."""
    if not isinstance(request, GenerationRequest):
        raise UserError(f"expected a GenerationRequest, got {type(request).__name__}")
    q = request.question
    if not isinstance(q, str) or not q.strip():
        raise UserError("the question is empty")
    try:
        q.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("the question is not valid Unicode text (it contains a lone surrogate)") from None
    _check_number("temperature", request.temperature, low=0.0)
    _check_number("top_p", request.top_p, low=0.0, low_open=True, high=1.0)
    _check_number("slack", request.slack, low=0.0)
    _check_int("answer_cap", request.answer_cap, low=1)
    if request.max_new_tokens is not None:
        _check_int("max_new_tokens", request.max_new_tokens, low=1)
    if request.seed is not None:
        _check_int("seed", request.seed, low=0, high=MAX_SEED)


def _special_texts(tokenizer) -> list[str]:
    """The text of every special token the tokenizer would turn into a control token when parsing text."""
    texts = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            texts.add(str(token))
    return sorted((t for t in texts if t), key=len, reverse=True)


def _max_question_chars(tokenizer, max_context: int) -> int:
    """Characters beyond which a question cannot fit `max_context` tokens whatever it says. A token covers at
    most as many characters as its vocabulary entry has (byte-level BPE: one per byte; SentencePiece and
    WordPiece add a marker); twice that leaves room for normalizers that shorten text."""
    try:
        special = set(_special_texts(tokenizer))
        longest = max((len(t) for t in tokenizer.get_vocab() if t not in special), default=0)
    except Exception:  # a tokenizer without a vocabulary to read: no early refusal
        return 1 << 62
    return 2 * max(longest, 1) * max_context if longest else 1 << 62


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be an integer, not {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        raise UserError(f"{name} must be {bounds}, not {value}")


def _check_number(name: str, value: object, low: float, low_open: bool = False, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise UserError(f"{name} must be a number, not {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        upper = f"{high}]" if high is not None else "inf)"
        bounds = f"{'(' if low_open else '['}{low}, {upper}"
        raise UserError(f"{name} must be in {bounds}, not {value}")


def _budget_message(budget: object, err: fmt.FormatError, room: int) -> str:
    if isinstance(budget, str) or err.reason == "budget_not_integer":
        return f"invalid budget {budget!r}: it must be a whole number of tokens between 1 and {room}"
    if err.reason == "budget_not_positive":
        return f"invalid budget {budget}: it must be at least 1 token"
    return f"invalid budget {budget}: at most {room} tokens fit in the model's context after the prompt"


__all__ = [
    "MAX_SEED",
    "SAMPLING_EPS",
    "BudgetEvent",
    "BudgetGenerator",
    "BudgetGeneratorBase",
    "Event",
    "FinalEvent",
    "GenerationHandle",
    "GenerationRequest",
    "TextEvent",
    "check_request",
]
