"""`selfbudgeter inspect-base`: the embedded base model's profile on the held-out test split.

Samples the model once per test question (the `profile` stage with the embedded recipe), then reports
accuracy and length overall and per difficulty level, how much longer its answers are than the minimal
correct solution, and the share of tokens spent on filler (`task.split_filler`): re-checks and phrases
that a correct solution does not need. Spearman correlations show that the filler, unlike the needed
work, does not grow with difficulty.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.format import token_length
from ..data import read_jsonl
from . import task


def inspect(samples: list[dict], tokenizer) -> dict:
    """Per-difficulty and overall figures from profile samples of the embedded test split."""
    from scipy.stats import spearmanr

    minimal = {r.id: token_length(tokenizer, r.solution) for r in task.load_split("test")}
    levels: dict[int, list[dict]] = {}
    for s in samples:
        s = dict(s, filler_tokens=task.filler_tokens(tokenizer, s["response"]), minimal=minimal[s["id"]])
        levels.setdefault(int(s["difficulty"]), []).append(s)

    def figures(rows: list[dict]) -> dict:
        lengths = sorted(r["n_tokens"] for r in rows)
        return {
            "n": len(rows),
            "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "mean_tokens": sum(lengths) / len(rows),
            "median_tokens": lengths[len(lengths) // 2],
            "minimal_tokens": sum(r["minimal"] for r in rows) / len(rows),
            "filler_tokens": sum(r["filler_tokens"] for r in rows) / len(rows),
            "filler_share": sum(r["filler_tokens"] for r in rows) / max(1, sum(lengths)),
        }

    every = [r for rows in levels.values() for r in rows]
    overall = figures(every)
    overall["length_over_minimal"] = overall["mean_tokens"] / overall["minimal_tokens"]
    difficulty = [r["difficulty"] for r in every]
    overall["spearman_filler_difficulty"] = float(spearmanr(difficulty, [r["filler_tokens"] for r in every])[0])
    overall["spearman_needed_difficulty"] = float(
        spearmanr(difficulty, [r["n_tokens"] - r["filler_tokens"] for r in every])[0]
    )
    return {"overall": overall, "by_difficulty": {d: figures(levels[d]) for d in sorted(levels)}}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfbudgeter inspect-base",
        description="Profile the embedded base model on the 400 held-out test questions (one response each, "
        "greedy unless --temperature is given): accuracy, length, length over the minimal solution, and the "
        "share of filler tokens.",
    )
    parser.add_argument("--model", default="embedded", help="model to inspect (default: the shipped base)")
    parser.add_argument("--out", type=Path, default=Path("runs/inspect-base"), help="profile folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature (default 0: greedy, the model's own best answer)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..core.models import load_tokenizer
    from ..evaluation.report import print_table
    from ..training.profile import main as profile_main

    args = make_parser().parse_args(argv)
    code = profile_main(["--config", "embedded/profile", "--model", args.model, "--split", "test", "--limit", "400",
                         "--samples", "1", "--out", str(args.out), "--seed", str(args.seed),
                         "--temperature", str(args.temperature)])
    if code:
        return code
    result = inspect(read_jsonl(args.out / "samples.jsonl"), load_tokenizer(args.model))
    (args.out / "inspect.json").write_text(json.dumps(result, indent=2))
    rows = [["steps", "n", "accuracy", "mean", "median", "minimal", "filler", "share"]]
    for level, f in [*result["by_difficulty"].items(), ("all", result["overall"])]:
        rows.append([str(level), str(f["n"]), f"{f['accuracy']:.1%}", f"{f['mean_tokens']:.1f}",
                     f"{f['median_tokens']:g}", f"{f['minimal_tokens']:.1f}", f"{f['filler_tokens']:.1f}",
                     f"{f['filler_share']:.1%}"])
    o = result["overall"]
    print_table(rows, f"the base model {args.model} on the embedded test split",
                f"mean length / minimal correct solution: {o['length_over_minimal']:.2f}x",
                f"Spearman with difficulty: filler tokens {o['spearman_filler_difficulty']:+.2f}, "
                f"needed tokens {o['spearman_needed_difficulty']:+.2f}",
                f"written to {args.out / 'inspect.json'}")
    return 0
