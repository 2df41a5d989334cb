"""Generator latency: how soon the budget is known, how fast stop acts, answer-now, the enforcement bound.

On N questions of the embedded test split it measures

* time to budget vs full generation time, for user budgets (pre-filled: known before any decoding) and for
  the model's own budgets (when the model states one; a base model without the format states none);
* stop latency: `stop()` to the FinalEvent, with and without batch-mates still running (ms);
* answer-now: after a few solution tokens, whether the forced answer yields an extracted, graded answer;
* the enforcement bound: with `enforce_budget` and a user budget, every response has
  `generated_tokens <= int(budget * (1 + slack)) + answer_cap` (every generated token is the solution's;
  `used_tokens`, the solution's length as training measures it, also counts the answer-forcing suffix).

    .venv/bin/python benchmarks/generator_latency.py [--model DIR] [--n 20] [--out results.json]

The model defaults to the shipped base (src/selfbudgeter/embedded/assets/base) when present, else a randomly
initialised model of the same size (timings are then real, answers are not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from selfbudgeter.data import load_benchmark
from selfbudgeter.embedded.model import BASE_MODEL_DIR
from selfbudgeter.serving.generator import BudgetGenerator, FinalEvent, GenerationRequest, TextEvent
from selfbudgeter.core.grading import is_correct


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the shipped base, else random)")
    parser.add_argument("--n", type=int, default=20, help="questions of the embedded test split (default 20)")
    parser.add_argument("--budget", type=int, default=120, help="user budget for the pre-fill runs (default 120)")
    parser.add_argument("--enforce-budget", type=int, default=40, help="budget for the enforcement runs (default 40)")
    parser.add_argument("--slack", type=float, default=0.2)
    parser.add_argument("--answer-cap", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--stop-after", type=int, default=10, help="solution tokens before stop/answer-now")
    parser.add_argument("--batch", type=int, default=4, help="requests in the batched stop runs (default 4)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    return parser


def load(args: argparse.Namespace) -> tuple[BudgetGenerator, str]:
    if args.model is not None or (BASE_MODEL_DIR / "config.json").exists():
        name = args.model or str(BASE_MODEL_DIR)
        return BudgetGenerator.from_pretrained(name, device=args.device), name
    import torch

    from selfbudgeter.embedded.model import build_model, build_tokenizer
    from selfbudgeter.core.models import pick_device

    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    model = build_model(tokenizer).to(pick_device(args.device)).eval()
    torch.manual_seed(args.seed)
    return BudgetGenerator(model, tokenizer), "random model of the embedded base's size"


def _ms(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ms = sorted(v * 1000 for v in values)
    return {"n": len(ms), "median_ms": statistics.median(ms), "max_ms": ms[-1]}


def time_to_budget(gen: BudgetGenerator, rows, args) -> dict:
    out = {}
    for source, budget in (("user", args.budget), ("model", None)):
        handles = []
        for i, row in enumerate(rows):
            request = GenerationRequest(row.question, budget=budget, max_new_tokens=args.max_new_tokens,
                                        seed=args.seed + i)
            handles.append(gen.submit(request))
            handles[-1].result()  # one at a time: a batch would mix the timings of its rows
        finals = [h.result() for h in handles]
        with_budget = [f for f in finals if f.seconds_to_budget is not None]
        ratios = [f.seconds_to_budget / f.seconds_total for f in with_budget if f.seconds_total > 0]
        out[source] = {
            "requests": len(finals),
            "with_budget": len(with_budget),
            "seconds_to_budget_median": (statistics.median(f.seconds_to_budget for f in with_budget)
                                         if with_budget else None),
            "seconds_total_median": statistics.median(f.seconds_total for f in finals),
            "ratio_median": statistics.median(ratios) if ratios else None,
            "ratio_max": max(ratios) if ratios else None,
            "used_tokens_median": statistics.median(f.used_tokens for f in finals),
        }
    return out


def _stop_once(gen: BudgetGenerator, questions: list[str], args, seed: int) -> tuple[float, str]:
    """Stop the first of `questions` (all submitted together) after a few tokens; (seconds, finish_reason)."""
    handles = [
        gen.submit(GenerationRequest(q, budget=args.budget, max_new_tokens=args.max_new_tokens, seed=seed + j))
        for j, q in enumerate(questions)
    ]
    asked = None
    final = None
    for event in handles[0]:
        if isinstance(event, TextEvent) and event.used_tokens >= args.stop_after and asked is None:
            asked = time.perf_counter()
            handles[0].stop()
        if isinstance(event, FinalEvent):
            final = event
    latency = time.perf_counter() - asked if asked is not None else float("nan")
    for other in handles[1:]:
        other.stop()
        other.result()
    return latency, final.finish_reason


def stop_latency(gen: BudgetGenerator, rows, args) -> dict:
    alone, batched, reasons = [], [], []
    for i, row in enumerate(rows[:10]):
        latency, reason = _stop_once(gen, [row.question], args, args.seed + i)
        alone.append(latency)
        reasons.append(reason)
        mates = [r.question for r in rows[i : i + args.batch]] or [row.question]
        latency, reason = _stop_once(gen, mates, args, args.seed + i)
        batched.append(latency)
        reasons.append(reason)
    alone = [v for v in alone if v == v]
    batched = [v for v in batched if v == v]
    return {
        "alone": _ms(alone),
        f"batch_of_{args.batch}": _ms(batched),
        "all_stopped": all(r in ("stopped", "finished", "format_error", "length") for r in reasons),
        "finish_reasons": {r: reasons.count(r) for r in set(reasons)},
    }


def answer_now(gen: BudgetGenerator, rows, args) -> dict:
    answered = correct = early = 0
    latencies, tokens = [], []
    for i, row in enumerate(rows):
        handle = gen.submit(
            GenerationRequest(
                row.question,
                budget=args.budget,
                max_new_tokens=args.max_new_tokens,
                answer_cap=args.answer_cap,
                seed=args.seed + i,
            )
        )
        asked = None
        for event in handle:
            if isinstance(event, TextEvent) and event.used_tokens >= args.stop_after and asked is None:
                asked = time.perf_counter()
                handle.answer_now()
        final = handle.result()
        if asked is not None:
            latencies.append(time.perf_counter() - asked)
        early += final.finish_reason == "answered_early"
        answered += final.answer is not None
        correct += final.answer is not None and is_correct(f"\\boxed{{{final.answer}}}", row.answer)
        tokens.append(final.used_tokens)
    return {
        "requests": len(rows),
        "answered_early": early,
        "with_answer": answered,
        "correct": correct,
        "answer_now_to_final": _ms(latencies),
        "used_tokens_max": max(tokens),
    }


def enforcement(gen: BudgetGenerator, rows, args) -> dict:
    bound = int(args.enforce_budget * (1 + args.slack)) + args.answer_cap
    handles = [
        gen.submit(
            GenerationRequest(
                row.question,
                budget=args.enforce_budget,
                enforce_budget=True,
                slack=args.slack,
                answer_cap=args.answer_cap,
                max_new_tokens=args.max_new_tokens,
                seed=args.seed + i,
            )
        )
        for i, row in enumerate(rows)
    ]
    finals = [h.result() for h in handles]
    used = [f.generated_tokens for f in finals]
    return {
        "requests": len(finals),
        "budget": args.enforce_budget,
        "slack": args.slack,
        "answer_cap": args.answer_cap,
        "bound": bound,
        "generated_tokens_max": max(used),
        "within_bound": sum(u <= bound for u in used),
        "answered_early": sum(f.finish_reason == "answered_early" for f in finals),
        "holds": all(u <= bound for u in used),
    }


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def median_max(timing: dict) -> str:
    return f"{_fmt(timing.get('median_ms'))} / {_fmt(timing.get('max_ms'))}"


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    rows = load_benchmark("embedded", "test", limit=args.n)
    gen, model_name = load(args)
    with gen:
        started = time.perf_counter()
        results = {
            "model": model_name,
            "device": str(gen.model.device),
            "questions": len(rows),
            "tokens_per_second": None,
            "time_to_budget": time_to_budget(gen, rows, args),
            "stop_latency": stop_latency(gen, rows, args),
            "answer_now": answer_now(gen, rows, args),
            "enforcement": enforcement(gen, rows, args),
        }
        results["tokens_per_second"] = gen.tokens_per_second
        results["seconds"] = time.perf_counter() - started
    ttb, stop, ans, enf = (results[k] for k in ("time_to_budget", "stop_latency", "answer_now", "enforcement"))
    table = [
        ("model", model_name),
        ("decode speed (tokens/s per request)", results["tokens_per_second"]),
        ("user budget: seconds to budget (median)", ttb["user"]["seconds_to_budget_median"]),
        ("user budget: seconds total (median)", ttb["user"]["seconds_total_median"]),
        ("user budget: to-budget / total (median)", ttb["user"]["ratio_median"]),
        ("model budget: responses with a budget", f"{ttb['model']['with_budget']}/{ttb['model']['requests']}"),
        ("model budget: to-budget / total (median)", ttb["model"]["ratio_median"]),
        ("stop -> final, alone (median / max ms)", median_max(stop["alone"])),
        (f"stop -> final, batch of {args.batch} (median / max ms)", median_max(stop[f"batch_of_{args.batch}"])),
        ("answer-now: answered early / with answer / correct",
         f"{ans['answered_early']} / {ans['with_answer']} / {ans['correct']} of {ans['requests']}"),
        ("answer-now -> final (median ms)", ans["answer_now_to_final"].get("median_ms")),
        (f"enforcement: generated <= {enf['bound']} (budget {enf['budget']})",
         f"{enf['within_bound']}/{enf['requests']} (max generated {enf['generated_tokens_max']})"),
    ]
    width = max(len(name) for name, _ in table)
    for name, value in table:
        print(f"{name:<{width}}  {_fmt(value)}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0 if enf["holds"] else 1


if __name__ == "__main__":
    sys.exit(main())
