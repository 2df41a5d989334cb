"""Budget-first generation on vLLM: `VLLMBudgetGenerator`, the backend of `selfbudgeter serve --backend vllm`.

It is `generator.BudgetGenerator` with another decoder. Requests, handles, events, finish reasons,
validation errors, enforcement and token accounting are the same code (`generator.BudgetGeneratorBase`);
only the decoding below differs.

How it sits on vLLM's async engine (`vllm.AsyncLLMEngine`, which is `vllm.v1.engine.async_llm.AsyncLLM`):
1. Every request is one `engine.generate({"prompt_token_ids": ...}, SamplingParams, request_id)`. vLLM's
   continuous batching decides what decodes together; nothing is batched here, `max_batch_size` becomes
   the engine's `max_num_seqs`, and `stats()["batches"]` stays 0.
2. Outputs are deltas (`RequestOutputKind.DELTA`): the token ids a request gained since its last output,
   several when the consumer falls behind. The text is decoded here from those ids by the transformers
   backend's incremental detokenizer, so tags are parsed and tokens counted exactly as there; vLLM's own
   text is not used.
3. Sampling is vLLM's: temperature, top_p and a seed. The seed of a request with seed S is
   `generation.sample_seed(S, prompt text, 0)`, the one `generation.generate`'s vLLM backend gives that
   prompt, so `serve --backend vllm` and `eval --backend vllm` agree; it reproduces a response on the same
   engine, not the transformers backend's response for that seed.
4. Stop aborts the request: the task iterating `generate` is cancelled (vLLM aborts a request whose
   iteration is cancelled) and `engine.abort(request_id)` is called as well (a no-op for a request that
   already ended). `</solution>` is also a vLLM stop string, so vLLM itself ends a request there, as it does
   at EOS and at the request's token cap; the events and finish reasons still come from this module's own
   parsing of the token ids, as in the transformers backend.
5. Answer-now aborts the request and starts a greedy follow-up request from prompt + response so far + the
   answer suffix, at most `answer_cap` tokens, ending at `</solution>`, at EOS, or when the suffix's open
   brace closes (then the follow-up is aborted). Stop and answer-now wake the request at once, also while
   vLLM has not scheduled it yet; answer-now still waits until the solution has begun.
6. The engine is driven from an event loop on a thread of its own, so handles work from any thread or
   event loop (the server's, plain threads), like the transformers backend's.

Speed for ETAs: the time between two outputs of a request divided by the tokens the later one carries (the
first output, which includes queueing and prefill, is not counted), averaged as in the transformers backend.

Testing: vLLM needs a CUDA GPU and is not installed where this project's tests run, so this module is
exercised here only against a fake engine (`tests/test_vllm_generator.py`) written to vLLM's documented
`AsyncLLM` contract; it has not been run against a real vLLM engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import threading
import time
import uuid
from typing import Any, Callable

from ..core import format as fmt
from ..core.grading import BOXED
from ..data import SYSTEM_PROMPT, prompt_text
from ..evaluation.generation import _import_vllm
from .generator import DEFAULT_ANSWER_SUFFIX, BudgetGeneratorBase, GenerationHandle, _Row

logger = logging.getLogger(__name__)

# How long close() waits for running requests to end before it stops the engine's event loop.
CLOSE_TIMEOUT = 30.0


class VLLMBudgetGenerator(BudgetGeneratorBase):
    """Budget-first generation with per-request stop and answer-now over vLLM's async engine."""

    def __init__(
        self,
        engine,
        tokenizer,
        *,
        system_prompt: str | None = SYSTEM_PROMPT,
        max_context: int | None = None,
        answer_suffix: str = DEFAULT_ANSWER_SUFFIX,
        answer_extraction: str = BOXED,
        generation_config=None,
        warmup: bool = True,
    ):
        """`engine`: a `vllm.AsyncLLMEngine` made outside any running event loop (its output handler starts
        on the first request, on this generator's loop). `tokenizer`: the model's transformers tokenizer.
        `generation_config`: the model's `GenerationConfig`, for extra EOS ids and a default token cap."""
        vllm = _import_vllm()
        self._sampling_params = vllm.SamplingParams
        self._delta = importlib.import_module("vllm.sampling_params").RequestOutputKind.DELTA
        self.engine = engine
        self.generation_config = generation_config
        super().__init__(tokenizer, system_prompt=system_prompt, max_context=max_context, answer_suffix=answer_suffix,
                         answer_extraction=answer_extraction)
        self._owns_engine = False
        self._wakes: dict[str, asyncio.Event] = {}
        self._futures: set[concurrent.futures.Future] = set()
        self._futures_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-budget-generator", daemon=True)
        self._thread.start()
        if warmup:
            asyncio.run_coroutine_threadsafe(self._warmup(), self._loop).result()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path,
        *,
        dtype: str = "auto",
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        max_batch_size: int | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        **kw,
    ) -> VLLMBudgetGenerator:
        """Start a vLLM engine for `name_or_path` (`embedded`, a model folder or a hub id) on this machine's
        GPUs; a UserError says so when vLLM is not installed. Call it outside a running event loop."""
        vllm = _import_vllm()
        from ..core.models import load_tokenizer, resolve

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("start the vLLM engine outside a running event loop: vLLM would tie it to that loop")
        source = resolve(name_or_path)
        tokenizer = load_tokenizer(name_or_path)
        args: dict[str, Any] = {
            "model": source,
            "dtype": dtype,
            "seed": seed,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
        }
        if max_model_len is not None:
            args["max_model_len"] = max_model_len
        if max_batch_size is not None:
            args["max_num_seqs"] = max_batch_size
        args.update(engine_kwargs or {})
        engine = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(**args))
        try:
            generator = cls(engine, tokenizer, generation_config=_generation_config(source), **kw)
        except BaseException:
            _shutdown_engine(engine)
            raise
        generator._owns_engine = True
        logger.info("vLLM engine for %s ready (tensor parallel %d)", name_or_path, tensor_parallel_size)
        return generator

    # --- backend ------------------------------------------------------------------------------------------

    def _model_context(self) -> int:
        length = getattr(getattr(self.engine, "model_config", None), "max_model_len", None)
        return int(length) if length else super()._model_context()

    def _generation_defaults(self):
        return self.generation_config

    def _start(self, row: _Row) -> None:
        wake = asyncio.Event()  # bound to the engine's loop on first use there
        self._wakes[row.handle.id] = wake
        future = asyncio.run_coroutine_threadsafe(self._run(row, wake), self._loop)
        with self._futures_lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: concurrent.futures.Future) -> None:
        with self._futures_lock:
            self._futures.discard(future)

    def _start_answer(self, row: _Row) -> None:
        pass  # the row's own task aborts the request and runs the follow-up (`_run`)

    def _on_control(self, handle: GenerationHandle) -> None:
        wake = self._wakes.get(handle.id)
        if wake is None:
            return
        try:
            self._loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # the loop is closed: the request has ended
            pass

    def _shutdown(self) -> None:
        with self._futures_lock:
            running = list(self._futures)
        # close() has stopped every request; their tasks end within one output or wake-up.
        concurrent.futures.wait(running, timeout=CLOSE_TIMEOUT)
        if self._owns_engine:
            _shutdown_engine(self.engine)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=CLOSE_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    # --- requests, on the engine's loop -------------------------------------------------------------------

    def _params(self, *, temperature: float, top_p: float, seed: int | None, max_tokens: int, **extra):
        return self._sampling_params(
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            max_tokens=max_tokens,
            output_kind=self._delta,
            stop=[fmt.SOLUTION_CLOSE],
            include_stop_str_in_output=True,
            **extra,
        )

    async def _run(self, row: _Row, wake: asyncio.Event) -> None:
        try:
            with row.lock:
                if row.final is not None:
                    return
                row.running = True
            if row.handle._stop.is_set():
                self._finish(row, "stopped")
                return
            if not self._interrupt(row):
                await self._decode(row, wake)
            if row.answering and row.final is None:
                await self._answer(row, wake)
        except Exception as err:  # an engine error must not hang the caller
            logger.exception("generation failed for %s", row.handle.id)
            self._abort([row], err)
        finally:
            self._wakes.pop(row.handle.id, None)

    def _interrupt(self, row: _Row) -> bool:
        """Whether the main request must end now: stopped, ended, or asked to answer now in its solution."""
        if row.closed:
            return True
        if row.handle._stop.is_set():
            self._finish(row, "stopped")
            return True
        if row.handle._answer_now.is_set() and row.in_solution:
            row.closed = row.answering = True
            return True
        return False

    async def _decode(self, row: _Row, wake: asyncio.Event) -> None:
        request = row.request
        params = self._params(
            temperature=request.temperature, top_p=request.top_p, seed=row.seed if request.seed is not None else None,
            max_tokens=row.max_new,
        )

        def on_tokens(ids: list[int]) -> bool:
            for token in ids:
                if row.closed:
                    break
                self._on_token(row, token)
            return row.closed

        reason = await self._follow(row, wake, row.prompt_ids, params, on_tokens, lambda: self._interrupt(row))
        if row.final is None and not row.closed:
            # vLLM ended the request on a token this loop did not act on.
            if reason == "length":
                self._finish(row, "length")
            elif reason == "stop":  # EOS or a stop token: the response ends here
                self._finish(row, "finished")
            else:
                raise RuntimeError(f"vLLM ended {row.handle.id} unasked (finish reason {reason!r})")

    async def _answer(self, row: _Row, wake: asyncio.Event) -> None:
        start = self._begin_answer(row)
        if start is None:
            return
        context, cap, state = start
        if cap >= 1:
            params = self._params(temperature=0.0, top_p=1.0, seed=None, max_tokens=cap)

            def on_tokens(ids: list[int]) -> bool:
                return any(self._answer_token(row, token, state) for token in ids)

            def interrupted() -> bool:
                return state["done"] or row.handle._stop.is_set()

            await self._follow(row, wake, context, params, on_tokens, interrupted)
        self._end_answer(row)

    async def _follow(
        self,
        row: _Row,
        wake: asyncio.Event,
        prompt_ids: list[int],
        params,
        on_tokens: Callable[[list[int]], bool],
        interrupted: Callable[[], bool],
    ) -> str | None:
        """Run one engine request and hand each output's new token ids to `on_tokens` until it returns True,
        `interrupted()` does (checked before each wait and after each wake-up), or vLLM ends the request.
        Returns vLLM's finish reason when vLLM ended it; otherwise aborts it and returns None."""
        request_id = f"{row.handle.id}-{uuid.uuid4().hex[:8]}"
        outputs = self.engine.generate({"prompt_token_ids": prompt_ids}, params, request_id).__aiter__()
        pending: asyncio.Future | None = None
        waiting: asyncio.Future | None = None
        last: float | None = None
        ended = False  # vLLM has ended the request: nothing to abort
        exhausted = False
        try:
            while not interrupted():
                if pending is None:
                    pending = asyncio.ensure_future(outputs.__anext__())
                if waiting is None:
                    waiting = asyncio.ensure_future(wake.wait())
                done, _ = await asyncio.wait((pending, waiting), return_when=asyncio.FIRST_COMPLETED)
                if waiting in done:
                    wake.clear()
                    waiting = None
                if pending not in done:
                    continue
                task, pending = pending, None
                try:
                    output = task.result()
                except StopAsyncIteration:
                    ended = exhausted = True
                    return None
                completion = output.outputs[0]
                ids = list(completion.token_ids)
                now = time.perf_counter()
                if last is not None and ids:
                    self._record_step((now - last) / len(ids))
                last = now
                self._queued.pop(row.handle.id, None)  # no longer waiting for its first output
                ended = bool(output.finished)
                if on_tokens(ids):
                    return None
                if ended:
                    return completion.finish_reason
            return None
        finally:
            if waiting is not None:
                waiting.cancel()
            if not ended:
                await self._abort_request(request_id, outputs, pending)
            elif not exhausted:
                # Let generate() return after its final output; closing it there instead would abort a
                # request that has already finished.
                async for _ in outputs:
                    pass

    async def _abort_request(self, request_id: str, outputs, pending: asyncio.Future | None) -> None:
        if pending is not None:
            # Cancelling the iteration makes vLLM abort the request (its generate() catches CancelledError).
            pending.cancel()
            await asyncio.wait((pending,))
            if not pending.cancelled() and pending.exception() is not None:
                logger.debug("%s ended with %r while being aborted", request_id, pending.exception())
        try:
            close = getattr(outputs, "aclose", None)
            if close is not None:
                await close()
            await self.engine.abort(request_id)
        except Exception:  # the request is gone either way; a failed abort must not fail the row
            logger.warning("aborting vLLM request %s failed", request_id, exc_info=True)

    async def _warmup(self) -> None:
        """Time a few decode steps so the first request's ETA is measured, not guessed."""
        ids = self._encode(prompt_text(self.tokenizer, "1+1", system_prompt=self.system_prompt))
        params = self._params(temperature=0.0, top_p=1.0, seed=None, max_tokens=8, min_tokens=8)
        last = None
        async for output in self.engine.generate({"prompt_token_ids": ids}, params, f"warmup-{uuid.uuid4().hex[:8]}"):
            now, count = time.perf_counter(), len(output.outputs[0].token_ids)
            if last is not None and count:
                self._record_step((now - last) / count)
            last = now


def _generation_config(source: str):
    """The model's GenerationConfig (EOS ids, a default max_new_tokens), or None when it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source)
    except (OSError, ValueError):
        return None


def _shutdown_engine(engine) -> None:
    shutdown = getattr(engine, "shutdown", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception:
            logger.warning("vLLM engine shutdown failed", exc_info=True)


__all__ = ["VLLMBudgetGenerator"]
