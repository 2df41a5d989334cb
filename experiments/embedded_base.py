"""The embedded base model's properties: accurate, overthinking, robust to what precedes it and to wording.

Samples each question of a split once (T 0.6, seeded) four ways: the plain prompt; the prompt with a budget
tag pre-filled (`<budget>140</budget><solution>`, which the base model never saw); the prompt followed by a
neutral sentence; and the same problems reworded with object words no split or trace uses. Prints, for
each way, the share of answers whose last `\\boxed{}` is right; for the plain prompt also the mean length
on 1-3-step questions against the minimal solution, and accuracy by how the first pass was written
(one operation per line, or lines that combine several), which is what makes tokens buy accuracy.

    .venv/bin/python experiments/embedded_base.py [--model DIR] [--split validation] [--n 400] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from selfbudgeter.embedded import task
from selfbudgeter.data import load_benchmark, prompt_text
from selfbudgeter.embedded.model import BASE_MODEL_DIR
from selfbudgeter.core.format import render_prefill, token_length
from selfbudgeter.evaluation.generation import generate
from selfbudgeter.core.models import load_model

PREFIXES = {"plain": "", "budget tag": render_prefill(140), "neutral sentence": "Okay, let me think it over.\n"}
BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def right(text: str, answer: str) -> bool:
    found = BOXED.findall(text)
    return bool(found) and found[-1] == answer


def plan_kind(text: str) -> str:
    lines = task.first_pass(text)
    if not lines:
        return "none"
    return "stepwise" if all(first == last for first, last, *_ in lines) else "combined"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(BASE_MODEL_DIR), help="model directory (default: the shipped base)")
    parser.add_argument("--split", default="validation", choices=["validation", "test"])
    parser.add_argument("--n", type=int, default=400, help="questions (default 400: the whole split)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    rows = load_benchmark("embedded", split=args.split)[: args.n]
    ways = {name: (rows, prefix) for name, prefix in PREFIXES.items()}
    ways["unseen words"] = (task.reworded(rows, seed=args.seed), "")
    results: dict[str, dict] = {}
    for name, (questions, prefix) in ways.items():
        prompts = [prompt_text(tokenizer, r.question, system_prompt=None) + prefix for r in questions]
        samples = generate(model, tokenizer, prompts, n=1, temperature=args.temperature, max_new_tokens=384,
                           batch_size=64, seed=args.seed, progress=False)
        texts = [s.text for (s,) in samples]
        ok = [right(t, r.answer) for t, r in zip(texts, questions)]
        results[name] = {"accuracy": sum(ok) / len(ok)}
        line = f"{name:<17} accuracy {results[name]['accuracy']:.1%}"
        if name == "plain":
            easy = [(token_length(tokenizer, t), token_length(tokenizer, r.solution))
                    for t, r in zip(texts, questions) if r.difficulty <= 3]
            ratio = sum(a for a, _ in easy) / sum(b for _, b in easy)
            kinds: dict[str, list[bool]] = {}
            for t, r, good in zip(texts, questions, ok):
                if r.difficulty >= 4:
                    kinds.setdefault(plan_kind(t), []).append(good)
            by_kind = {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(kinds.items())}
            results[name].update(easy_length_ratio=ratio, hard_accuracy_by_plan=by_kind,
                                 mean_tokens=sum(token_length(tokenizer, t) for t in texts) / len(texts))
            line += f"  mean {results[name]['mean_tokens']:.1f} tokens; 1-3 steps: {ratio:.2f}x the minimal"
            line += "; 4-8 steps by plan: " + ", ".join(f"{k} {v['accuracy']:.1%} (n={v['n']})"
                                                        for k, v in by_kind.items())
        else:
            line += f"  ({results[name]['accuracy'] - results['plain']['accuracy']:+.1%} against plain)"
        print(line, flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "split": args.split, "n": len(rows), **results},
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
