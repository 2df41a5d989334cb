"""Budget-guided GRPO's targets for a trained embedded model, on evaluations pooled over seeds.

The targets (issue "Budget-guided GRPO", on the held-out test split, against the base model): mean length
<= 40% of the base's, accuracy >= the base's minus 1 point, >= 90% of responses within ±20% of their own
budget, Spearman budget~difficulty >= 0.8. One sample of the 400 test questions gives an accuracy near 96%
with a standard error of about 1 point, the size of the accuracy target's margin, so this script runs
`selfbudgeter eval` (embedded/eval: T 0.6) on the base model and on the model with `--samples` responses
per question at each of `--seeds`, pools every response of each, and prints the four targets per seed and
pooled: the measured value, the bound, met or not.

    .venv/bin/python experiments/targets.py --base runs/demo/models/base \\
        --model runs/grpo-variants/long_polish_peak [--out runs/targets] [--seeds 0 1 2] [--samples 4]

Evaluations go to OUT/{base,model}-NAME-samplesN-seedS (NAME: the model folder's name); finished ones (a
folder with items.jsonl) are read back, not rerun, so several models share the base's. About 2 minutes per
seed for the base model and 40 s for a trained one on a 2-core CPU. The table goes to OUT/targets-NAME.md,
the package versions and machine to OUT/environment.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from selfbudgeter.core.metrics import summarize
from selfbudgeter.evaluation.report import environment, load_records

# name -> (what it measures, the bound, True if the value must be at least the bound).
TARGETS = {
    "length vs base": ("mean solution tokens / the base model's", 0.40, False),
    "accuracy - base": ("accuracy minus the base model's", -0.01, True),
    "within ±20%": ("responses within ±20% of their own budget", 0.90, True),
    "Spearman budget~difficulty": ("rank correlation of budget and number of steps", 0.80, True),
}
EPSILON = 1e-9


def check(base: dict, model: dict) -> dict[str, tuple[float, bool]]:
    """Each target's value and whether it is met, from the `metrics.summarize` of the base and the model."""
    values = {
        "length vs base": model["mean_tokens"] / base["mean_tokens"],
        "accuracy - base": model["accuracy"] - base["accuracy"],
        "within ±20%": model.get("within_20"),
        "Spearman budget~difficulty": model.get("spearman_budget_difficulty"),
    }
    out = {}
    for name, (_, bound, at_least) in TARGETS.items():
        value = values[name]
        # A value at its bound is met: 387/400 - 391/400 is -0.010000000000000009 in floating point.
        met = value is not None and (value >= bound - EPSILON if at_least else value <= bound + EPSILON)
        out[name] = (value, met)
    return out


def evaluate(model: Path, out: Path, seed: int, samples: int, budgeted: bool) -> Path:
    if not (out / "items.jsonl").exists():
        argv = ["eval", "--config", "embedded/eval", "--model", str(model), "--out", str(out), "--seed", str(seed),
                "--samples", str(samples), "--control_limit", "0", "--budgeted", str(budgeted).lower()]
        with (out.parent / f"{out.name}.log").open("w") as log:
            code = subprocess.call([sys.executable, "-m", "selfbudgeter.cli", *argv], stdout=log,
                                   stderr=subprocess.STDOUT)
        if code:
            raise SystemExit(f"eval of {model} failed ({code}); see {out.parent / f'{out.name}.log'}")
    return out


def table(rows: dict[str, tuple[dict, dict]]) -> str:
    """One line per evaluation (a seed, or the pool): n, both accuracies, then each target's value and mark."""
    head = ["evaluation", "responses", "base accuracy", "accuracy", "base tokens", "tokens", *TARGETS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, (base, model) in rows.items():
        cells = [label, str(model["n"]), f"{base['accuracy']:.2%}", f"{model['accuracy']:.2%}",
                 f"{base['mean_tokens']:.1f}", f"{model['mean_tokens']:.1f}"]
        for name, (value, met) in check(base, model).items():
            shown = "-" if value is None else f"{value * 100:+.2f} pts" if name == "accuracy - base" else f"{value:.3f}"
            cells.append(f"{shown} {'met' if met else 'NOT met'}")
        lines.append("| " + " | ".join(cells) + " |")
    bounds = ", ".join(f"{name} {'>=' if at_least else '<='} "
                       + (f"{bound * 100:+g} pts" if name == "accuracy - base" else f"{bound:g}")
                       for name, (_, bound, at_least) in TARGETS.items())
    return "\n".join(lines) + f"\n\nTargets: {bounds}."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the base model (evaluated without budgets)")
    parser.add_argument("--model", type=Path, required=True, help="the trained SelfBudgeter model")
    parser.add_argument("--out", type=Path, default=Path("runs/targets"), help="evaluations and tables")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="evaluation seeds, pooled")
    parser.add_argument("--samples", type=int, default=4, help="responses per question and seed")
    args = parser.parse_args()
    for model in (args.base, args.model):
        if not (model / "config.json").exists():
            parser.error(f"{model} is not a model folder (no config.json)")
    args.out.mkdir(parents=True, exist_ok=True)
    records: dict[str, list] = {"base": [], "model": []}
    rows = {}
    for seed in args.seeds:
        per_seed = {}
        for name, model, budgeted in (("base", args.base, False), ("model", args.model, True)):
            folder = args.out / f"{name}-{model.name}-samples{args.samples}-seed{seed}"
            folder = evaluate(model, folder, seed, args.samples, budgeted)
            seed_records = load_records(folder)
            records[name] += seed_records
            per_seed[name] = summarize(seed_records)
        rows[f"seed {seed}"] = (per_seed["base"], per_seed["model"])
        print(table({f"seed {seed}": rows[f"seed {seed}"]}).splitlines()[2], flush=True)
    rows["pooled"] = (summarize(records["base"]), summarize(records["model"]))
    text = f"{args.model} against {args.base}, {args.samples} samples per question and seed\n\n{table(rows)}\n"
    (args.out / f"targets-{args.model.name}.md").write_text(text)
    (args.out / "environment.json").write_text(json.dumps(environment(), indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
