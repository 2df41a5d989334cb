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
from selfbudgeter.data import prompt_text, write_jsonl
from selfbudgeter.core.format import render_response, token_length, try_parse


def without_filler(response: str) -> str:
    """A base answer without its filler lines and preamble: first-pass, check, repair and answer lines stay."""
    keep = ("Check ", "Wait, the check gives", "So the answer is ")
    lines = [line for line in response.splitlines()
             if task._STEP_LINE.match(line.strip()) or line.strip().startswith(keep)]
    return "\n".join(lines)


def own_spread_rows(tok, profile: Path, strip_filler: bool = False) -> list[dict]:
    """Of each profiled question's distinct correct samples, the shortest, the median and the longest."""
    by_id: dict[str, list[str]] = {}
    for line in (profile / "samples.jsonl").read_text().splitlines():
        sample = json.loads(line)
        if sample["correct"]:
            text = without_filler(sample["response"]) if strip_filler else sample["response"]
            by_id.setdefault(sample["id"], []).append(text)
    questions = {json.loads(line)["id"]: json.loads(line) for line in (profile / "questions.jsonl").read_text().splitlines()}
    rows = []
    for qid, texts in by_id.items():
        texts = sorted(set(texts), key=lambda t: token_length(tok, t))
        picks = {0, len(texts) // 2, len(texts) - 1}
        for i in sorted(picks):
            n = token_length(tok, texts[i])
            rows.append({"prompt": prompt_text(tok, questions[qid]["question"], system_prompt=None),
                         "completion": render_response(n, texts[i]), "id": qid, "budget": n})
    return rows


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
    rows = []
    questions = [] if args.from_profile else task.load_split("train")[: args.rows // 3 if args.pairs else args.rows]
    if args.from_profile:
        rows = own_spread_rows(tok, args.from_profile, args.strip_filler)[: args.rows]
    for row in questions:
        problem = task.parse_question(row.question)
        texts = [task.render_trace(problem, rng)]
        if args.pairs:
            texts += [task.minimal_solution(problem), task.render(problem, task.stepwise_plan(problem))]
        for text in texts:
            n = token_length(tok, text)
            rows.append({"prompt": prompt_text(tok, row.question, system_prompt=None),
                         "completion": render_response(n, text), "id": row.id, "budget": n})
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
    slopes = []
    for pts in per_q.values():
        if len(pts) >= 3:
            mx = statistics.mean(x for x, _ in pts)
            my = statistics.mean(y for _, y in pts)
            den = sum((x - mx) ** 2 for x, _ in pts)
            slopes.append(sum((x - mx) * (y - my) for x, y in pts) / den)
    result = {"rows": args.rows, "median_slope": statistics.median(slopes), "within_20": sum(within) / len(within)}
    print(json.dumps(result))
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
