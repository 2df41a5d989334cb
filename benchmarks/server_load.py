"""Server load: N concurrent streaming chat requests through the HTTP server vs the same requests on the library.

Both runs use one BudgetGenerator over the embedded-size model (the shipped base at
src/selfbudgeter/embedded/assets/base when present, else a randomly initialised model of the same size), the same
questions (the embedded task's test split) and the same per-request seeds, so the difference is the cost of
the server: HTTP, JSON, SSE and the asyncio bridge. The server runs as `selfbudgeter serve` does (uvicorn
in the generator's process, on 127.0.0.1); the load comes from the official `openai` client (AsyncOpenAI,
streaming, include_usage) in a separate process, as real clients would, so that the client's own parsing
does not compete with the server for this process's interpreter lock. `batches` counts the generator's
`model.generate` calls: requests that arrive spread out form more, smaller batches.

Time to budget is measured by the caller, from sending the request to receiving the budget (the budget
chunk on the server; the BudgetEvent on the library). The base model was not trained to state a budget, so
by default each request pre-fills one (`--budget 64`); `--budget model` lets a trained model state its own.

    .venv/bin/python benchmarks/server_load.py [--requests 32] [--max-tokens 64] [--budget 64] [--repeats 3]
                                               [--out load.json]

Counts and times are pooled over the repeats (wall_seconds and tokens are totals over all rounds).
"""

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger("server_load")


@dataclass
class Run:
    name: str
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    time_to_budget: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_seconds: float = 0.0
    batches: int = 0

    def merge(self, other: "Run") -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.time_to_budget += other.time_to_budget
        self.latency += other.latency
        self.tokens += other.tokens
        self.wall_seconds += other.wall_seconds
        self.batches += other.batches

    def summary(self) -> dict:
        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

        return {
            "requests": self.requests,
            "errors": len(self.errors),
            "time_to_budget_p50_s": pct(self.time_to_budget, 0.5),
            "time_to_budget_p95_s": pct(self.time_to_budget, 0.95),
            "latency_p50_s": pct(self.latency, 0.5),
            "latency_p95_s": pct(self.latency, 0.95),
            "tokens": self.tokens,
            "batches": self.batches,
            "wall_seconds": self.wall_seconds,
            "tokens_per_second": self.tokens / self.wall_seconds if self.wall_seconds else None,
        }


def load_generator(model: str | None, device: str, max_batch_size: int):
    from selfbudgeter.embedded import model as embedded
    from selfbudgeter.serving.generator import BudgetGenerator

    if model is None and (embedded.BASE_MODEL_DIR / "config.json").exists():
        model = str(embedded.BASE_MODEL_DIR)
    if model is not None:
        logger.info("model: %s", model)
        return BudgetGenerator.from_pretrained(model, device=device, max_batch_size=max_batch_size), model
    logger.info("model: random embedded-size Llama (no shipped base model found)")
    tokenizer = embedded.build_tokenizer()
    net = embedded.build_model(tokenizer).to("cpu" if device == "auto" else device).eval()
    return BudgetGenerator(net, tokenizer, max_batch_size=max_batch_size), "random embedded-size model"


def make_requests(n: int, budget: int | None, max_tokens: int) -> list[dict]:
    from selfbudgeter.embedded import task

    rows = task.load_split("test")
    return [
        {"question": rows[i % len(rows)].question, "budget": budget, "max_new_tokens": max_tokens, "seed": i}
        for i in range(n)
    ]


async def run_library(generator, requests: list[dict]) -> Run:
    from selfbudgeter.serving.generator import BudgetEvent, FinalEvent, GenerationRequest

    run = Run("library", requests=len(requests))

    async def one(spec: dict) -> None:
        started = time.perf_counter()
        try:
            handle = generator.submit(GenerationRequest(**spec))
            async for event in handle.aiter():
                if isinstance(event, BudgetEvent):
                    run.time_to_budget.append(time.perf_counter() - started)
                elif isinstance(event, FinalEvent):
                    run.tokens += event.generated_tokens
            run.latency.append(time.perf_counter() - started)
        except Exception as err:  # a load test counts failures instead of stopping at the first
            run.errors.append(f"{type(err).__name__}: {err}")

    started = time.perf_counter()
    await asyncio.gather(*(one(spec) for spec in requests))
    run.wall_seconds = time.perf_counter() - started
    return run


async def run_server(base_url: str, requests: list[dict]) -> Run:
    import openai

    run = Run("server", requests=len(requests))
    client = openai.AsyncOpenAI(base_url=base_url, api_key="load", max_retries=0, timeout=600)

    async def one(spec: dict) -> None:
        extra = {} if spec["budget"] is None else {"thinking_token_budget": spec["budget"]}
        started = time.perf_counter()
        try:
            stream = await client.chat.completions.create(
                model="load", messages=[{"role": "user", "content": spec["question"]}], stream=True,
                max_completion_tokens=spec["max_new_tokens"], seed=spec["seed"],
                stream_options={"include_usage": True}, extra_body=extra,
            )
            async for chunk in stream:
                if chunk.choices and (chunk.choices[0].delta.model_extra or {}).get("budget"):
                    run.time_to_budget.append(time.perf_counter() - started)
                if chunk.usage is not None:
                    run.tokens += chunk.usage.completion_tokens
            run.latency.append(time.perf_counter() - started)
        except Exception as err:
            run.errors.append(f"{type(err).__name__}: {err}")

    started = time.perf_counter()
    await asyncio.gather(*(one(spec) for spec in requests))
    run.wall_seconds = time.perf_counter() - started
    await client.close()
    return run


def start_server(generator, concurrency: int):
    import uvicorn

    from selfbudgeter.serving.server import ServerConfig, create_app

    config = ServerConfig(served_model_name="load", max_concurrent=max(64, concurrency))
    server = uvicorn.Server(uvicorn.Config(create_app(generator, config), host="127.0.0.1", port=0,
                                           log_level="warning", limit_max_requests=100_000))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}/v1"


def table(results: dict[str, dict], ratio: dict[str, float | None]) -> str:
    def cell(value) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    keys = ["requests", "errors", "time_to_budget_p50_s", "time_to_budget_p95_s", "latency_p50_s", "latency_p95_s",
            "tokens", "batches", "wall_seconds", "tokens_per_second"]
    lines = [f"| {'metric':<22} | {'library':>10} | {'server':>10} | {'server/library':>14} |",
             f"|{'-' * 24}|{'-' * 12}|{'-' * 12}|{'-' * 16}|"]
    for key in keys:
        lines.append(f"| {key:<22} | {cell(results['library'][key]):>10} | {cell(results['server'][key]):>10} | "
                     f"{cell(ratio.get(key)):>14} |")
    return "\n".join(lines)


def run_server_in_client_process(base_url: str, requests: list[dict]) -> Run:
    """The server run, with the openai client in a child process (see the module docstring)."""
    payload = json.dumps({"base_url": base_url, "requests": requests})
    child = subprocess.run([sys.executable, __file__, "--drive"], input=payload, capture_output=True, text=True,
                           timeout=1800)
    if child.returncode != 0:
        raise RuntimeError(f"the load client failed: {child.stderr.strip()[-2000:]}")
    return Run(**json.loads(child.stdout))


def drive() -> int:
    """Child-process mode: read {"base_url", "requests"} on stdin, run them, print the Run as JSON."""
    spec = json.loads(sys.stdin.read())
    run = asyncio.run(run_server(spec["base_url"], spec["requests"]))
    print(json.dumps(asdict(run)))
    return 0


def measured(generator, run_once) -> Run:
    batches = generator.stats()["batches"]
    run = run_once()
    run.batches = generator.stats()["batches"] - batches
    return run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--drive"]:
        return drive()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the shipped base, else random)")
    parser.add_argument("--requests", type=int, default=32, help="concurrent streaming requests")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_completion_tokens of every request")
    parser.add_argument("--budget", default="64", help="pre-filled budget, or `model` to let the model state it")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, library and server alternating")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    budget = None if args.budget == "model" else int(args.budget)

    generator, model_name = load_generator(args.model, args.device, args.max_batch_size)
    requests = make_requests(args.requests, budget, args.max_tokens)
    server, thread, base_url = start_server(generator, args.requests)
    try:
        # One small round each first, so neither run pays for first-call costs (allocations, imports).
        asyncio.run(run_library(generator, requests[:2]))
        run_server_in_client_process(base_url, requests[:2])
        # Alternate the two, so that a shared machine's changing load falls on both alike; pool the rounds.
        library, served = Run("library"), Run("server")
        for _ in range(args.repeats):
            library.merge(measured(generator, lambda: asyncio.run(run_library(generator, requests))))
            served.merge(measured(generator, lambda: run_server_in_client_process(base_url, requests)))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        generator.close()

    results = {"library": library.summary(), "server": served.summary()}
    ratio = {
        key: (results["server"][key] / results["library"][key]) if results["library"][key] else None
        for key in ("time_to_budget_p50_s", "time_to_budget_p95_s", "latency_p50_s", "latency_p95_s",
                    "wall_seconds", "tokens_per_second")
    }
    load = [round(x, 2) for x in os.getloadavg()]  # a shared machine skews both runs: say how busy it was
    print(f"{args.repeats} x {args.requests} concurrent streaming requests, max {args.max_tokens} tokens, "
          f"budget {args.budget}, model: {model_name}, device: {args.device}, "
          f"load average {load} on {os.cpu_count()} CPUs")
    print(table(results, ratio))
    for run in (library, served):
        for error in run.errors[:5]:
            print(f"{run.name} error: {error}", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": model_name, "device": args.device, "requests": args.requests, "repeats": args.repeats,
                   "max_tokens": args.max_tokens, "budget": args.budget, "load_average": load,
                   "cpus": os.cpu_count(), "results": results,
                   "server_over_library": ratio, "errors": {"library": library.errors, "server": served.errors}}
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")
    return 1 if library.errors or served.errors else 0


if __name__ == "__main__":
    sys.exit(main())
