"""Prefix sensitivity: does a model still reason when text sits before its first step?

Samples each of the first N embedded test questions once (T = 0.6, seeded) three ways: the plain prompt,
the prompt with a budget tag pre-filled (`<budget>140</budget><solution>`, what the cold start teaches the
model to write), and the prompt followed by a neutral sentence of about the same length. It reports the
share of answers that are right (the last `\\boxed{}` equals the gold answer, whatever the format). On the
shipped base model this is why the cold start needs enough data: its accuracy collapses under either prefix.

    .venv/bin/python benchmarks/prefix_sensitivity.py [--model DIR] [--n 200] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from selfbudgeter.data import load_benchmark, prompt_text
from selfbudgeter.embedded import BASE_MODEL_DIR
from selfbudgeter.format import render_prefill
from selfbudgeter.generation import generate
from selfbudgeter.models import load_model

PREFIXES = {"none": "", "budget tag": render_prefill(140), "neutral sentence": "Okay, let me think it over.\n"}
BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(BASE_MODEL_DIR), help="model directory (default: the shipped base)")
    parser.add_argument("--n", type=int, default=200, help="test questions (default 200)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    rows = load_benchmark("embedded", split="test")[: args.n]
    results = {}
    for name, prefix in PREFIXES.items():
        prompts = [prompt_text(tokenizer, r.question, system_prompt=None) + prefix for r in rows]
        samples = generate(model, tokenizer, prompts, n=1, temperature=args.temperature, max_new_tokens=384,
                           batch_size=64, seed=args.seed, progress=False)
        right = 0
        for row, (sample,) in zip(rows, samples):
            found = BOXED.findall(sample.text)
            right += bool(found) and found[-1] == row.answer
        tokens = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        results[name] = {"prefix_tokens": tokens, "answer_accuracy": right / len(rows)}
        print(f"{name:<18} prefix {tokens:>2} tokens  answers right {right / len(rows):.1%}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "n": len(rows), **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
