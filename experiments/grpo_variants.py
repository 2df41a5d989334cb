"""GRPO variants on the embedded default: what the recipe's settings do to accuracy, length and adherence.

Starts from a finished demo folder (its cold-start model, profile and base-model evaluation) and runs
`selfbudgeter grpo` once per variant (the embedded recipe, or the packaged recipe the variant names, plus
the variant's overrides and the demo's own flags `--profile_only true --solved_only true`), then
`selfbudgeter eval` on the 400 test questions (user-budget control on 50 of them) with the demo's base
evaluation as the compression baseline, and prints one table row per variant. The variants read the
shipped recipes, never the other way round.

    .venv/bin/python experiments/grpo_variants.py --demo runs/demo [--out runs/grpo-variants] [--only NAME ...]

Each variant takes 4 to 12 minutes on a 2-core CPU (the long ones 20 to 35); finished variants (an eval
folder with metrics.json) are skipped on a rerun, and those the demo ran itself (the recipe; the baselines
after `demo --baselines`) are read from the demo folder. The long_polish variants go on from the
long_lr2.5e-5 model (trained first if missing). The rows are written to OUT/variants.json and
OUT/variants.md, the package versions and machine to OUT/environment.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from selfbudgeter.evaluation.report import environment

# name -> (what it changes, overrides of embedded/grpo). "recipe" is the demo's own GRPO run, read from the demo.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "recipe": ("the embedded recipe as the demo ran it (see embedded/grpo.yaml)", []),
    "spec_only": ("the paper's GRPO: SPEC reward only, no budget relabelling", ["--budget_relabel_weight", "0"]),
    "no_kl": ("no KL term (beta 0)", ["--beta", "0"]),
    "temperature06": ("rollouts at T 0.6 (the paper's)", ["--temperature", "0.6"]),
    "beta0.5": ("a 10x stronger KL term to the cold start (beta 0.5)", ["--beta", "0.5"]),
    "lr5e-5": ("learning rate 5e-5", ["--learning_rate", "5e-5"]),
    "cosine": ("learning rate 1e-4 decayed to 0 (cosine)", ["--lr_scheduler_type", "cosine"]),
    "wsd_decay25": ("learning rate 1e-4 cosine-decayed to 1e-5 over the last 25 steps",
                    ["--lr_scheduler_type", "warmup_stable_decay",
                     "--lr_scheduler_kwargs", '{"num_decay_steps": 25, "min_lr_ratio": 0.1}']),
    "long_lr2.5e-5": ("4x the steps at a quarter of the learning rate: 300 steps at 2.5e-5 (embedded/grpo_long)",
                      ["--config", "embedded/grpo_long"]),
    "long_lr1.5e-5": ("6.7x the steps at 15% of the learning rate (500 steps at 1.5e-5)",
                      ["--learning_rate", "1.5e-5", "--max_steps", "500"]),
    "polish60": ("the recipe's 75 steps, then 60 more at the final alpha (0.1) and a tenth of the learning rate",
                 ["--max_steps", "135", "--alpha_steps", "75", "--lr_scheduler_type", "warmup_stable_decay",
                  "--lr_scheduler_kwargs", '{"num_stable_steps": 70, "num_decay_steps": 1, "min_lr_ratio": 0.1}']),
    "long_polish_own": ("long_lr2.5e-5, then 180 steps at the final alpha (0.1), lr 2e-5, rollouts at T 0.6, "
                        "budgets relabelled with their own length (embedded/grpo_polish with target own)",
                        ["--config", "embedded/grpo_polish", "--budget_relabel_target", "own"]),
    "long_polish_peak": ("long_polish_own with relabelled budgets at the final reward's peak (recipe "
                         "embedded/grpo_polish)", ["--config", "embedded/grpo_polish"]),
    "relabel2": ("budget relabelling at twice the weight (2.0)", ["--budget_relabel_weight", "2"]),
    "relabel_median": ("relabelled budgets state the median length of their prompt's rollouts, not their own",
                       ["--budget_relabel_target", "group_median"]),
    "relabel_peak": ("relabelled budgets state the budget the final reward pays most for, length / (1 - alpha_end)",
                     ["--budget_relabel_target", "peak"]),
    "relabel_response": ("relabelling trains the whole relabelled response, not the budget tag alone",
                         ["--budget_relabel_scope", "response"]),
    "prefill_near": ("half the prompts prefilled, with user budgets in [0.2, 0.6] x b_max (near the compressed "
                     "lengths) instead of a quarter in the SPEC's [0.5, 2]",
                     ["--prefill_fraction", "0.5", "--prefill_min", "0.2", "--prefill_max", "0.6"]),
    "temperature09": ("rollouts at T 0.9", ["--temperature", "0.9"]),
    "frozen_attention": ("attention weights not trained (MLPs, norms, embeddings are)",
                         ["--frozen_parameters", "self_attn"]),
    "frozen_qk": ("attention queries and keys not trained", ["--frozen_parameters", "q_proj", "k_proj"]),
    "frozen_first3": ("the first 3 of 4 layers not trained (the last, the final norm, embeddings are)",
                      ["--frozen_parameters", r"layers\.[012]\."]),
    "accuracy_only": ("baseline: the accuracy reward alone (recipe embedded/grpo_accuracy)",
                      ["--config", "embedded/grpo_accuracy"]),
    "accuracy_only_lr1e-5": ("baseline: the accuracy reward alone at learning rate 1e-5",
                             ["--config", "embedded/grpo_accuracy", "--learning_rate", "1e-5"]),
    "kimi_length": ("baseline: accuracy + Kimi k1.5 length reward (recipe embedded/grpo_kimi_length)",
                    ["--config", "embedded/grpo_kimi_length"]),
}
# Variants that go on from another variant's model instead of the demo's cold start (run first if missing);
# their GRPO seconds are their own steps only.
CONTINUES = {"long_polish_own": "long_lr2.5e-5", "long_polish_peak": "long_lr2.5e-5"}
# Variants a `demo --baselines` run has already trained and evaluated: read from the demo, not rerun.
FROM_DEMO = {"recipe": "selfbudgeter", "accuracy_only": "grpo_accuracy", "kimi_length": "grpo_kimi_length"}
KEYS = ("accuracy", "mean_tokens", "compression", "within_20", "within_50", "length_budget_pearson",
        "spearman_budget_difficulty", "control_slope", "format_failure_rate")


def run(argv: list[str], log: Path) -> None:
    with log.open("w") as out:
        code = subprocess.call([sys.executable, "-m", "selfbudgeter.cli", *argv], stdout=out, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"{' '.join(argv[:1])} failed ({code}); see {log}")


def from_demo(name: str, demo: Path) -> dict | None:
    evals = demo / "eval" / FROM_DEMO.get(name, "")
    if name not in FROM_DEMO or not (evals / "metrics.json").exists():
        return None
    metrics = json.loads((evals / "metrics.json").read_text())
    timings = demo / "report" / "timings.json"
    steps = json.loads(timings.read_text())["steps"] if timings.exists() else {}
    seconds = steps.get(FROM_DEMO[name])
    return {"variant": name, "grpo_seconds": None if seconds is None else round(seconds),
            **{key: metrics.get(key) for key in KEYS}}


def variant(name: str, overrides: list[str], demo: Path, out: Path, seed: int) -> dict:
    if (row := from_demo(name, demo)) is not None:
        return row
    model, evals = out / name, out / f"{name}-eval"
    if not (evals / "metrics.json").exists():
        config = ["--config", "embedded/grpo"] if "--config" not in overrides else []
        origin = demo / "models" / "sft"
        if name in CONTINUES:  # the model it goes on from: trained now if missing, else only read back
            origin = out / CONTINUES[name]
            variant(CONTINUES[name], VARIANTS[CONTINUES[name]][1], demo, out, seed)
        start = time.time()
        run(["grpo", *config, "--model", str(origin), "--profile", str(demo / "profile"),
             "--profile_only", "true", "--solved_only", "true", "--output_dir", str(model), "--seed", str(seed),
             *overrides], out / f"{name}.grpo.log")
        (out / f"{name}.seconds").write_text(f"{time.time() - start:.0f}\n")
        run(["eval", "--config", "embedded/eval", "--model", str(model), "--out", str(evals), "--seed", str(seed),
             "--control_limit", "50", "--baseline", str(demo / "eval" / "base")], out / f"{name}.eval.log")
    metrics = json.loads((evals / "metrics.json").read_text())
    seconds = out / f"{name}.seconds"
    return {"variant": name, "grpo_seconds": int(seconds.read_text()) if seconds.exists() else None,
            **{key: metrics.get(key) for key in KEYS}}


def table(rows: list[dict]) -> str:
    def cell(value):
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    head = ["variant", "grpo_seconds", *KEYS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(row[key]) for key in head) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished `selfbudgeter demo` folder")
    parser.add_argument("--out", type=Path, default=Path("runs/grpo-variants"))
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run these variants only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for needed in (args.demo / "models" / "sft", args.demo / "profile", args.demo / "eval" / "base" / "metrics.json"):
        if not needed.exists():
            parser.error(f"{needed} is missing: run `selfbudgeter demo --out {args.demo}` first")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only or VARIANTS:
        print(f"{name}: {VARIANTS[name][0]}", flush=True)
        rows.append(variant(name, VARIANTS[name][1], args.demo, args.out, args.seed))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    (args.out / "variants.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "variants.md").write_text(table(rows) + "\n")
    (args.out / "environment.json").write_text(json.dumps(environment(), indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
