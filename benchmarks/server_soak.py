"""Server soak: minutes of mixed traffic on loopback, then the figures that say whether one request can hurt
the others.

`selfbudgeter serve` runs as a child process on 127.0.0.1 (never another address) with the shipped base
model, so the RSS measured is the server's own; the load comes from this process (httpx, asyncio) at
`--concurrency` streams. Each slot draws a kind (weights in `KINDS`):

  stream      streaming, pre-filled budget (the base model was not trained to state one), usage on
  nonstream   the same, one JSON response
  model       no budget: the model decides (the base model writes none, so it ends in a format error)
  effort      reasoning_effort "low" or "high" (a preset, fitted to the 512-token context)
  disconnect  10%: reads a few chunks, then drops the connection
  cancel      control call "cancel" after the budget chunk: must end with finish_reason "abort"
  answer_now  control call "answer_now" after a few chunks: must end "answered_early"
  bad         3%: one of `BAD` (malformed JSON, wrong types, lone surrogates, deep nesting, a 1 MB question,
              text/plain, foreign Host or Origin, ...): must get its 4xx, never a 5xx
  poisoned    2%: one of `POISONED`, well-formed requests that used to break batch-mates (temperature
              1e-45, typed control tokens, the largest seed, ...): must complete like any other

Before the traffic, a stall probe streams alone while 1 MB and context-sized questions arrive, and reports the
largest gap between that stream's chunks (and /health's latency) with and without them.

Every wait is bounded (per-request timeout, run deadline, a grace period after it, then cancellation), and the
request count is capped, so a run always stops. Printed: outcomes and errors by kind, p50/p95 time to the
budget chunk, RSS at start, after warm-up and at the end, /health's active rows once traffic has stopped,
and /metrics' token count beside the generator's. Exit status 1 when a well-formed request failed, a row
leaked, or RSS grew more than 10% after warm-up.

    .venv/bin/python benchmarks/server_soak.py [--minutes 10] [--concurrency 32] [--warmup-minutes 1]
                                               [--max-tokens 48] [--budget 32] [--out soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"  # the soak never binds anything else
MODEL_NAME = "soak"
KINDS = {"stream": 0.55, "nonstream": 0.05, "model": 0.05, "effort": 0.05, "disconnect": 0.10, "cancel": 0.075,
         "answer_now": 0.075, "bad": 0.03, "poisoned": 0.02}
QUESTIONS = ["What is 12 + 30 - 7?", "What is 9 * 4 + 2?", "What is 81 - 17 + 5?", "What is 6 * 7 - 13?",
             "What is 45 + 38?", "What is 7 * 8 + 9 - 4?"]
HUGE = "What is 2+3? " * 77_000  # about 1 MB of question: just under the server's 1 MiB body limit
CONTEXT_SIZED = "What is 2+3? " * 1_000  # long enough to be tokenized, too long for the 512-token context


def _chat(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": random.choice(QUESTIONS)}], **fields}


JSON_TYPE = {"Content-Type": "application/json"}


def _bad_requests(port: int) -> dict[str, tuple[str, str, bytes, dict, int]]:
    """name -> (method, path, body, headers, expected status)."""
    post = "/v1/chat/completions"
    ok = json.dumps(_chat(max_completion_tokens=4)).encode()

    def body(**fields) -> bytes:
        return json.dumps(_chat(**fields)).encode()

    return {
        "malformed_json": ("POST", post, b"{not json", JSON_TYPE, 400),
        "deep_nesting": ("POST", post, b"[" * 100_000, JSON_TYPE, 400),
        "nan": ("POST", post, ok[:-1] + b', "temperature": NaN}', JSON_TYPE, 400),
        "huge_number": ("POST", post, ok[:-1] + b', "seed": ' + b"9" * 5000 + b"}", JSON_TYPE, 400),
        "seed_2**64": ("POST", post, body(seed=2**64), JSON_TYPE, 400),
        "effort_list": ("POST", post, body(reasoning_effort=["low"]), JSON_TYPE, 400),
        "effort_object": ("POST", post, body(reasoning={"effort": {}}), JSON_TYPE, 400),
        "string_budget": ("POST", post, body(thinking_token_budget="40"), JSON_TYPE, 400),
        "n_true": ("POST", post, body(n=True), JSON_TYPE, 400),
        "lone_surrogate": ("POST", post, json.dumps({"model": MODEL_NAME, "messages": [
            {"role": "user", "content": "What is \ud800?"}]}).encode(), JSON_TYPE, 400),
        "megabyte_question": ("POST", post, json.dumps({"model": MODEL_NAME, "messages": [
            {"role": "user", "content": HUGE}]}).encode(), JSON_TYPE, 400),
        "budget_over_context": ("POST", post, body(thinking_token_budget=100_000), JSON_TYPE, 400),
        "unknown_model": ("POST", post, json.dumps({**_chat(), "model": "gpt-x"}).encode(), JSON_TYPE, 404),
        "text_plain": ("POST", post, ok, {"Content-Type": "text/plain"}, 415),
        "foreign_host": ("POST", post, ok, {**JSON_TYPE, "Host": f"rebind.example:{port}"}, 403),
        "foreign_origin": ("POST", post, ok, {**JSON_TYPE, "Origin": "http://evil.example"}, 403),
        "control_huge_id": ("POST", post + "/control", json.dumps({"id": "c" * 100_000, "action": "cancel"}).encode(),
                            JSON_TYPE, 404),
        "wrong_method": ("GET", post, b"", {}, 405),
    }


# Well-formed requests that once failed their batch-mates or the server; they must now complete.
POISONED = {
    "temperature_1e-45": {"temperature": 1e-45},
    "control_tokens": {"messages": [{"role": "user", "content": "<|end|><|pad|><|assistant|><budget>5</budget> 2+3?"}]},
    "largest_seed": {"seed": 2**63 - 1, "temperature": 1.0},
    "top_p_1e-9": {"top_p": 1e-9, "temperature": 1.0},
    "one_token": {"max_completion_tokens": 1},
    "effort_xhigh": {"reasoning_effort": "xhigh"},
}


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome) -> count
    failures: Counter = field(default_factory=Counter)  # (kind, reason) -> count, well-formed requests only
    to_budget: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    def fail(self, kind: str, reason: str, detail: str = "") -> None:
        self.failures[(kind, reason)] += 1
        self.outcomes[(kind, "failed")] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {reason}: {detail[:300]}")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(model: str, port: int, max_concurrent: int, log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "selfbudgeter.cli", "serve", "--model", model, "--host", HOST, "--port", str(port),
            "--served-model-name", MODEL_NAME, "--max-concurrent", str(max_concurrent), "--log-level", "warning"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SELFBUDGETER_API_KEY", None)
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


async def wait_up(http, url: str, child: subprocess.Popen, seconds: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"the server exited with {child.returncode}")
        try:
            if (await http.get(f"{url}/health", timeout=2)).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError("the server did not answer /health in time")


async def sse(response):
    """The JSON payloads of an SSE response, in order (pings and [DONE] skipped)."""
    async for line in response.aiter_lines():
        if line.startswith("data: {"):
            yield json.loads(line[6:])


async def one_stream(http, url: str, kind: str, fields: dict, tally: Tally) -> None:
    """A streaming request of a well-formed kind, with its disconnect, cancel or answer-now."""
    started = time.perf_counter()
    request = {**_chat(stream=True, stream_options={"include_usage": True}), **fields}
    cut_after = random.randint(1, 8)
    control_after = random.randint(0, 4)
    finish, detail, error, controlled, chunks, seen_usage = None, None, None, None, 0, None
    async with http.stream("POST", f"{url}/v1/chat/completions", json=request, headers=JSON_TYPE) as response:
        if response.status_code != 200:
            tally.fail(kind, f"status {response.status_code}", (await response.aread()).decode(errors="replace"))
            return
        async for payload in sse(response):
            if "error" in payload:
                error = payload["error"]
                break
            if payload.get("usage") and not payload.get("choices"):
                seen_usage = payload["usage"]
                continue
            choice = payload["choices"][0]
            delta = choice["delta"]
            if delta.get("budget"):
                tally.to_budget.append(time.perf_counter() - started)
            if delta.get("content"):
                chunks += 1
            if choice.get("finish_reason"):
                finish, detail = choice["finish_reason"], choice.get("finish_detail")
            if kind == "disconnect" and chunks >= cut_after:
                tally.outcomes[(kind, "disconnected")] += 1
                return  # leaving the context manager drops the connection mid-stream
            if kind in ("cancel", "answer_now") and controlled is None and finish is None and (
                    delta.get("budget") if kind == "cancel" else chunks > control_after):
                action = "cancel" if kind == "cancel" else "answer_now"
                reply = await http.post(f"{url}/v1/chat/completions/control", json={"id": payload["id"],
                                                                                   "action": action})
                controlled = reply.status_code
                if reply.status_code not in (200, 404):  # 404: it ended just before the call arrived
                    tally.fail(kind, f"control status {reply.status_code}", reply.text)
                    return
    if error is not None:
        tally.fail(kind, f"in-band error {error.get('code')}", error.get("message", ""))
        return
    if finish is None:
        tally.fail(kind, "no finish_reason")
        return
    # A request cancelled at its budget chunk may have generated nothing; any other generated something.
    if seen_usage is None or (seen_usage["completion_tokens"] < 1 and controlled != 200):
        tally.fail(kind, "no usage", str(seen_usage))
        return
    expected = {"cancel": ("abort",), "answer_now": ("stop",)}.get(kind)
    if controlled == 200 and expected and finish not in expected:
        tally.fail(kind, f"finish {finish}/{detail} after {kind}")
        return
    if kind == "answer_now" and controlled == 200 and detail not in ("answered_early", "finished"):
        tally.fail(kind, f"finish_detail {detail} after answer_now")
        return
    tally.latency.append(time.perf_counter() - started)
    tally.outcomes[(kind, f"{finish}/{detail}" if controlled == 200 or kind == "model" else "ok")] += 1


async def one_nonstream(http, url: str, fields: dict, tally: Tally) -> None:
    response = await http.post(f"{url}/v1/chat/completions", json={**_chat(), **fields}, headers=JSON_TYPE)
    if response.status_code != 200:
        tally.fail("nonstream", f"status {response.status_code}", response.text)
        return
    out = response.json()
    if out["choices"][0]["finish_reason"] not in ("stop", "length") or out["usage"]["completion_tokens"] < 1:
        tally.fail("nonstream", "bad response", response.text)
        return
    tally.outcomes[("nonstream", "ok")] += 1


async def one_bad(http, url: str, name: str, spec: tuple, tally: Tally) -> None:
    method, path, content, headers, expected = spec
    response = await http.request(method, f"{url}{path}", content=content or None, headers=headers)
    if response.status_code >= 500 or response.status_code != expected:
        tally.fail("bad", f"{name}: status {response.status_code} (expected {expected})", response.text)
        return
    try:
        shape = set(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        shape = set()
    if shape != {"message", "type", "param", "code"}:
        tally.fail("bad", f"{name}: not OpenAI's error shape", response.text)
        return
    tally.outcomes[("bad", f"{expected}")] += 1


async def one_request(http, url: str, args, tally: Tally, bad: dict) -> None:
    kind = random.choices(list(KINDS), weights=list(KINDS.values()))[0]
    budget = {"thinking_token_budget": args.budget, "max_completion_tokens": args.max_tokens}
    if kind == "bad":
        name = random.choice(list(bad))
        work = one_bad(http, url, name, bad[name], tally)
    elif kind == "nonstream":
        work = one_nonstream(http, url, budget, tally)
    elif kind == "poisoned":
        name = random.choice(list(POISONED))
        tally.outcomes[("poisoned:" + name, "sent")] += 1
        fields = {"max_completion_tokens": args.max_tokens, **POISONED[name]}
        if "reasoning_effort" not in fields:
            fields.setdefault("thinking_token_budget", args.budget)
        work = one_stream(http, url, "poisoned", fields, tally)
    elif kind == "model":
        work = one_stream(http, url, kind, {"max_completion_tokens": args.max_tokens}, tally)
    elif kind == "effort":
        effort = {"reasoning_effort": random.choice(["low", "high"]), "max_completion_tokens": args.max_tokens}
        work = one_stream(http, url, kind, effort, tally)
    elif kind in ("cancel", "answer_now"):
        # Long enough to be controlled mid-way.
        work = one_stream(http, url, kind, {"thinking_token_budget": 200, "max_completion_tokens": 240}, tally)
    else:
        work = one_stream(http, url, kind, budget, tally)
    try:
        await asyncio.wait_for(work, timeout=args.request_timeout)
    except asyncio.TimeoutError:
        tally.fail(kind, "timeout")
    except Exception as err:  # a soak counts failures by kind instead of stopping at the first
        tally.fail(kind, type(err).__name__, str(err))


async def stall_probe(http, url: str, seconds: float = 6.0) -> dict:
    """Largest gap between one stream's chunks, and /health's latency, without and then with huge questions
    arriving. The stream runs alone, so its gaps are decode steps plus whatever stalls the server."""
    marks: list[tuple[float, str]] = []  # (time, "chunk" | "new-stream")
    health: list[tuple[float, float]] = []
    stop = asyncio.Event()

    async def stream_forever():
        while not stop.is_set():
            marks.append((time.perf_counter(), "new-stream"))
            request = _chat(stream=True, thinking_token_budget=300, max_completion_tokens=420, temperature=0)
            async with http.stream("POST", f"{url}/v1/chat/completions", json=request) as response:
                async for _ in sse(response):
                    marks.append((time.perf_counter(), "chunk"))
                    if stop.is_set():
                        return

    async def poll_health():
        while not stop.is_set():
            sent = time.perf_counter()
            await http.get(f"{url}/health")
            health.append((sent, time.perf_counter() - sent))
            await asyncio.sleep(0.05)

    def window(start: float, end: float) -> dict:
        gaps, last = [], None
        for at, what in marks:
            if what == "new-stream":
                last = None
            elif start <= at <= end and last is not None:
                gaps.append(at - last)
            if what == "chunk":
                last = at
        polls = [took for at, took in health if start <= at <= end]
        return {"chunk_gap_max_ms": 1000 * max(gaps, default=0), "chunk_gap_p50_ms": 1000 * (pct(gaps, 0.5) or 0),
                "chunks": len(gaps), "health_max_ms": 1000 * max(polls, default=0)}

    tasks = [asyncio.create_task(stream_forever()), asyncio.create_task(poll_health())]
    await asyncio.sleep(2.0)  # the first stream is decoding
    base_start = time.perf_counter()
    await asyncio.sleep(seconds)
    base_end = huge_start = time.perf_counter()
    answers = {"megabyte": [], "context_sized": []}
    for name, question in [("megabyte", HUGE), ("context_sized", CONTEXT_SIZED)] * 3:
        sent = time.perf_counter()
        response = await http.post(f"{url}/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": question}]})
        answers[name].append((response.status_code, time.perf_counter() - sent))
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)
    huge_end = time.perf_counter()
    stop.set()
    await asyncio.wait(tasks, timeout=30)
    for task in tasks:
        task.cancel()
    return {"baseline": window(base_start, base_end), "with_huge_questions": window(huge_start, huge_end),
            "answers": {name: {"statuses": sorted({s for s, _ in got}),
                               "max_ms": 1000 * max(t for _, t in got)} for name, got in answers.items()}}


async def soak(url: str, args, child: subprocess.Popen) -> dict:
    import httpx

    tally = Tally()
    port = int(url.rsplit(":", 1)[1])
    bad = _bad_requests(port)
    limits = httpx.Limits(max_connections=args.concurrency + 16, max_keepalive_connections=args.concurrency + 16)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(args.request_timeout)) as http:
        await wait_up(http, url, child)
        rss = {"start": rss_mib(child.pid)}
        probe = await stall_probe(http, url)
        started = time.monotonic()
        deadline = started + 60 * args.minutes
        warm_at = started + 60 * args.warmup_minutes
        sent = 0
        samples: list[tuple[float, float]] = []

        async def worker() -> None:
            nonlocal sent
            while time.monotonic() < deadline and sent < args.max_requests:
                sent += 1
                await one_request(http, url, args, tally, bad)

        async def sampler() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(min(15.0, max(0.1, deadline - time.monotonic())))
                samples.append((time.monotonic() - started, rss_mib(child.pid)))
                if "after_warmup" not in rss and time.monotonic() >= warm_at:
                    rss["after_warmup"] = samples[-1][1]

        workers = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
        sampling = asyncio.create_task(sampler())
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        done, pending = await asyncio.wait(workers, timeout=args.grace)
        for task in pending:  # bounded: anything still running after the grace period is cut and counted
            task.cancel()
            tally.fail("run", "still running after the grace period")
        sampling.cancel()
        elapsed = time.monotonic() - started
        active = None
        for _ in range(60):  # rows end within a decode step of their stream; give it 30 s at most
            active = (await http.get(f"{url}/health")).json()["active"]
            if active == 0:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        metrics = (await http.get(f"{url}/metrics")).json()
        rss["end"] = rss_mib(child.pid)
        rss.setdefault("after_warmup", rss["end"])
        rss["max"] = max([s for _, s in samples] + [rss["end"]])
    return {"tally": tally, "rss": rss, "probe": probe, "requests": sent, "elapsed": elapsed, "active": active,
            "metrics": metrics, "rss_samples": samples}


def report(result: dict, args, command: str) -> tuple[str, bool]:
    tally: Tally = result["tally"]
    rss, probe, metrics = result["rss"], result["probe"], result["metrics"]
    well_formed_failures = sum(n for (kind, _), n in tally.failures.items() if kind != "bad")
    bad_failures = sum(n for (kind, _), n in tally.failures.items() if kind == "bad")
    growth = (rss["end"] - rss["after_warmup"]) / rss["after_warmup"]
    generator_tokens = (metrics.get("generator") or {}).get("tokens")
    lines = [
        f"command: {command}",
        f"machine: {os.cpu_count()} CPUs, load average {[round(x, 2) for x in os.getloadavg()]} at the end",
        f"{result['requests']} requests in {result['elapsed']:.0f} s at {args.concurrency} concurrent "
        f"({result['requests'] / max(result['elapsed'], 1e-9):.1f}/s)",
        "",
        "outcomes by kind:",
    ]
    for (kind, outcome), n in sorted(tally.outcomes.items()):
        lines.append(f"  {kind:<28} {outcome:<28} {n}")
    lines += ["", f"failures of well-formed requests: {well_formed_failures}",
              f"bad requests answered other than their 4xx: {bad_failures}"]
    for (kind, reason), n in sorted(tally.failures.items()):
        lines.append(f"  {kind:<12} {reason:<60} {n}")
    for example in tally.examples:
        lines.append(f"  e.g. {example}")
    ms = lambda v: "-" if v is None else f"{1000 * v:.0f} ms"  # noqa: E731
    lines += [
        "",
        f"time to the budget chunk: p50 {ms(pct(tally.to_budget, 0.5))}, p95 {ms(pct(tally.to_budget, 0.95))} "
        f"({len(tally.to_budget)} streams)",
        f"stream latency (completed): p50 {ms(pct(tally.latency, 0.5))}, p95 {ms(pct(tally.latency, 0.95))}",
        f"RSS: start {rss['start']:.0f} MiB, after warm-up {rss['after_warmup']:.0f} MiB, end {rss['end']:.0f} MiB "
        f"(max {rss['max']:.0f} MiB; end vs after warm-up {100 * growth:+.1f}%)",
        f"/health active at the end: {result['active']}",
        f"/metrics: completed {metrics.get('completed')}, cancelled {metrics.get('cancelled')}, "
        f"aborted_by_disconnect {metrics.get('aborted_by_disconnect')}, failed {metrics.get('failed')}, "
        f"errors (4xx) {metrics.get('errors')}, rejected_busy {metrics.get('rejected_busy')}",
        f"tokens: /metrics {metrics.get('tokens_generated')}, generator {generator_tokens}",
        "",
        "stall probe (one stream alone; then 3 x 1 MB and 3 x 13 kB questions):",
    ]
    for name in ("baseline", "with_huge_questions"):
        w = probe[name]
        lines.append(f"  {name:<20} chunk gap max {w['chunk_gap_max_ms']:.0f} ms (p50 {w['chunk_gap_p50_ms']:.0f} ms, "
                     f"{w['chunks']} gaps), /health max {w['health_max_ms']:.0f} ms")
    for name, answer in probe["answers"].items():
        lines.append(f"  {name} question answered {answer['statuses']} in at most {answer['max_ms']:.0f} ms")
    ok = well_formed_failures == 0 and bad_failures == 0 and result["active"] == 0 and growth <= 0.10
    lines.append("")
    lines.append("PASS" if ok else "FAIL")
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the shipped base model)")
    parser.add_argument("--minutes", type=float, default=10.0, help="traffic duration, warm-up included")
    parser.add_argument("--warmup-minutes", type=float, default=1.0, help="RSS 'after warm-up' is taken then")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent requests")
    parser.add_argument("--max-requests", type=int, default=200_000, help="stop sending after this many")
    parser.add_argument("--max-tokens", type=int, default=48, help="max_completion_tokens of ordinary requests")
    parser.add_argument("--budget", type=int, default=32, help="pre-filled budget of ordinary requests")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds one request may take")
    parser.add_argument("--grace", type=float, default=120.0, help="seconds in-flight requests get after the end")
    parser.add_argument("--seed", type=int, default=0, help="seeds the traffic mix")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    random.seed(args.seed)
    if args.model is None:
        from selfbudgeter.embedded.model import BASE_MODEL_DIR

        args.model = str(BASE_MODEL_DIR)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    port = free_port()
    url = f"http://{HOST}:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        child = start_server(args.model, port, max(64, 2 * args.concurrency), log)
        try:
            result = asyncio.run(soak(url, args, child))
        finally:
            child.terminate()  # the server this script started, by its pid
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=30)
            server_log = log.read_text(errors="replace")
    text, ok = report(result, args, command)
    errors = [line for line in server_log.splitlines() if "ERROR" in line or "Traceback" in line]
    text += f"\nserver log: {len(errors)} error lines" + "".join(f"\n  {line[:200]}" for line in errors[:10])
    print(text)
    if args.out:
        tally: Tally = result["tally"]
        payload = {key: value for key, value in result.items() if key != "tally"}
        payload.update(outcomes={f"{k}|{o}": n for (k, o), n in tally.outcomes.items()},
                       failures={f"{k}|{r}": n for (k, r), n in tally.failures.items()},
                       time_to_budget_p50_s=pct(tally.to_budget, 0.5), time_to_budget_p95_s=pct(tally.to_budget, 0.95),
                       command=command, cpus=os.cpu_count(), load_average=os.getloadavg(), passed=ok)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
