"""`selfbudgeter report`: compare evaluation runs in one Markdown report with plots.

Each run is an evaluation folder holding `items.jsonl` (one record per graded response, schema in
`metrics.py`) and the evaluator's `metrics.json`. Metrics are recomputed from the items so every run is
summarised by the same code and compression is measured against one baseline run. Output in `--out`:
`metrics.json` (one entry per run), `report.md`, six PNG plots and `environment.json` (the package
versions and machine that produced them: the same seed can give other numbers under other versions).

A run evaluated with a decode-time budget option (`eval --decode_budget`) holds records of the model alone
and records its decoder shaped; the report never pools them: every table gives each decoder its own row
(`run · decoder`), and the control plots their own line.

    selfbudgeter report --run base=runs/eval/base --run selfbudgeter=runs/eval/sb --baseline base --out runs/report
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core import metrics
from ..core.errors import UserError

logger = logging.getLogger(__name__)

Records = list[dict[str, Any]]

PLOTS = {
    "lengths": "length_distribution.png",
    "budget_vs_length": "budget_vs_length.png",
    "budget_by_difficulty": "budget_by_difficulty.png",
    "control": "user_budget_control.png",
    "control_accuracy": "user_budget_accuracy.png",
    "accuracy_vs_length": "accuracy_vs_length.png",
}
CAPTIONS = {
    "lengths": "Solution length of every response (whole response when the format is broken); dashed lines are "
    "the means. Shorter is cheaper; compare with the accuracy table before calling it better.",
    "budget_vs_length": "The model's own budget against the length it then wrote, for well-formed responses. "
    "On the dashed y = x line the model kept its word exactly; the grey band is within ±20%.",
    "budget_by_difficulty": "Budgets the model chose, grouped by question difficulty. A model that sizes its "
    "effort to the question shows budgets rising from left to right.",
    "control": "User-budget control: the budget was prefilled at a multiple of the model's own estimate. "
    "The y axis is the length written divided by that own estimate (median, bars from the 25th to the 75th "
    "percentile); perfect control lies on the dashed line. Solid lines are the model alone, other styles a "
    "decode-time budget option.",
    "control_accuracy": "What a user budget buys: accuracy at each multiple of the model's own estimate, on "
    "all control questions (left) and on the hardest third by difficulty (right). Solid lines are the model "
    "alone, other styles a decode-time budget option.",
    "accuracy_vs_length": "Accuracy against mean solution length per method: up and to the left is better.",
}
# More distinct difficulty values than this are binned into quantile groups for the box plot.
MAX_DIFFICULTY_LEVELS = 10
DIFFICULTY_BINS = 5
# Points beyond this many per run are subsampled in the scatter plot (readability, file size).
MAX_SCATTER_POINTS = 3000


def load_records(run_dir: Path) -> Records:
    """The records of one evaluation folder's `items.jsonl`."""
    from ..data import read_jsonl

    path = Path(run_dir) / "items.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist: is {run_dir} an evaluation folder?")
    records = read_jsonl(path)
    for number, record in enumerate(records, 1):
        missing = [key for key in ("length", "format_ok", "correct") if key not in record]
        if missing:
            raise UserError(f"{path}: record {number} lacks {', '.join(missing)}")
    return records


def _load_evaluator_metrics(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        logger.warning("%s is missing; the report recomputes everything from items.jsonl", path)
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from err


def summarize_runs(records: Mapping[str, Records], baseline: str | None = None) -> dict[str, dict[str, Any]]:
    """`metrics.summarize` of every run, compression measured against the baseline run's mean length."""
    if baseline is not None and baseline not in records:
        raise UserError(f"baseline {baseline!r} is not one of the runs: {', '.join(records)}")
    baseline_mean = metrics.summarize(records[baseline])["mean_tokens"] if baseline is not None else None
    return {name: metrics.summarize(rows, baseline_mean) for name, rows in records.items()}


def build_report(runs: Mapping[str, Path], out_dir: Path, baseline: str | None = None) -> dict[str, dict[str, Any]]:
    """Write metrics.json, report.md and the plots for `runs` (name -> evaluation folder) into `out_dir`.

    Returns what metrics.json holds: one summary per run name, with `compression` against `baseline`.
    """
    if not runs:
        raise UserError("no runs to report on")
    records = {name: load_records(Path(path)) for name, path in runs.items()}
    summaries = summarize_runs(records, baseline)
    for name, path in runs.items():
        summaries[name]["baseline"] = baseline
        summaries[name]["source"] = str(path)
        evaluator = _load_evaluator_metrics(Path(path))
        if evaluator:
            summaries[name]["evaluator"] = evaluator
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(summaries, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    plots = write_plots(records, summaries, out_dir)
    env = environment()
    (out_dir / "environment.json").write_text(json.dumps(env, indent=2) + "\n", encoding="utf-8")
    markdown = render_markdown(summaries, plots, baseline) + f"\nMade with {describe_environment(env)}.\n"
    (out_dir / "report.md").write_text(markdown, encoding="utf-8")
    logger.info("report for %d runs written to %s", len(runs), out_dir)
    return summaries


ENVIRONMENT_PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers", "peft", "vllm",
                        "math-verify", "selfbudgeter")


def environment() -> dict[str, Any]:
    """The Python, package versions (None: not installed), CPU count and accelerator of this process."""
    import os
    import platform
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    try:
        import torch

        accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        accelerator = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "accelerator": accelerator,
        "packages": {name: version(name) for name in ENVIRONMENT_PACKAGES},
    }


def describe_environment(env: Mapping[str, Any]) -> str:
    """One line: `Python 3.11.7, torch 2.13.0+cpu, ...; 2 CPUs, no GPU`."""
    packages = ", ".join(f"{name} {v}" for name, v in env["packages"].items() if v and name != "selfbudgeter")
    device = env["accelerator"] or "no GPU"
    return f"Python {env['python']}, {packages}; {env['cpus']} CPUs, {device}"


# --- the table --------------------------------------------------------------------------------------------

COLUMNS = (
    ("model", None),
    ("accuracy", "accuracy"),
    ("mean tokens", "mean_tokens"),
    ("compression", "compression"),
    ("within ±20%", "within_20"),
    ("slope", "length_budget_slope"),
    ("Spearman", "spearman_budget_difficulty"),
    ("control slope", "control_slope"),
    ("format failures", "format_failure_rate"),
    ("cut at cap", "cut_rate"),  # responses the generation cap stopped: loops
)
_PERCENT = {"accuracy", "compression", "within_20", "format_failure_rate", "cut_rate"}
# Columns that only mean something for a model that writes budgets.
BUDGET_COLUMNS = ("within_20", "length_budget_slope", "spearman_budget_difficulty", "control_slope",
                  "format_failure_rate")


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key in _PERCENT:
        return f"{100 * value:.1f}%"
    if key == "mean_tokens":
        return f"{value:.0f}"
    return f"{value:.2f}"


def table_rows(summaries: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """The results table as strings: a header row, then one row per run (and per decoder of a run); a model
    that never wrote budgets reads "no budgets" in every budget column."""
    rows = [[title for title, _ in COLUMNS]]
    for name, summary in summaries.items():
        parts = [(name, summary)]
        parts += [(decoder_label(name, decoder), part) for decoder, part in (summary.get("decoders") or {}).items()]
        for label, part in parts:
            # A base or baseline model is not asked to write the format: its budget columns say so.
            blank = never_budgets(part)
            rows.append([label] + ["no budgets" if blank and key in BUDGET_COLUMNS else _cell(key, part.get(key))
                                   for _, key in COLUMNS[1:]])
    return rows


def decoder_label(name: str, decoder: str) -> str:
    """The report's name for a run's records made by one decoder: the run's own name for the model alone."""
    return name if decoder == metrics.MODEL else f"{name} · {decoder}"


def control_tables(summaries: Mapping[str, Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    """(run, decoder) -> the summary holding that decoder's control metrics, for runs with control records;
    the model alone first within each run."""
    out: dict[tuple[str, str], Mapping[str, Any]] = {}
    for name, summary in summaries.items():
        for decoder, part in [(metrics.MODEL, summary), *(summary.get("decoders") or {}).items()]:
            if part.get("control"):
                out[name, decoder] = part
    return out


def never_budgets(summary: Mapping[str, Any]) -> bool:
    """A model that was not asked for the budget format (a base model): every response "missing_budget"."""
    failures = summary.get("format_failures") or {}
    return summary.get("n", 0) > 0 and list(failures) == ["missing_budget"] and summary.get("format_failure_rate") == 1


def markdown_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Table rows (a header, then the body) as Markdown lines: names left, numbers right."""
    header, *body = rows
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def print_table(rows: Sequence[Sequence[str]], title: str, *notes: str) -> None:
    """Table rows (a header, then the body) on the console, names left and numbers right, then `notes`."""
    from rich.console import Console
    from rich.table import Table

    header, *body = rows
    table = Table(title=title)
    table.add_column(header[0], no_wrap=True, min_width=max(len(row[0]) for row in rows))
    for column in header[1:]:
        table.add_column(column, justify="right")
    for row in body:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a pipe or a log file: the whole table rather than 80 columns of it
        console = Console(width=200)
    console.print(table)
    for note in notes:
        console.print(note)


def _mean_forced(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """The share of forced responses over a control table's rows (weighted by their sizes)."""
    counted = [(row["n"], row.get("forced_rate")) for row in rows if row.get("forced_rate") is not None]
    total = sum(n for n, _ in counted)
    return sum(n * rate for n, rate in counted) / total if total else None


def render_markdown(summaries: Mapping[str, Mapping[str, Any]], plots: Mapping[str, Path], baseline: str | None) -> str:
    lines = ["# SelfBudgeter evaluation report", ""]
    counts = ", ".join(f"{name}: {s['n']}" for name, s in summaries.items())
    lines.append(f"Responses per run: {counts}.")
    if baseline is not None:
        lines.append(f"Compression is 1 - mean tokens / mean tokens of `{baseline}`.")
    lines += [
        "Within ±20% and slope (of solution length on the model's own budget) use well-formed responses only; "
        "Spearman is the rank correlation of budget with question difficulty; control slope is the median over "
        "questions of the slope of log length on log user budget (1: the length follows the user's budget, "
        "0: it ignores it). A row `run · decoder` holds what a decode-time budget option made of the same "
        "questions, apart from the model alone.",
        "",
    ]
    lines += markdown_table(table_rows(summaries))
    lines.append("")
    controlled = control_tables(summaries)
    if controlled:
        lines += [
            "## User-budget control",
            "",
            "User budgets prefilled at multiples of the model's own estimate. Within ±20% counts reachable budgets "
            "only (at least the question's reference solution length) and a broken response as a miss; forced is "
            "the share of responses a decoder changed.",
            "",
        ]
        rows = [["model", "control slope", "within ±20% (reachable)", "forced"]]
        for (name, decoder), part in controlled.items():
            forced = _mean_forced(part["control"])
            rows.append([decoder_label(name, decoder), _cell("control_slope", part.get("control_slope")),
                         _cell("within_20", part.get("control_within_20")), _cell("within_20", forced)])
        lines += markdown_table(rows) + [""]
        header = ["model", "multiplier", "mean budget", "mean length", "length / own estimate", "within ±20%",
                  "accuracy", "accuracy (hardest third)"]
        rows = [header]
        for (name, decoder), part in controlled.items():
            for row in part["control"]:
                rows.append(
                    [
                        decoder_label(name, decoder),
                        f"{row['multiplier']:g}x",
                        _cell("mean_tokens", row["mean_budget"]),
                        _cell("mean_tokens", row["mean_length"]),
                        _cell("ratio", row["length_over_estimate"]),
                        _cell("within_20", row["within_20"]),
                        _cell("accuracy", row["accuracy"]),
                        _cell("accuracy", row.get("accuracy_hard")),
                    ]
                )
        lines += markdown_table(rows) + [""]
    lines += ["## Plots", ""]
    for key, path in plots.items():
        lines += [f"![{key}]({path.name})", "", f"*{CAPTIONS[key]}*", ""]
    skipped = [key for key in PLOTS if key not in plots]
    if skipped:
        lines += [f"Not drawn for lack of data: {', '.join(skipped)}.", ""]
    failures = {name: s["format_failures"] for name, s in summaries.items() if s.get("format_failures")}
    if failures:
        lines += ["## Format failures", ""]
        for name, reasons in failures.items():
            listed = ", ".join(f"{reason} ({entry['count']})" for reason, entry in reasons.items())
            lines.append(f"- **{name}**: {listed}")
        lines += ["", "Examples are in metrics.json under `format_failures`.", ""]
    return "\n".join(lines)


# --- plots ------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(names: Sequence[str]) -> dict[str, Any]:
    plt = _pyplot()
    cycle = plt.get_cmap("tab10")
    return {name: cycle(i % 10) for i, name in enumerate(names)}


def _wide(values: Sequence[float]) -> bool:
    """Whether positive values span enough orders of magnitude to need a log axis."""
    positive = [v for v in values if v > 0]
    return bool(positive) and len(positive) == len(values) and max(positive) / min(positive) > 30


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_lengths(records: Mapping[str, Records], colors: Mapping[str, Any], path: Path) -> Path | None:
    lengths = {name: [r["length"] for r in metrics.main_records(rows)] for name, rows in records.items()}
    lengths = {name: values for name, values in lengths.items() if values}
    if not lengths:
        return None
    plt = _pyplot()
    names = list(lengths)[::-1]  # first run on top
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.8 * len(names)))
    everything = [v for values in lengths.values() for v in values]
    log = _wide(everything)
    # Violins of log lengths on a log axis: the usual spread of reasoning lengths spans decades.
    data = [np.log10(np.maximum(lengths[n], 1)) if log else np.asarray(lengths[n], dtype=float) for n in names]
    positions = range(len(names))
    single = [len(set(d.tolist())) < 2 for d in data]
    violins = ax.violinplot(
        [d if not one else np.append(d, d[0] + 1e-6) for d, one in zip(data, single)],
        positions=positions,
        showextrema=False,
        widths=0.85,
        **_horizontal(),
    )
    for body, name in zip(violins["bodies"], names):
        body.set_facecolor(colors[name])
        body.set_edgecolor(colors[name])
        body.set_alpha(0.55)
    for y, name, values in zip(positions, names, data):
        mean = float(np.mean(lengths[name]))
        median = float(np.median(values))
        ax.scatter([math.log10(max(mean, 1)) if log else mean], [y], marker="D", color="black", zorder=3, s=25)
        ax.vlines(median, y - 0.3, y + 0.3, color="black", linewidth=1.5)
    ax.scatter([], [], marker="D", color="black", s=25, label="mean")
    ax.plot([], [], color="black", linewidth=1.5, label="median")
    ax.set_yticks(list(positions), [f"{n}\n(mean {np.mean(lengths[n]):.0f})" for n in names])
    if log:
        low, high = min(d.min() for d in data) - 0.1, max(d.max() for d in data) + 0.1
        ticks = [
            step * 10**power
            for power in range(math.floor(low), math.ceil(high) + 1)
            for step in (1, 2, 5)
            if low <= math.log10(step * 10**power) <= high
        ]
        ax.set_xticks([math.log10(t) for t in ticks], [f"{t:,}" for t in ticks])
        ax.set_xlim(low, high)
    ax.set_xlabel("solution length (tokens" + (", log scale)" if log else ")"))
    ax.set_title("Length distribution per run")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def _horizontal() -> dict[str, Any]:
    import matplotlib

    # `orientation` replaced `vert` in Matplotlib 3.10; `vert` is deprecated from 3.11.
    major, minor = (int(part) for part in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


def _subsample(rows: Records, limit: int = MAX_SCATTER_POINTS) -> Records:
    if len(rows) <= limit:
        return rows
    picks = np.random.default_rng(0).choice(len(rows), limit, replace=False)
    return [rows[i] for i in sorted(picks)]


def plot_budget_vs_length(
    records: Mapping[str, Records], summaries: Mapping[str, Mapping[str, Any]], colors: Mapping[str, Any], path: Path
) -> Path | None:
    budgeted = {name: metrics.budgeted(metrics.main_records(rows)) for name, rows in records.items()}
    budgeted = {name: rows for name, rows in budgeted.items() if rows}
    if not budgeted:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 6))
    values = [v for rows in budgeted.values() for r in rows for v in (r["budget"], r["length"])]
    log = _wide(values)
    low, high = (max(min(values), 1) if log else 0), max(values) * 1.05
    line = np.geomspace(low, high, 100) if log else np.linspace(low, high, 100)
    band = metrics.TOLERANCE
    ax.fill_between(line, (1 - band) * line, (1 + band) * line, color="grey", alpha=0.2, label=f"within ±{band:.0%}")
    ax.plot(line, line, "k--", linewidth=1, label="length = budget")
    for name, rows in budgeted.items():
        shown = _subsample(rows)
        slope = summaries[name].get("length_budget_slope")
        label = name if slope is None else f"{name} (slope {slope:.2f})"
        budgets, lengths = [r["budget"] for r in shown], [r["length"] for r in shown]
        ax.scatter(budgets, lengths, s=14, alpha=0.5, color=colors[name], label=label, edgecolors="none")
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel("budget stated by the model (tokens)")
    ax.set_ylabel("actual solution length (tokens)")
    ax.set_title("Budget vs actual length")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _difficulty_groups(values: Sequence[float]) -> tuple[list[Any], list[str], Any]:
    """Difficulty levels (or quantile bins when there are many), their labels, and a value -> group map."""
    levels = sorted(set(values))
    if len(levels) <= MAX_DIFFICULTY_LEVELS:
        return levels, [f"{v:g}" for v in levels], lambda v: v
    edges = np.unique(np.quantile(values, np.linspace(0, 1, DIFFICULTY_BINS + 1)))
    groups = list(range(len(edges) - 1))
    labels = [f"{edges[i]:g}–{edges[i + 1]:g}" for i in groups]

    def group(v):
        return min(int(np.searchsorted(edges, v, side="right")) - 1, len(groups) - 1)

    return groups, labels, group


def plot_budget_by_difficulty(
    records: Mapping[str, Records], colors: Mapping[str, Any], path: Path
) -> Path | None:
    rows = {
        name: [r for r in metrics.budgeted(metrics.main_records(rs)) if r.get("difficulty") is not None]
        for name, rs in records.items()
    }
    rows = {name: rs for name, rs in rows.items() if rs}
    if not rows:
        return None
    groups, labels, group_of = _difficulty_groups([r["difficulty"] for rs in rows.values() for r in rs])
    plt = _pyplot()
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(rows) / 2)), 4.5))
    width = 0.8 / len(rows)
    for k, (name, rs) in enumerate(rows.items()):
        data = [[r["budget"] for r in rs if group_of(r["difficulty"]) == g] for g in groups]
        positions = [i - 0.4 + width * (k + 0.5) for i in range(len(groups))]
        present = [(p, d) for p, d in zip(positions, data) if d]
        box = ax.boxplot(
            [d for _, d in present],
            positions=[p for p, _ in present],
            widths=width * 0.85,
            patch_artist=True,
            showfliers=False,
            manage_ticks=False,
        )
        for patch in box["boxes"]:
            patch.set_facecolor(colors[name])
            patch.set_alpha(0.6)
        for median in box["medians"]:
            median.set_color("black")
    ax.set_xticks(range(len(groups)), labels)
    ax.set_xlabel("question difficulty")
    ax.set_ylabel("budget (tokens)")
    ax.set_title("Budget by difficulty")
    ax.legend(handles=[Patch(facecolor=colors[name], alpha=0.6, label=name) for name in rows], loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


# Line styles of the decoders of one run (its colour): the model alone solid, decode-time options after.
DECODER_STYLES = ("-", ":", "-.", (0, (5, 1, 1, 1)))


def _styles(keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
    styles = {}
    for name, decoder in keys:
        others = [d for n, d in keys if n == name and d != metrics.MODEL]
        index = 0 if decoder == metrics.MODEL else 1 + others.index(decoder)
        styles[name, decoder] = DECODER_STYLES[index % len(DECODER_STYLES)]
    return styles


def _multiplier_axis(ax, multipliers: Sequence[float], log: bool) -> None:
    if log:
        ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set_xticks(multipliers, [f"{m:g}x" for m in multipliers])


def plot_control(records: Mapping[str, Records], colors: Mapping[str, Any], path: Path) -> Path | None:
    curves: dict[tuple[str, str], dict[float, list[float]]] = {}
    for name, rows in records.items():
        for decoder in metrics.by_decoder(rows):
            by_multiplier: dict[float, list[float]] = {}
            for r in metrics.control_records(rows, decoder):
                budget = r.get("prefill_budget") or r.get("budget")
                if r.get("format_ok") and budget:
                    multiplier = float(r["control_multiplier"])
                    by_multiplier.setdefault(multiplier, []).append(r["length"] * multiplier / budget)
            if by_multiplier:
                curves[name, decoder] = dict(sorted(by_multiplier.items()))
    if not curves:
        return None
    styles = _styles(list(curves))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    multipliers = sorted({m for curve in curves.values() for m in curve})
    log = min(multipliers) > 0 and max(multipliers) / min(multipliers) >= 4
    ideal = {"color": "grey", "linestyle": "--", "linewidth": 2.5, "alpha": 0.8, "zorder": 1}
    ax.plot(multipliers, multipliers, label="ideal: length = prefilled budget", **ideal)
    for k, ((name, decoder), curve) in enumerate(curves.items()):
        xs = np.array(list(curve))
        # A small sideways shift per run keeps overlapping error bars apart.
        shift = (k - (len(curves) - 1) / 2) * 0.03
        xs_shown = xs * 2**shift if log else xs + shift * (max(multipliers) - min(multipliers) or 1)
        q25, q50, q75 = (np.array([np.quantile(curve[m], q) for m in xs]) for q in (0.25, 0.5, 0.75))
        errors = [q50 - q25, q75 - q50]
        ax.errorbar(xs_shown, q50, yerr=errors, marker="o", capsize=4, linewidth=2, color=colors[name],
                    linestyle=styles[name, decoder], label=decoder_label(name, decoder))
    _multiplier_axis(ax, multipliers, log)
    if log:
        ax.set_yscale("log", base=2)
    ax.minorticks_off()
    low, high = ax.get_ylim()
    ax.set_yticks(multipliers, [f"{m:g}x" for m in multipliers])
    ax.set_ylim(low, high)
    ax.set_xlabel("prefilled budget / model's own estimate")
    ax.set_ylabel("actual length / model's own estimate")
    ax.set_title("User-budget control")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_control_accuracy(
    summaries: Mapping[str, Mapping[str, Any]], colors: Mapping[str, Any], path: Path
) -> Path | None:
    """Accuracy against the user budget multiplier, on all control questions and on the hardest third."""
    tables = {key: part["control"] for key, part in control_tables(summaries).items()}
    if not tables:
        return None
    plt = _pyplot()
    styles = _styles(list(tables))
    multipliers = sorted({row["multiplier"] for rows in tables.values() for row in rows})
    log = min(multipliers) > 0 and max(multipliers) / min(multipliers) >= 4
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    drawn: list[float] = []
    for ax, key, title in zip(axes, ("accuracy", "accuracy_hard"), ("all control questions", "hardest third")):
        for (name, decoder), rows in tables.items():
            points = [(row["multiplier"], 100 * row[key]) for row in rows if row.get(key) is not None]
            if not points:
                continue
            drawn += [y for _, y in points]
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", linewidth=2, color=colors[name],
                    linestyle=styles[name, decoder], label=decoder_label(name, decoder))
        _multiplier_axis(ax, multipliers, log)
        ax.set_xlabel("user budget / model's own estimate")
        ax.set_title(f"Accuracy by user budget: {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    if drawn:
        axes[0].set_ylim(max(0.0, min(drawn) - 10), min(100.0, max(drawn) + 5) if max(drawn) < 95 else 101)
    axes[0].legend(loc="lower right")
    return _save(fig, path)


def plot_accuracy_vs_length(
    summaries: Mapping[str, Mapping[str, Any]], colors: Mapping[str, Any], path: Path
) -> Path | None:
    points = {
        name: (s["mean_tokens"], 100 * s["accuracy"])
        for name, s in summaries.items()
        if s.get("mean_tokens") is not None and s.get("accuracy") is not None
    }
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = [x for x, _ in points.values()]
    ys = [y for _, y in points.values()]
    x_span, y_span = max(xs) * 1.25, max(20.0, max(ys) - min(ys) + 10)
    labelled: list[tuple[float, float]] = []
    for name, (x, y) in sorted(points.items(), key=lambda kv: -kv[1][1]):
        ax.scatter([x], [y], s=80, color=colors[name], zorder=3)
        # A label that would sit on an earlier one goes below its point instead.
        crowded = any(abs(x - lx) < 0.15 * x_span and abs(y - ly) < 0.08 * y_span for lx, ly in labelled)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(7, -14 if crowded else 5))
        labelled.append((x, y))
    ax.set_xlim(0, x_span)
    ax.set_ylim(max(0.0, min(ys) - 10), min(100.0, max(ys) + 10) if max(ys) < 95 else 101)
    ax.set_xlabel("mean solution length (tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs length per method (up and left is better)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def write_plots(
    records: Mapping[str, Records], summaries: Mapping[str, Mapping[str, Any]], out_dir: Path
) -> dict[str, Path]:
    """Draw every plot there is data for; returns plot key -> file."""
    colors = _colors(list(records))
    drawn = {
        "lengths": plot_lengths(records, colors, out_dir / PLOTS["lengths"]),
        "budget_vs_length": plot_budget_vs_length(records, summaries, colors, out_dir / PLOTS["budget_vs_length"]),
        "budget_by_difficulty": plot_budget_by_difficulty(records, colors, out_dir / PLOTS["budget_by_difficulty"]),
        "control": plot_control(records, colors, out_dir / PLOTS["control"]),
        "control_accuracy": plot_control_accuracy(summaries, colors, out_dir / PLOTS["control_accuracy"]),
        "accuracy_vs_length": plot_accuracy_vs_length(summaries, colors, out_dir / PLOTS["accuracy_vs_length"]),
    }
    for key, path in drawn.items():
        if path is None:
            logger.info("plot %s skipped: no run has the data for it", key)
    return {key: path for key, path in drawn.items() if path is not None}


# --- command line -----------------------------------------------------------------------------------------


def _run_spec(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, Path(folder)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfbudgeter report",
        description="Build a Markdown report with plots from evaluation folders (items.jsonl + metrics.json).",
    )
    parser.add_argument(
        "--run",
        dest="runs",
        action="append",
        type=_run_spec,
        required=True,
        metavar="NAME=DIR",
        help="an evaluation folder and the name it gets in the report (repeat for each run)",
    )
    parser.add_argument("--baseline", default=None, help="run name whose mean length compression is measured against")
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json, report.md and the plots")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    runs: dict[str, Path] = {}
    for name, folder in args.runs:
        if name in runs:
            raise UserError(f"run name {name!r} is given twice")
        if not folder.is_dir():
            raise UserError(f"{folder} (run {name!r}) is not a folder")
        runs[name] = folder
    summaries = build_report(runs, args.out, args.baseline)
    print_table(table_rows(summaries), "SelfBudgeter evaluation", f"report: {args.out / 'report.md'}")
    return 0
