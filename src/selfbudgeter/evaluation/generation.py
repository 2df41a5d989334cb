"""Batched sampling shared by `profile` and `eval`: prompts in, `Sample`s out, transformers or vLLM.

Determinism. Every sample gets its own seed, derived from (seed, prompt text, sample index), never from
its position in the list or its batch. With the transformers backend the random number behind each token
is a pure function of (that seed, the step) (a counter-based hash), turned into a token by inverse CDF, so:

1. the same seed, prompts and settings give the same samples, run after run;
2. a sample does not depend on which other prompts share its batch, on `batch_size`, on the order of the
   prompts, or on whether a resumed run skips prompts that were already done, *up to floating point*:
   padding a prompt differently can change its logits in the last bits, which only matters when the
   random number falls within that distance of the boundary between two tokens (rare; never seen in the
   tests on CPU fp32).
   Greedy decoding (temperature 0, or below `SAMPLING_EPS`) has the same guarantee without the noise.
3. the serving generator draws each token through the same `draw` with the same per-sample seed
   (`sample_seed(seed, prompt, 0)`), so a request to `serve` with a seed gets the text `eval` got for that
   seed, prompt and settings (up to floating point, as under (2)).

How this departs from `model.generate(do_sample=True)`:
1. Sampling is done by a logits processor (temperature, then top-p, then a seeded inverse-CDF draw) and
   `generate` runs greedily over its one-hot output, because transformers draws every row of a batch from
   the global torch RNG, which ties each sample to its batch-mates.
2. top_k is not applied (the whole vocabulary is sampled), as in vLLM's defaults; the model's own
   `generation_config` sampling settings are ignored so that a run is described by its config alone.
3. The K/V cache is preallocated for the batch's whole length and written in place (`_kv_cache`), instead
   of transformers' `DynamicCache`, which re-allocates it with `torch.cat` at every step.
4. Once half of a batch has stopped, `generate` is interrupted and the unfinished rows go on alone with
   their rows of the K/V cache (`_decode`): stopped rows would otherwise cost a decode step each. A row's
   random numbers depend on its seed and step only, so this changes nothing but floating point (a smaller
   batch computes the same logits in a different order), as under (2).

The vLLM backend passes the same per-prompt seeds through `SamplingParams(seed=...)`; vLLM then
guarantees (1), and (2) up to the floating-point differences between batch shapes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from ..core.errors import UserError

logger = logging.getLogger(__name__)

BACKENDS = ("transformers", "vllm")
# Measured on a shared 2-core CPU with the embedded base model's shape, timed as benchmarks/pipeline_speed.py times
# generation (one batch per size, 128 new tokens):
# ~120 tokens/s at batch 1, ~870 at 16, ~1,360 at 32, ~1,440 at 64, ~2,160 at 128. Past 32 the gain shrinks
# while padding waste grows when responses end at different lengths; recipes set their own.
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_NEW_TOKENS = 1024
# Finished rows are dropped from a batch once this share of it has stopped (None: never), while at least
# COMPACT_MIN_ROWS rows and more than COMPACT_MIN_TOKENS new tokens are left. Measured on the profile stage's
# batches of 64: 0.92x the CPU time at 0.5 and at 0.75; 0.25 cost more than it saved (1.17x, too many
# prefills). docs/speed.md.
COMPACT_SHARE: float | None = 0.5
COMPACT_MIN_ROWS = 8
COMPACT_MIN_TOKENS = 16

# Temperatures below this sample greedily, as in vLLM (_SAMPLING_EPS): dividing logits by 1e-45 gives inf/NaN.
SAMPLING_EPS = 1e-5

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment


@dataclass
class Sample:
    text: str  # decoded with skip_special_tokens=True
    n_tokens: int  # generated tokens, the stop token included
    finish_reason: Literal["stop", "length"]

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "n_tokens": self.n_tokens, "finish_reason": self.finish_reason}


def sample_seed(seed: int, prompt: str, index: int) -> int:
    """The 63-bit seed of sample `index` of `prompt`: independent of batches, order and resumption."""
    digest = hashlib.blake2b(f"{seed}\x00{index}\x00{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _check(n: int, temperature: float, top_p: float, max_new_tokens: int, batch_size: int, backend: str) -> None:
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if n < 1:
        raise UserError(f"the number of samples must be >= 1, not {n}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, not {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], not {top_p}")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, not {max_new_tokens}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, not {batch_size}")


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    n: int = 1,
    temperature: float = 0.6,
    top_p: float = 1.0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    desc: str = "generating",
    backend: str = "transformers",
    progress: bool | Callable[[float], None] = True,
) -> list[list[Sample]]:
    """`n` samples for every prompt (prompts are complete text: chat template applied, prefill included).

    `model` is a transformers causal LM for the transformers backend, a `vllm.LLM` for the vLLM one
    (`load` builds either). Returns one list of `n` samples per prompt, in the order of `prompts`.
    `progress`: True shows a bar with ETA over the prompts; a callable instead receives the number of
    prompts finished by each batch (fractional: a batch may end inside a prompt's samples), for callers
    that show one bar over several calls.
    """
    _check(n, temperature, top_p, max_new_tokens, batch_size, backend)
    prompts = list(prompts)
    if not prompts:
        return []
    if backend == "vllm":
        samples = _generate_vllm(model, tokenizer, prompts, n, temperature, top_p, max_new_tokens, seed)
        if callable(progress):
            progress(len(prompts))
        return samples
    return _generate_transformers(
        model, tokenizer, prompts, n, temperature, top_p, max_new_tokens, batch_size, seed, desc, progress
    )


# --- transformers ------------------------------------------------------------------------------------------


def _mix64(x):
    """splitmix64's finaliser on an int64 tensor (wrapping arithmetic; shifts made logical by masking)."""
    import torch

    def shr(v, s):
        return (v >> s) & ((1 << (64 - s)) - 1)

    x = x ^ shr(x, 30)
    x = x * torch.tensor(_signed(0xBF58476D1CE4E5B9), dtype=torch.int64, device=x.device)
    x = x ^ shr(x, 27)
    x = x * torch.tensor(_signed(0x94D049BB133111EB), dtype=torch.int64, device=x.device)
    return x ^ shr(x, 31)


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def row_uniforms(row_seeds, step: int):
    """One U(0,1) per row, a pure function of (row seed, step): a counter-based RNG (splitmix64)."""
    import torch

    x = _mix64(row_seeds + _signed((step + 1) * _GOLDEN))
    # The top 53 bits as a float in (0, 1): never exactly 0 or 1.
    return (((x >> 11) & ((1 << 53) - 1)).to(torch.float64) + 0.5) * 2.0**-53


class SeededSampler:
    """Logits processor over `draw`: each row's token drawn with its seed; returns a one-hot score.

    `generate` then runs greedily, so the token it picks is the one drawn here. The serving generator
    (`generator.BudgetGenerator`) draws through the same `draw`, so a seed gives the same text in `eval`,
    `profile` and `serve`.
    """

    def __init__(self, row_seeds: Sequence[int], prompt_length: int, temperature: float, top_p: float):
        self.row_seeds = seed_tensor(row_seeds)
        self.prompt_length = prompt_length
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids, scores):
        import torch

        step = input_ids.shape[1] - self.prompt_length
        chosen = draw(scores, self.row_seeds, step, self.temperature, self.top_p)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen.view(-1, 1), 0.0)
        return out


def seed_tensor(row_seeds: Sequence[int]):
    """Row seeds as the int64 tensor `draw` takes (any integer, wrapped to 64 bits)."""
    import torch

    return torch.tensor([_signed(s) for s in row_seeds], dtype=torch.int64)


def draw(scores, row_seeds, step: int, temperature: float, top_p: float):
    """The token of every row of `scores` ([rows, vocab]) at decode `step`: temperature, then top-p, then an
    inverse-CDF draw with the row's random number for (seed, step). Greedy below `SAMPLING_EPS`.

    One random number per row and step keeps this cheap next to the forward pass (a Gumbel draw over the
    vocabulary cost a quarter of the step time of the embedded model on CPU).
    """
    import torch

    logits = scores.float()
    if temperature < SAMPLING_EPS:
        return torch.argmax(logits, dim=-1)
    logits = logits / temperature
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    # float64 CDF: over a 150k vocabulary float32 rounding would move mass between tokens.
    cdf = torch.cumsum(torch.softmax(logits, dim=-1, dtype=torch.float64), dim=-1)
    u = row_uniforms(row_seeds.to(logits.device), step).view(-1, 1) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=logits.shape[-1] - 1).view(-1)


def top_p_filter(logits, top_p: float):
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches `top_p` (at least one)."""
    import torch

    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise UserError("the model has no end-of-sequence token: generation would never stop")
    return ids


def progress_bar(enabled: bool = True):
    """A rich progress bar with tokens/s and ETA columns, on stderr; `task.fields["speed"]` is shown."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


class _Unfinished:
    """Stopping criterion: ends a `generate` call once `share` of its rows have stopped, so that the caller can
    drop them and go on with the others in a smaller batch (rows that stopped cost a decode step like the rest)."""

    def __init__(self, eos_ids, batch: int, share: float):
        import torch

        self.eos = torch.tensor(eos_ids)
        self.done = torch.zeros(batch, dtype=torch.bool)
        self.enough = max(1, math.ceil(share * batch))

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.done |= torch.isin(input_ids[:, -1].cpu(), self.eos)
        stop = bool(self.done.sum() >= self.enough)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _kv_cache(model: Any, length: int) -> dict[str, Any]:
    """`generate` keyword arguments for a preallocated K/V cache of `length` positions (empty: not supported)."""
    import inspect

    from transformers.cache_utils import Cache, DynamicLayer

    class Preallocated(DynamicLayer):
        """A `DynamicLayer` whose keys and values are views of one buffer, written in place: the dynamic cache
        grows K and V with `torch.cat`, allocating the whole cache anew at every step. Attention still covers
        the positions written so far only (a `StaticCache` attends over all `length`, masked)."""

        def lazy_initialization(self, key_states, value_states) -> None:
            self.device = key_states.device
            batch, heads = key_states.shape[:2]
            self.key_buffer = key_states.new_empty(batch, heads, length, key_states.shape[-1])
            self.value_buffer = value_states.new_empty(batch, heads, length, value_states.shape[-1])
            self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start = self.keys.shape[-2]
            end = start + key_states.shape[-2]
            self.key_buffer[:, :, start:end] = key_states
            self.value_buffer[:, :, start:end] = value_states
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        def batch_select_indices(self, indices) -> None:
            """Keep the rows `indices` (batch compaction): their K/V are copied, not computed again."""
            if not self.is_initialized:
                return
            end = self.keys.shape[-2]
            self.key_buffer = self.key_buffer.index_select(0, indices)
            self.value_buffer = self.value_buffer.index_select(0, indices)
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]

    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
    config = model.config.get_text_config(decoder=True)
    layers = getattr(config, "num_hidden_layers", None)
    # Full attention in every layer only: sliding-window and linear-attention layers keep their own caches.
    full = set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"}
    sliding = bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)
    if name is None or not layers or not full or sliding:
        return {}
    return {name: Cache(layers=[Preallocated() for _ in range(layers)])}


def _decode(
    model: Any, input_ids, attention, seeds: list[int] | None, width: int, new_tokens: int, eos_ids: list[int],
    pad_id: int, temperature: float, top_p: float, compact: float | None,
) -> list[list[int]]:
    """The generated tokens of every row of one batch, each cut after its stop token.

    With `compact`, `generate` is interrupted once that share of the rows has stopped; the others go on in a new
    call on prompt + tokens so far, in a smaller batch. With the preallocated cache the rows kept keep their
    K/V (only the last token is fed again); without it, the new call prefills them. The sampler's step counts
    from `width`, the original prompt width, so a row draws the same random numbers either way.
    """
    import torch
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    rows = list(range(input_ids.shape[0]))
    out: list[list[int]] = [[] for _ in rows]
    left = new_tokens
    cache = _kv_cache(model, input_ids.shape[1] + new_tokens)  # one for the whole batch, compactions included
    while True:
        config = GenerationConfig(
            max_new_tokens=left, do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos_ids
        )
        processors = LogitsProcessorList()
        if seeds is not None:
            processors.append(SeededSampler([seeds[i] for i in rows], width, temperature, top_p))
        stopping = StoppingCriteriaList()
        if compact is not None and len(rows) >= COMPACT_MIN_ROWS and left > COMPACT_MIN_TOKENS:
            stopping.append(_Unfinished(eos_ids, len(rows), compact))
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            generation_config=config,
            logits_processor=processors,
            stopping_criteria=stopping,
            **cache,
        )
        start = input_ids.shape[1]
        going = []
        for j, tokens in enumerate(output[:, start:].tolist()):
            stop = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
            out[rows[j]] += tokens if stop is None else tokens[: stop + 1]
            if stop is None:
                going.append(j)
        left -= output.shape[1] - start
        if not going or left <= 0:
            return out
        keep = torch.tensor(going, device=output.device)
        grown = torch.ones(len(going), output.shape[1] - start, dtype=attention.dtype, device=attention.device)
        input_ids = output.index_select(0, keep)
        attention = torch.cat([attention.index_select(0, keep), grown], dim=1)
        rows = [rows[j] for j in going]
        for kept in cache.values():
            kept.batch_select_indices(keep)


def _generate_transformers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    desc: str,
    progress: bool | Callable[[float], None],
) -> list[list[Sample]]:
    import torch

    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    # Chat-templated prompts already carry any BOS the template wants.
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    # One row per (prompt, sample); longest first so that an out-of-memory batch fails at once and the ETA
    # errs long. Samples of one prompt stay adjacent.
    rows = sorted(((p, k) for p in range(len(prompts)) for k in range(n)), key=lambda pk: -len(encoded[pk[0]]))
    limit = getattr(model.config, "max_position_embeddings", None)
    device = next(model.parameters()).device
    results: list[list[Sample | None]] = [[None] * n for _ in prompts]
    generated = 0
    start = time.perf_counter()
    warned = False
    hook = progress if callable(progress) else None
    with progress_bar(progress is True) as bar, torch.inference_mode():
        task = bar.add_task(desc, total=len(prompts), speed="")
        for first in range(0, len(rows), batch_size):
            batch = rows[first : first + batch_size]
            ids = [encoded[p] for p, _ in batch]
            width = max(map(len, ids))
            new_tokens = max_new_tokens
            if limit is not None and width + new_tokens > limit:
                new_tokens = max(1, limit - width)
                if not warned:
                    logger.warning(
                        "prompt (%d tokens) + max_new_tokens (%d) exceeds the model's %d positions; "
                        "generating at most %d new tokens", width, max_new_tokens, limit, new_tokens
                    )
                    warned = True
            input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)
            attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
            seeds = [sample_seed(seed, prompts[p], k) for p, k in batch] if temperature >= SAMPLING_EPS else None
            outputs = _decode(model, input_ids, attention, seeds, width, new_tokens, eos_ids, pad_id, temperature,
                              top_p, COMPACT_SHARE)
            for (p, k), kept in zip(batch, outputs):
                stopped = bool(kept) and kept[-1] in eos_ids
                text = tokenizer.decode(kept, skip_special_tokens=True)
                results[p][k] = Sample(text, len(kept), "stop" if stopped else "length")
                generated += len(kept)
            rate = generated / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=len(batch) / n, speed=f"{rate:,.0f} tok/s")
            if hook is not None:
                hook(len(batch) / n)
    elapsed = time.perf_counter() - start
    logger.log(
        logging.INFO if progress is True else logging.DEBUG,
        "%s: %d samples, %d tokens in %.1f s (%.0f tok/s)", desc, len(rows), generated, elapsed,
        generated / max(elapsed, 1e-9),
    )
    return [[s for s in per if s is not None] for per in results]


# --- vLLM --------------------------------------------------------------------------------------------------


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise UserError(
            "backend 'vllm' needs vLLM, which is not installed (pip install 'selfbudgeter[vllm]' on a GPU "
            "machine), or use backend 'transformers'"
        ) from None
    return vllm


def _generate_vllm(
    llm: Any, tokenizer: Any, prompts: list[str], n: int, temperature: float, top_p: float, max_new_tokens: int,
    seed: int,
) -> list[list[Sample]]:
    vllm = _import_vllm()
    # Token ids, not text: vLLM would tokenize text with special tokens and so put a second BOS after the
    # one the chat template already wrote (DeepSeek-R1-Distill's template starts with it).
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    params = [
        vllm.SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            seed=sample_seed(seed, prompt, 0),
            skip_special_tokens=True,
        )
        for prompt in prompts
    ]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=True)
    results = []
    generated = 0
    for output in outputs:
        samples = []
        for completion in output.outputs:
            # vLLM reports "stop" for EOS and stop strings, "length" for max_tokens, "abort" when cancelled.
            reason = "length" if completion.finish_reason == "length" else "stop"
            samples.append(Sample(completion.text, len(completion.token_ids), reason))
            generated += len(completion.token_ids)
        results.append(samples)
    elapsed = time.perf_counter() - start
    logger.info("vllm: %d prompts, %d tokens in %.1f s (%.0f tok/s)", len(prompts), generated, elapsed,
                generated / max(elapsed, 1e-9))
    return results


# --- loading -----------------------------------------------------------------------------------------------


def load(name_or_path: str, backend: str = "transformers", *, device: str = "auto", dtype: str = "auto",
         seed: int = 0, max_model_len: int | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for `backend`: a transformers model (via `models.load_model`) or a `vllm.LLM`."""
    from ..core import models

    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "transformers":
        return models.load_model(name_or_path, device=device, dtype=dtype)
    vllm = _import_vllm()
    tokenizer = models.load_tokenizer(name_or_path)
    kwargs: dict[str, Any] = {"model": models.resolve(name_or_path), "seed": seed, "dtype": dtype}
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    return vllm.LLM(**kwargs), tokenizer

