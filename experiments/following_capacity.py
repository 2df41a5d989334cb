"""Can the embedded model learn to follow a budget at all, given enough cold-start data?

Builds SFT rows from rendered base-style traces (correct by construction), or from a profile of the base
model's own answers (`--from_profile`), labelled with their token length, `--rows` of them, fine-tunes a
base model on them with the embedded SFT recipe, then measures the control slope (median over questions of
the slope of log length on log user budget) on validation questions with budgets of 0.5x..2x of the
stepwise solution's length, greedy.

    .venv/bin/python experiments/following_capacity.py --base runs/base-v2 --rows 8000 --out runs/capacity
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path

from selfbudgeter.embedded import task
from selfbudgeter.core.metrics import linear_fit
from selfbudgeter.data import prompt_text, read_jsonl, write_jsonl
from selfbudgeter.core.format import render_response, token_length, try_parse


def without_filler(response: str) -> str:
    """A base answer without its filler lines and preamble: first-pass, check, repair and answer lines stay."""
    keep = ("Check ", "Wait, the check gives", "So the answer is ")
    lines = [line for line in response.splitlines()
             if task._STEP_LINE.match(line.strip()) or line.strip().startswith(keep)]
    return "\n".join(lines)


def own_spread_rows(tok, profile: Path, strip_filler: bool = False) -> list[dict]:
    """Of each profiled question's distinct correct samples, the shortest, the median and the longest."""
    by_id: dict[str, set[str]] = {}
    for sample in read_jsonl(profile / "samples.jsonl"):
        if sample["correct"]:
            text = without_filler(sample["response"]) if strip_filler else sample["response"]
            by_id.setdefault(sample["id"], set()).add(text)
    questions = {q["id"]: q["question"] for q in read_jsonl(profile / "questions.jsonl")}
    rows = []
    for qid, texts in by_id.items():
        ranked = sorted((token_length(tok, t), t) for t in texts)
        for i in sorted({0, len(ranked) // 2, len(ranked) - 1}):
            n, text = ranked[i]
            rows.append(_row(tok, qid, questions[qid], text, n))
    return rows


def rendered_rows(tok, n: int, pairs: bool, rng: random.Random) -> list[dict]:
    """Rendered base-style traces of training questions; with `pairs`, each question three ways."""
    rows = []
    for row in task.load_split("train")[: n // 3 if pairs else n]:
        problem = task.parse_question(row.question)
        texts = [task.render_trace(problem, rng)]
        if pairs:
            texts += [task.minimal_solution(problem), task.render(problem, task.stepwise_plan(problem))]
        rows += [_row(tok, row.id, row.question, text, token_length(tok, text)) for text in texts]
    return rows


def _row(tok, qid: str, question: str, text: str, n: int) -> dict:
    return {"prompt": prompt_text(tok, question, system_prompt=None), "completion": render_response(n, text),
            "id": qid, "budget": n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--pairs", action="store_true",
                        help="each question three times: the direct solution, one step per line, and a sampled "
                        "base trace, each labelled with its own length (rows / 3 questions)")
    parser.add_argument("--from_profile", type=Path,
                        help="rows from a profile of the base model instead of rendered traces: of each question's "
                        "correct samples the shortest, the median and the longest, each labelled with its own length")
    parser.add_argument("--strip_filler", action="store_true",
                        help="with --from_profile: drop the filler lines and preambles of the base's answers first "
                        "(first pass, verification and answer lines stay), so that a length is a way of solving")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from selfbudgeter.training import sft
    from selfbudgeter.evaluation.generation import generate
    from selfbudgeter.core.models import load_model

    tok = AutoTokenizer.from_pretrained(args.base)
    rng = random.Random(0)
    if args.from_profile:
        rows = own_spread_rows(tok, args.from_profile, args.strip_filler)[: args.rows]
    else:
        rows = rendered_rows(tok, args.rows, args.pairs, rng)
    rng.shuffle(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", rows)
    model_dir = args.out / "model"
    if not (model_dir / "model.safetensors").exists():
        sft.main(["--config", "embedded/sft", "--model", args.base, "--dataset", str(args.out / "train.jsonl"),
                  "--output_dir", str(model_dir), "--num_train_epochs", str(args.epochs)])
    model, tok = load_model(str(model_dir), device="cpu", dtype="float32")
    questions = task.load_split("validation")[: args.questions]
    jobs = []
    for row in questions:
        ref = token_length(tok, task.render(task.parse_question(row.question), task.stepwise_plan(task.parse_question(row.question))))
        for m in (0.5, 0.75, 1.0, 1.5, 2.0):
            jobs.append((row, m, max(1, round(m * ref))))
    prompts = [prompt_text(tok, r.question, budget=b, system_prompt=None) for r, _, b in jobs]
    out = generate(model, tok, prompts, n=1, temperature=0.0, max_new_tokens=380, batch_size=64, progress=False)
    per_q: dict[str, list[tuple[float, float]]] = {}
    within = []
    for (row, m, b), (s,) in zip(jobs, out):
        parsed = try_parse(f"<budget>{b}</budget><solution>" + s.text)
        if isinstance(parsed, Exception):
            continue
        length = token_length(tok, parsed.solution)
        per_q.setdefault(row.id, []).append((math.log(b), math.log(max(1, length))))
        within.append(abs(length - b) <= 0.2 * b)
    slopes = [linear_fit(*zip(*pts))[0] for pts in per_q.values() if len(pts) >= 3]
    slopes = [s for s in slopes if s is not None]
    result = {"rows": args.rows, "median_slope": statistics.median(slopes), "within_20": sum(within) / len(within)}
    print(json.dumps(result))
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
