"""Pipeline speed: tokens/s of each stage of `make demo`, its share of the demo and its ratio to this machine.

On the embedded base model (src/selfbudgeter/embedded/assets/base) it runs, small but with the demo's own settings
(the packaged embedded recipes):

* profile generation: `generation.generate` on training questions (profile recipe: samples, batch, length);
* SFT steps: `sft.run_sft` on prompt/completion rows made from those samples (sft recipe);
* GRPO steps: `grpo.run_grpo` (grpo recipe) on the profiled questions, with the rollouts timed apart;
* eval generation: `generation.generate` on test questions (eval recipe).

The compute limit is an fp32 matmul microbenchmark in the same process (square matrices, best of a few
rounds). A generated or otherwise forward-only token costs ~2 x params FLOPs and a trained token (forward and
backward) ~6 x params, attention over the context not counted (~15% more at the embedded model's lengths), so
"of limit" is achieved useful FLOP/s over the matmul's: a wall time from any machine can be read against that
machine's speed. Generation counts the tokens kept (up to the stop token), not padding.

The shares are of a projected demo: each stage's measured time per unit (generated row, SFT step, GRPO step)
times the demo's workload read from its defaults and recipes (profile questions x samples; SFT epochs over
that many rows; GRPO max_steps; three evaluations of the test split plus the two budgeted models' user-budget
control runs). The base model writes longer solutions than the trained models, so the eval and GRPO rows
are priced high.

    .venv/bin/python benchmarks/pipeline_speed.py [--questions 32] [--eval-questions 64] [--sft-steps 8]
        [--grpo-steps 2] [--grpo-cache static] [--threads N] [--out speed.json]

About two minutes on 2 idle CPU cores. On a shared machine run it twice and compare ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from selfbudgeter.core.config import load_recipe, resolve_recipe
from selfbudgeter.embedded.model import BASE_MODEL_DIR
from selfbudgeter.evaluation.report import environment

STAGES = ("profile", "sft", "grpo", "eval")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="See the module docstring for what is measured and how.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--questions", type=int, default=32,
                        help="training questions profiled (x the profile recipe's samples); also the SFT rows' and "
                        "GRPO prompts' source")
    parser.add_argument("--eval-questions", type=int, default=64, help="test questions generated for eval")
    parser.add_argument("--sft-steps", type=int, default=8, help="SFT optimizer steps (the first is not timed)")
    parser.add_argument("--grpo-steps", type=int, default=2, help="GRPO steps timed (one more runs first, untimed)")
    parser.add_argument("--grpo-cache", default=None,
                        help="GRPOConfig cache_implementation for the rollouts (default: the recipe's)")
    parser.add_argument("--grpo-generation", choices=("generate", "continuous"), default="generate",
                        help="how TRL samples the rollouts: `generate` (padded batches, the recipes') or transformers' "
                        "continuous batching (GRPOConfig use_transformers_continuous_batching)")
    parser.add_argument("--allocator", choices=("tuned", "default"), default="tuned",
                        help="tuned: glibc thresholds as the `selfbudgeter` command sets them (runtime.tune_allocator)")
    parser.add_argument("--matmul-size", type=int, default=1024, help="side of the square fp32 matmul")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default torch's: one per core). On a machine busy with other work, 1 "
                        "avoids the collapse of several threads waiting on each other (10x measured on 2 cores)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="what a second is: wall time, or this process's CPU time (for a machine busy with other "
                        "work: with --threads 1 it is the time the benchmark actually ran)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    return parser


def recipe(name: str) -> dict[str, Any]:
    return load_recipe(resolve_recipe(f"embedded/{name}"))


def matmul_flops(size: int, clock: str, rounds: int = 3, reps: int = 8) -> float:
    """Best fp32 FLOP/s of a size x size matmul over `rounds` rounds of `reps` products, by `clock`."""
    import torch

    now = CLOCKS[clock]
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(rounds):
        start = now()
        for _ in range(reps):
            a @ b
        best = min(best, (now() - start) / reps)
    return 2 * size**3 / best


def timed_generation(model, tokenizer, questions, cfg: dict[str, Any], seed: int, desc: str) -> dict[str, Any]:
    from selfbudgeter.data import prompt_text
    from selfbudgeter.evaluation.generation import generate

    prompts = [prompt_text(tokenizer, q.question, system_prompt=None) for q in questions]
    n = int(cfg.get("samples", 1))
    start, cpu = time.perf_counter(), time.process_time()
    samples = generate(model, tokenizer, prompts, n=n, temperature=float(cfg.get("temperature", 0.6)),
                       top_p=float(cfg.get("top_p", 1.0)), max_new_tokens=int(cfg.get("max_new_tokens", 384)),
                       batch_size=int(cfg.get("batch_size", 64)), seed=seed, desc=desc, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(s.n_tokens for per in samples for s in per)
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens, "rows": len(prompts) * n,
            "forward_tokens": tokens, "trained_tokens": 0, "samples": samples}


class StepClock:
    """A trainer callback: the wall time of each optimizer step, and token counts from forward hooks."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                clock.attach(model)
                clock.last = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kwargs):
                now = (time.perf_counter(), time.process_time())
                clock.steps.append((now[0] - clock.last[0], now[1] - clock.last[1]))
                clock.per_step.append(dict(clock.counts))
                clock.last = now

        self.callback = Callback()
        self.steps: list[tuple[float, float]] = []  # (wall, CPU) seconds
        self.per_step: list[dict[str, float]] = []
        self.counts = {"trained": 0, "padded": 0, "forward": 0, "generated": 0, "generate_s": 0.0,
                       "generate_cpu_s": 0.0}
        self.generating = False

    def attach(self, model) -> None:
        import torch

        def count(module, args, kwargs):
            if self.generating:
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            if ids is None:
                return
            real = int(mask.sum()) if mask is not None else ids.numel()
            if torch.is_grad_enabled():
                self.counts["trained"] += real
                self.counts["padded"] += ids.numel()
            else:
                self.counts["forward"] += real

        model.register_forward_pre_hook(count, with_kwargs=True)

        def padded_tokens(out, kwargs) -> int:  # `generate`: rows padded after their EOS
            config = kwargs.get("generation_config")
            eos = getattr(config, "eos_token_id", None)
            eos = {eos} if isinstance(eos, int) else set(eos or [])
            rows = out[:, kwargs["input_ids"].shape[1]:].tolist()
            stops = [next((i for i, t in enumerate(row) if t in eos), None) for row in rows]
            return sum(len(row) if stop is None else stop + 1 for row, stop in zip(rows, stops))

        def batch_tokens(out, kwargs) -> int:  # transformers' continuous batching: a dict of finished requests
            return sum(len(o.generated_tokens) for o in out.values())

        for name, tokens in (("generate", padded_tokens), ("generate_batch", batch_tokens)):
            if hasattr(model, name):
                setattr(model, name, self._timed(getattr(model, name), tokens))

    def _timed(self, generate, tokens):
        """`generate` that the forward hooks ignore, with its seconds and generated tokens counted."""

        def timed(*args, **kwargs):
            self.generating = True
            start, cpu = time.perf_counter(), time.process_time()
            try:
                out = generate(*args, **kwargs)
            finally:
                self.generating = False
            self.counts["generate_s"] += time.perf_counter() - start
            self.counts["generate_cpu_s"] += time.process_time() - cpu
            self.counts["generated"] += tokens(out, kwargs)
            return out

        return timed

    def measured(self, skip: int) -> dict[str, float]:
        """Seconds and counts of the steps after the first `skip` (those warm the trainer up)."""
        before = self.per_step[skip - 1] if skip else dict.fromkeys(self.counts, 0)
        after = self.per_step[-1]
        out = {key: after[key] - before[key] for key in self.counts}
        out["seconds"] = sum(wall for wall, _ in self.steps[skip:])
        out["cpu_seconds"] = sum(cpu for _, cpu in self.steps[skip:])
        out["steps"] = len(self.steps) - skip
        return out


def sft_steps(samples, questions, tokenizer, steps: int, work: Path, seed: int) -> dict[str, Any]:
    from selfbudgeter.data import prompt_text, write_jsonl
    from selfbudgeter.core.format import render_response
    from selfbudgeter.training.sft import parse_args, run_sft

    rows = []
    for question, per in zip(questions, samples):
        prompt = prompt_text(tokenizer, question.question, system_prompt=None)
        rows += [{"prompt": prompt, "completion": render_response(max(1, s.n_tokens), s.text.strip())}
                 for s in per if s.text.strip()]
    write_jsonl(work / "sft.jsonl", rows)
    stage, config = parse_args(["--config", "embedded/sft", "--model", str(BASE_MODEL_DIR), "--dataset",
                                str(work / "sft.jsonl"), "--output_dir", str(work / "sft"), "--max_steps",
                                str(steps), "--save_strategy", "no", "--logging_strategy", "no", "--seed", str(seed),
                                "--disable_tqdm", "true"])
    clock = StepClock()
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer prints its summary
        run_sft(stage, config, callbacks=[clock.callback])
    got = clock.measured(skip=1)
    return {"seconds": got["seconds"], "cpu_seconds": got["cpu_seconds"], "steps": got["steps"], "tokens":
            got["trained"], "trained_tokens":
            got["trained"], "forward_tokens": got["forward"], "padding": 1 - got["trained"] / max(got["padded"], 1),
            "rows_per_step": config.per_device_train_batch_size * config.gradient_accumulation_steps}


def grpo_steps(samples, questions, steps: int, cache: str | None, work: Path, seed: int,
               continuous: bool = False) -> dict[str, Any]:
    from selfbudgeter.data import write_jsonl
    from selfbudgeter.training.grpo import parse_args, run_grpo

    profile = [{"id": q.id, "b_max": float(max(s.n_tokens for s in per))} for q, per in zip(questions, samples)]
    write_jsonl(work / "profile" / "questions.jsonl", profile)
    argv = ["--config", "embedded/grpo", "--model", str(BASE_MODEL_DIR), "--profile", str(work / "profile"),
            "--profile_only", "true", "--solved_only", "true", "--output_dir", str(work / "grpo"),
            "--max_steps", str(steps + 1), "--save_strategy", "no", "--logging_strategy", "no", "--seed", str(seed),
            "--disable_tqdm", "true"]
    if cache:
        argv += ["--cache_implementation", cache]
    if continuous:
        argv += ["--use_transformers_continuous_batching", "true"]
    stage, reward_cfg, config = parse_args(argv)
    clock = StepClock()
    with contextlib.redirect_stdout(io.StringIO()):
        run_grpo(stage, reward_cfg, config, callbacks=[clock.callback])
    got = clock.measured(skip=1)
    # The reference model (beta > 0) is a second model that the hooks do not see: one forward of each trained row.
    reference = got["trained"] if config.beta > 0 else 0
    return {"seconds": got["seconds"], "cpu_seconds": got["cpu_seconds"], "steps": got["steps"],
            "tokens": got["generated"], "generate_seconds": got["generate_s"],
            "generate_cpu_seconds": got["generate_cpu_s"], "trained_tokens": got["trained"],
            "forward_tokens": got["generated"] + got["forward"] + reference,
            "cache_implementation": config.cache_implementation,
            "continuous_batching": config.use_transformers_continuous_batching}


def demo_workload() -> dict[str, float]:
    """Units of each stage in a default `selfbudgeter demo`: generated rows, SFT steps, GRPO steps."""
    from selfbudgeter.embedded.demo import make_parser as demo_parser

    demo = demo_parser().parse_args([])
    profile, sft, grpo, evaluation = recipe("profile"), recipe("sft"), recipe("grpo"), recipe("eval")
    questions = getattr(demo, "profile_questions", None) or profile.get("limit") or 800
    profile_rows = questions * int(profile.get("samples", 1))
    if int(sft.get("max_steps", -1) or -1) > 0:
        sft_units = int(sft["max_steps"])
    else:  # every profiled sample as a row: an upper bound (build-sft drops the wrong ones)
        per_step = int(sft.get("per_device_train_batch_size", 8)) * int(sft.get("gradient_accumulation_steps", 1))
        sft_units = math.ceil(profile_rows / per_step) * float(sft.get("num_train_epochs", 1))
    limit = getattr(demo, "eval_limit", None) or 400
    control = int(evaluation.get("control_limit") or 0) * len(evaluation.get("control_multipliers") or [])
    eval_rows = 3 * limit * int(evaluation.get("samples", 1)) + 2 * control
    grpo_units = getattr(demo, "grpo_steps", None) or int(grpo.get("max_steps", 0))
    return {"profile": profile_rows, "sft": sft_units, "grpo": grpo_units, "eval": eval_rows}


def unit_count(stage: str, result: dict[str, Any]) -> float:
    return result["steps"] if stage in ("sft", "grpo") else result["rows"]


def report(results: dict[str, dict[str, Any]], params: int, peak: float, workload: dict[str, float],
           clock: str) -> list[str]:
    """The table: per stage tokens/s, the ratio to the compute limit, the projected demo seconds and share."""
    key = "seconds" if clock == "wall" else "cpu_seconds"
    seconds = {s: results[s][key] for s in STAGES}
    projected = {s: seconds[s] / unit_count(s, results[s]) * workload[s] for s in STAGES}
    total = sum(projected.values())
    lines = [f"{'stage':<8}{'tokens/s':>10}{'of limit':>10}{'demo units':>12}{'demo s':>9}{'share':>8}  measured "
             f"({clock} seconds)"]
    for stage in STAGES:
        r = results[stage]
        flops = 2 * params * r["forward_tokens"] + 6 * params * r["trained_tokens"]
        r["of_limit"] = flops / seconds[stage] / peak
        r["tokens_per_s"] = r["tokens"] / seconds[stage]
        r["projected_demo_seconds"] = projected[stage]
        unit = "steps" if stage in ("sft", "grpo") else "rows"
        what = {"profile": "generated", "eval": "generated", "sft": "trained", "grpo": "generated"}[stage]
        detail = f"{unit_count(stage, r):.0f} {unit}, {r['tokens']:,} {what} tokens in {seconds[stage]:.1f} s"
        if stage == "sft":
            detail += f", {100 * r['padding']:.0f}% padding"
        if stage == "grpo":
            gen = r["generate_seconds" if clock == "wall" else "generate_cpu_seconds"]
            detail += (f"; rollouts {100 * gen / seconds[stage]:.0f}% of the step at {r['tokens'] / gen:,.0f} tok/s "
                       f"({100 * 2 * params * r['tokens'] / gen / peak:.1f}% of limit), cache "
                       f"{r['cache_implementation'] or 'dynamic'}")
        lines.append(f"{stage:<8}{r['tokens_per_s']:>10,.0f}{100 * r['of_limit']:>9.1f}%{workload[stage]:>12,.0f}"
                     f"{projected[stage]:>9.0f}{100 * projected[stage] / total:>7.0f}%  {detail}")
    generation = ("profile", "eval")
    gen_flops = sum(2 * params * results[s]["tokens"] for s in generation)
    gen_seconds = sum(seconds[s] for s in generation)
    lines.append(f"generation (profile + eval): {100 * gen_flops / gen_seconds / peak:.1f}% of the compute limit; "
                 f"projected demo: {total / 60:.1f} min")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.allocator == "tuned":
        from selfbudgeter.core.runtime import tune_allocator

        tune_allocator()
    import torch

    from selfbudgeter.data import load_benchmark
    from selfbudgeter.core.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    env = environment()
    peak = matmul_flops(args.matmul_size, args.clock)
    model, tokenizer = load_model(BASE_MODEL_DIR, device="cpu", dtype="float32")
    params = model.num_parameters()
    allocator = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {env['packages'].get('transformers')}, "
          f"trl {env['packages'].get('trl')}, python {env['python']}")
    print(f"allocator: {args.allocator}; environment: {allocator or 'none'}")
    print(f"compute limit: {peak / 1e9:.1f} GFLOP/s by {args.clock} time (fp32 {args.matmul_size}^2 matmul); "
          f"model {params / 1e6:.2f}M parameters: {2 * params / 1e6:.1f} MFLOP per generated token -> {peak / (2 * params):,.0f} tokens/s")
    sys.stdout.flush()
    train = load_benchmark("embedded", "train")[: args.questions]
    test = load_benchmark("embedded", "test")[: args.eval_questions]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="pipeline-speed-") as tmp:
        work = Path(tmp)
        results["profile"] = timed_generation(model, tokenizer, train, recipe("profile"), args.seed, "profile")
        samples = results["profile"].pop("samples")
        results["sft"] = sft_steps(samples, train, tokenizer, args.sft_steps, work, args.seed)
        results["grpo"] = grpo_steps(samples, train, args.grpo_steps, args.grpo_cache, work, args.seed,
                                     continuous=args.grpo_generation == "continuous")
        results["eval"] = timed_generation(model, tokenizer, test, recipe("eval"), args.seed, "eval")
        results["eval"].pop("samples")
    lines = report(results, params, peak, demo_workload(), args.clock)
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text(json.dumps({"peak_flops": peak, "clock": args.clock, "params": params, "stages": results,
                                        "environment": env}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
