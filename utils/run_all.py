"""Regenerate every table of FedLLM-Bench from the presets in utils/presets.json: train, evaluate, tabulate.

    bash run_all.sh                      # paper scale (GPU, judge endpoint, built datasets)
    bash run_all.sh --smoke              # the same pipeline on a CPU, offline, in minutes
    bash run_all.sh --only table3 --dry-run

For each table the driver plans steps (dataset statistics, training runs, evaluations), skips those already done
(a done marker beside their outputs), resumes interrupted runs with --resume, records a "skipped: reason" for
steps that cannot run here (a missing entry script or flag, no judge), and writes <results>/<table>.md and .csv
with the paper's published number (evaluation/paper_results.json) and the difference beside each of our values,
plus a training-loss plot per run. Runs shared by several tables (same command) are trained once.
"""
from __future__ import annotations

import argparse
import ast
import csv
import functools
import hashlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from evaluation.show_results import COLUMNS  # standard library only: cheap to import

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "utils" / "presets.json"
PAPER_RESULTS = ROOT / "evaluation" / "paper_results.json"
DONE = "run_all.done"
# The benchmark behind each show_results column title.
BENCHMARK_OF = {column.title: column.benchmark for column in COLUMNS}
JUDGED = {"mtbench", "vicuna", "aya", "chatbot", "wildchat"}
NEEDS_DOWNLOAD = {"mmlu"}  # not part of the offline eval data copy
NO_PAPER = "n/a"  # a column with no published counterpart (the smoke metrics)


# ------------------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------------------

def load_presets(path: Path = PRESETS) -> dict:
    presets = json.loads(Path(path).read_text(encoding="utf-8"))
    for name, table in presets["tables"].items():
        setting = table.get("setting")
        if setting and setting not in presets["settings"]:
            raise SystemExit(f"{path}: table {name} names unknown setting {setting!r}")
    return presets


def select_tables(presets: dict, only: list[str] | None) -> list[str]:
    names = list(presets["tables"])
    if not only:
        return names
    unknown = [n for n in only if n not in names]
    if unknown:
        raise SystemExit(f"--only {', '.join(unknown)}: no such table; choose from {', '.join(names)}")
    return [n for n in names if n in only]


def expand_rows(table: dict, presets: dict) -> list[dict]:
    """The table's rows, with {"methods": true} replaced by one row per federated method."""
    rows = []
    for row in table["rows"]:
        if row.get("methods"):
            rows += [{"row": label, "fed_alg": alg} for label, alg in presets["methods"].items()]
        else:
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------------
# Runs: from a (table, row) to one training command
# ------------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    name: str
    entry: str
    args: dict
    task: str  # "sft" or "preference"
    skip: str | None = None
    local_client_size: int | None = None  # resolved to local<k> at execution time (paper scale)

    @property
    def num_rounds(self) -> int:
        return int(self.args["num_rounds"])


def run_for_row(table: dict, row: dict, presets: dict, smoke: bool) -> Run:
    setting = presets["settings"][table["setting"]]
    task = table.get("task", "sft")
    args = {**setting["args"], "model_name_or_path": presets["models"][setting["model"]], **row.get("args", {})}
    args["fed_alg"] = row["fed_alg"]
    local_size = None
    if smoke:
        args.update(presets["smoke"]["args"])
        args["model_name_or_path"] = presets["smoke"]["model"]
        args["dataset"] = presets["smoke"]["datasets"][task]
    if row["fed_alg"] == "local":
        if smoke or "local_client" in row:
            args["fed_alg"] = f"local{row.get('local_client', row.get('smoke_client', 0))}"
        else:
            local_size = row["local_client_size"]
    args = {k: v for k, v in args.items() if v is not None}
    digest = hashlib.sha1(json.dumps([setting["entry"], args, local_size], sort_keys=True).encode()).hexdigest()[:8]
    label = args["fed_alg"] if local_size is None else f"local-n{local_size}"
    name = f"{args['dataset']}__{label}__{digest}"
    return Run(name, setting["entry"], args, task, smoke_skip(row, presets) if smoke else None, local_size)


def smoke_skip(row: dict, presets: dict) -> str | None:
    """Smoke mode trains a subset: the methods in smoke.methods and the local clients in smoke.local_clients."""
    smoke = presets["smoke"]
    if row.get("smoke_skip"):
        return f"not run in smoke: {row['smoke_skip']}"
    if _method_family(row["fed_alg"]) not in smoke["methods"]:
        return "not run in smoke (smoke.methods in utils/presets.json)"
    if row["fed_alg"] == "local" and row.get("smoke_client", 0) not in smoke["local_clients"]:
        return "not run in smoke (smoke.local_clients in utils/presets.json)"
    return None


def _method_family(fed_alg: str) -> str:
    return "local" if fed_alg.startswith("local") else fed_alg


def entry_flags(entry: str) -> set[str] | None:
    """Flag names an entry script accepts: fields of the dataclasses in it and in federated/config.py (None when
    the script does not exist). Read from the source, so nothing heavy is imported."""
    script = ROOT / entry
    if not script.exists():
        return None
    flags = set()
    for path in (script, ROOT / "federated" / "config.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            flags |= {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    return flags


def missing_piece(run: Run, flags_of: Callable[[str], set[str] | None] = entry_flags) -> str | None:
    flags = flags_of(run.entry)
    if flags is None:
        return f"{run.entry} is not in the repository yet"
    unknown = sorted(k for k in run.args if k not in flags)
    if unknown:
        return f"{run.entry} has no {', '.join('--' + k for k in unknown)} yet"
    return None


def to_argv(args: dict) -> list[str]:
    argv = []
    for key, value in args.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is False:
            argv += [f"--{key}", "false"]
        else:
            argv += [f"--{key}", str(value)]
    return argv


# ------------------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------------------

@dataclass
class Step:
    name: str
    argv: list[str]
    done: Path  # marker: the step is finished when it exists
    skip: str | None = None
    before: Callable[["Step"], str | None] | None = None  # last-minute preparation; returns a skip reason
    after: Callable[["Step"], None] | None = None
    status: str = "planned"
    log: Path | None = None

    def command(self) -> str:
        return " ".join(self.argv)


@dataclass
class Context:
    presets: dict
    results: Path
    smoke: bool
    python: str = sys.executable
    judge_base_url: str | None = None
    judge_model: str = "gpt-4-1106-preview"
    flags_of: Callable[[str], set[str] | None] = entry_flags

    @property
    def runs_dir(self) -> Path:
        return self.results / "runs"

    @property
    def eval_dir(self) -> Path:
        return self.results / "eval"

    def judge_configured(self) -> bool:
        return bool(self.judge_base_url or os.environ.get("OPENAI_API_KEY"))


def final_checkpoint(ctx: Context, run: Run) -> Path:
    return ctx.runs_dir / run.name / f"checkpoint-{run.num_rounds}"


def train_step(ctx: Context, run: Run) -> Step:
    out = ctx.runs_dir / run.name
    argv = [ctx.python, run.entry, *to_argv(run.args), "--output_dir", str(out)]
    step = Step(f"train {run.name}", argv, out / DONE, skip=run.skip or missing_piece(run, ctx.flags_of))

    def before(s: Step) -> str | None:
        if run.local_client_size is not None:
            reason = resolve_local_client(s, run)
            if reason:
                return reason
        if (out / "args.json").exists() and "--resume" not in s.argv:
            s.argv.append("--resume")  # interrupted earlier: continue from its last checkpoint
        return None

    def after(s: Step) -> None:
        if final_checkpoint(ctx, run).exists():
            s.done.write_text("")

    step.before, step.after = before, after
    return step


@functools.cache
def client_sizes(dataset: str) -> list[int]:
    """Sample count of every client, loaded once per dataset however many local rows ask."""
    from data import load_federated_dataset

    return load_federated_dataset(dataset).sample_counts


def resolve_local_client(step: Step, run: Run) -> str | None:
    """Paper scale: the local baseline trains the client with the paper's local file size (local<k>)."""
    counts = client_sizes(run.args["dataset"])
    if run.local_client_size not in counts:
        return (f"no client of {run.args['dataset']} has {run.local_client_size} samples (the paper's local file "
                "is not one of the federated clients)")
    step.argv[step.argv.index("--fed_alg") + 1] = f"local{counts.index(run.local_client_size)}"
    return None


def eval_steps(ctx: Context, run: Run, benchmarks: set[str]) -> list[Step]:
    """Smoke: the quick smoke score, and judged benchmarks only with a judge. Paper scale: the rule-scored
    benchmarks (AdvBench, MMLU, HumanEval) always, the judged ones when a judge is configured."""
    steps = [smoke_score_step(ctx, run)] if ctx.smoke else []
    if ctx.smoke:
        benchmarks = benchmarks - NEEDS_DOWNLOAD if ctx.judge_configured() else set()
        groups = [benchmarks]
    else:
        groups = [benchmarks - JUDGED, benchmarks & JUDGED]
    return steps + [benchmark_step(ctx, run, group) for group in groups if group]


def smoke_score_step(ctx: Context, run: Run) -> Step:
    """Exact match (SFT) or DPO preference accuracy on the first held-out samples of each task."""
    output = ctx.runs_dir / run.name / "smoke_eval.json"
    smoke = ctx.presets["smoke"]
    module = "evaluation.preference" if run.task == "preference" else "evaluation.exact_match"
    argv = [ctx.python, "-m", module, "--checkpoint", str(final_checkpoint(ctx, run)),
            "--per_task", str(smoke["eval_per_task"]), "--output", str(output)]
    if run.task != "preference":
        argv += ["--max_new_tokens", str(smoke["eval_max_new_tokens"])]
    return Step(f"score {run.name} (smoke)", argv, output, skip=run.skip)


def benchmark_step(ctx: Context, run: Run, benchmarks: set[str]) -> Step:
    needs_judge = benchmarks & JUDGED
    skip = run.skip
    if needs_judge and not ctx.judge_configured():
        skip = skip or f"no judge configured for {', '.join(sorted(needs_judge))} (set OPENAI_API_KEY or --judge_base_url)"
    argv = [ctx.python, "-m", "evaluation.run", "--checkpoints", str(final_checkpoint(ctx, run)),
            "--benchmarks", *sorted(benchmarks), "--output_dir", str(ctx.eval_dir), "--judge_model", ctx.judge_model]
    if ctx.judge_base_url:
        argv += ["--judge_base_url", ctx.judge_base_url]
    if ctx.smoke:
        smoke = ctx.presets["smoke"]
        argv += ["--limit", str(smoke["judged_limit"]), "--max_new_tokens", str(smoke["judged_max_new_tokens"]),
                 "--eval_data_dir", smoke["eval_data_dir"]]
    marker = ctx.eval_dir / ".done" / f"{run.name}__{'-'.join(sorted(benchmarks))}"
    step = Step(f"evaluate {run.name} on {', '.join(sorted(benchmarks))}", argv, marker, skip=skip)
    step.after = lambda s: s.done.write_text("")
    return step


def stats_step(ctx: Context, dataset: str) -> Step:
    output = ctx.results / "table1" / f"{dataset}.json"
    argv = [ctx.python, "-m", "data.stats", "--dataset", dataset, "--json", str(output)]
    return Step(f"statistics {dataset}", argv, output)


def stats_dataset(ctx: Context, row: dict) -> str:
    return ctx.presets["smoke"]["datasets"][row.get("task", "sft")] if ctx.smoke else row["dataset"]


def table_benchmarks(table: dict) -> set[str]:
    return {BENCHMARK_OF[c["metric"].split(":", 1)[1]] if c["metric"].startswith("judged:") else "aya"
            for c in table["columns"] if not c["metric"].startswith("smoke:")}


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    runs: dict[str, Run] = field(default_factory=dict)  # by run name
    cells: dict[str, list[tuple[dict, str]]] = field(default_factory=dict)  # table -> [(row, run name or dataset)]


def plan(ctx: Context, tables: list[str]) -> Plan:
    """Every step the chosen tables need, shared runs once, in a stable order."""
    result = Plan()
    evals: dict[str, set[str]] = {}
    stats: list[str] = []
    for name in tables:
        table = ctx.presets["tables"][name]
        result.cells[name] = []
        if table["kind"] == "stats":
            for row in table["rows"]:
                dataset = stats_dataset(ctx, row)
                result.cells[name].append((row, dataset))
                stats += [dataset] if dataset not in stats else []
            continue
        for row in expand_rows(table, ctx.presets):
            run = run_for_row(table, row, ctx.presets, ctx.smoke)
            result.runs.setdefault(run.name, run)
            result.cells[name].append((row, run.name))
            evals.setdefault(run.name, set()).update(table_benchmarks(table))
    result.steps += [stats_step(ctx, d) for d in stats]
    for run_name, run in result.runs.items():
        result.steps.append(train_step(ctx, run))
        result.steps += eval_steps(ctx, run, evals[run_name])
    return result


# ------------------------------------------------------------------------------------------------------------
# Execution
# ------------------------------------------------------------------------------------------------------------

def execute(steps: list[Step], ctx: Context, dry_run: bool = False, echo: Callable[[str], None] = print) -> None:
    logs = ctx.results / "logs"
    blocked: set[str] = set()  # runs whose training did not finish: their evaluations wait
    for step in steps:
        run_name = step.name.split()[1] if step.name.split()[0] in ("train", "score", "evaluate") else None
        if step.skip:
            step.status = f"skipped: {step.skip}"
        elif step.done.exists():
            step.status = "done earlier"
        elif run_name in blocked:
            step.status = "skipped: its training run did not finish"
        elif dry_run:
            step.status = "would run"
            resumes = step.name.startswith("train") and (step.done.parent / "args.json").exists()
            echo(step.command() + (" --resume" if resumes else ""))
            continue
        else:
            reason = step.before(step) if step.before else None
            if reason:
                step.status = f"skipped: {reason}"
            else:
                step.status = run_step(step, logs, echo)
        if step.name.startswith("train") and not step.done.exists():
            blocked.add(run_name)
        echo(f"[{step.status}] {step.name}")


def run_step(step: Step, logs: Path, echo: Callable[[str], None]) -> str:
    logs.mkdir(parents=True, exist_ok=True)
    step.log = logs / (step.name.replace(" ", "_").replace(",", "").replace("/", "-")[:150] + ".log")
    step.done.parent.mkdir(parents=True, exist_ok=True)
    echo(f"$ {step.command()}  (log: {step.log})")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(step.log, "w", encoding="utf-8") as log:
        rc = subprocess.call(step.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        return f"failed (exit {rc}; see {step.log})"
    if step.after:
        step.after(step)
    return "ran" if step.done.exists() else f"ran, but its output is missing (see {step.log})"


# ------------------------------------------------------------------------------------------------------------
# Values: ours and the paper's
# ------------------------------------------------------------------------------------------------------------

def paper_value(paper: dict, table: str, row: str, column: str) -> float | None:
    entry = paper.get("tables", {}).get(table, {}).get(row, {}).get(column)
    return None if entry is None else entry.get("value")


def load_judged(eval_dir: Path) -> tuple[dict, dict]:
    """(main table, Aya language table) of evaluation.show_results, by model id; empty when nothing was judged."""
    if not any(eval_dir.glob("*/judgments/*.jsonl")):
        return {}, {}
    from evaluation.show_results import language_table, load, main_table

    found = load(eval_dir)
    return main_table(found)[1], language_table(found)[1]


def _cell_value(cells: dict, title: str) -> float | None:
    for key, cell in cells.items():
        if key == title or key.startswith(title + " ["):
            return cell.value
    return None


def metric_value(metric: str, run_dir: Path, judged: tuple[dict, dict]) -> float | None:
    kind, _, key = metric.partition(":")
    if kind == "smoke":
        scores = run_dir / "smoke_eval.json"
        return json.loads(scores.read_text()).get(key) if scores.exists() else None
    from evaluation.models import model_id_for  # the evaluation's own naming of a checkpoint's results
    model_id = model_id_for(str(run_dir / latest_checkpoint_name(run_dir)), "")
    if kind == "judged":
        return _cell_value(judged[0].get(model_id, {}), key)
    if kind == "aya":
        languages = judged[1].get(model_id, {})
        return _cell_value(languages, key) if key in languages else _cell_value(languages, key.replace("_", " "))
    raise ValueError(f"unknown metric kind in {metric!r}")


def latest_checkpoint_name(run_dir: Path) -> str:
    rounds = [int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return f"checkpoint-{max(rounds)}" if rounds else "checkpoint-?"


def stats_values(path: Path) -> dict[str, float | None]:
    if not path.exists():
        return {}
    row = json.loads(path.read_text())

    def pair(key):
        value = row.get(key)
        value = value.get("pooled") if isinstance(value, dict) else value
        return (None, None) if value is None else value

    values = {"# clients": row["clients"], "# samples": row["samples"]}
    for label, key in (("# samples per client", "per_client"), ("L. instruction", "instruction_length"),
                       ("L. response", "response_length"), ("IFD", "quality")):
        values[f"{label} (mean)"], values[f"{label} (std)"] = pair(key)
    return values


# ------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------

@dataclass
class Table:
    name: str
    title: str
    columns: list[str]
    rows: list[tuple[str, str, dict[str, float | None], dict[str, float | None]]]  # label, status, ours, paper
    smoke: bool
    notes: list[str] = field(default_factory=list)


def table_columns(ctx: Context, name: str) -> list[dict]:
    table = ctx.presets["tables"][name]
    if table["kind"] == "stats":
        return [{"title": c, "metric": "stats"} for c in table["columns"]]
    extra = ctx.presets["smoke_columns"][table.get("task", "sft")] if ctx.smoke else []
    return extra + table["columns"]


def assemble(ctx: Context, name: str, result: Plan, statuses: dict[str, str], paper: dict,
             judged: tuple[dict, dict]) -> Table:
    spec = ctx.presets["tables"][name]
    columns = table_columns(ctx, name)
    rows = []
    for row, key in result.cells[name]:
        if spec["kind"] == "stats":
            ours = stats_values(ctx.results / "table1" / f"{key}.json")
            status = statuses.get(f"statistics {key}", "")
        else:
            run_dir = ctx.runs_dir / key
            ours = {c["title"]: _scaled(metric_value(c["metric"], run_dir, judged), c.get("scale")) for c in columns}
            status = statuses.get(f"train {key}", "")
        paper_row = {c["title"]: NO_PAPER if c["metric"].startswith("smoke:") else
                     paper_value(paper, name, row["row"], c["title"]) for c in columns}
        rows.append((row["row"] + (f" [{key}]" if ctx.smoke and spec["kind"] == "stats" else ""), status,
                     ours, paper_row))
    notes = [paper["not_found"][name]] if name in paper.get("not_found", {}) else []
    if ctx.smoke and spec["kind"] == "runs" and not ctx.judge_configured():
        notes.append("Judged columns are empty: no judge configured (OPENAI_API_KEY or --judge_base_url).")
    if spec["kind"] == "stats":
        datasets = dict.fromkeys(key for _, key in result.cells[name])
        notes += [f"{key}: {tokenizer_used(ctx.results / 'table1' / f'{key}.json')}" for key in datasets]
    return Table(name, spec["title"], [c["title"] for c in columns], rows, ctx.smoke, notes)


def tokenizer_used(path: Path) -> str:
    if not path.exists():
        return "no statistics"
    return "lengths counted with " + json.loads(path.read_text()).get("tokenizer", "an unrecorded tokenizer")


def _scaled(value, scale):
    return value * scale if value is not None and scale is not None else value


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def difference(ours, paper):
    numeric = isinstance(ours, (int, float)) and isinstance(paper, (int, float))
    return ours - paper if numeric else None


def paper_text(paper) -> str:
    return "n/a" if paper is NO_PAPER else "not found" if paper is None else _fmt(paper)


def to_records(table: Table) -> tuple[list[str], list[list[str]]]:
    header = ["row"] + [f"{c}{s}" for c in table.columns for s in ("", " (paper)", " (diff)")] + ["status"]
    records = []
    for label, status, ours, paper in table.rows:
        cells = [label]
        for column in table.columns:
            p = paper.get(column)
            cells += [_fmt(ours.get(column)) or "-", paper_text(p),
                      _fmt(difference(ours.get(column), p)) or "-"]
        records.append(cells + [status])
    return header, records


def to_markdown(table: Table) -> str:
    header, records = to_records(table)
    lines = [f"# {table.title}" + (" — SMOKE" if table.smoke else ""), ""]
    if table.smoke:
        lines += ["**SMOKE RUN**: embedded SmolLM2, offline stand-in datasets, a few rounds; the values are not "
                  "comparable with the paper's, which are shown only to keep the layout.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in records]
    lines += [""] + [f"- {note}" for note in table.notes if note]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    header, records = to_records(table)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["mode", *header])
    for record in records:
        writer.writerow(["smoke" if table.smoke else "paper", *record])
    return buffer.getvalue()


def write_table(table: Table, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{table.name}.md").write_text(to_markdown(table), encoding="utf-8")
    (results / f"{table.name}.csv").write_text(to_csv(table), encoding="utf-8")


# ------------------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------------------

def round_losses(run_dir: Path) -> list[float]:
    """Mean client training loss per round, from metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    losses = []
    for line in path.read_text().splitlines():
        values = [v for v in json.loads(line).get("client_loss", {}).values() if v is not None and v >= 0]
        losses.append(sum(values) / len(values) if values else float("nan"))
    return losses


def plot_losses(runs: dict[str, Run], ctx: Context) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = ctx.results / "plots"
    for name in runs:
        losses = round_losses(ctx.runs_dir / name)
        if not losses:
            continue
        plots.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(range(1, len(losses) + 1), losses, marker="o")
        ax.set(xlabel="round", ylabel="mean client loss", title=name[:60] + (" (smoke)" if ctx.smoke else ""))
        fig.tight_layout()
        fig.savefig(plots / f"loss_{name}.png", dpi=100)
        plt.close(fig)


def plot_table(table: Table, results: Path) -> None:
    """A grouped bar chart of our values (and the paper's where published) per column: the figure tables."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table.columns), figsize=(4 * len(table.columns), 3.6), squeeze=False)
    for ax, column in zip(axes[0], table.columns):
        labels = [label for label, *_ in table.rows]
        ours = [r[2].get(column) for r in table.rows]
        paper = [r[3].get(column) if isinstance(r[3].get(column), (int, float)) else None for r in table.rows]
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], [v if v is not None else 0 for v in ours], width=0.4, label="ours")
        ax.bar([x + 0.2 for x in xs], [v if v is not None else 0 for v in paper], width=0.4, label="paper")
        ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(column, fontsize=9)
        if all(v is None for v in ours + paper):
            ax.text(0.5, 0.5, "no values\n(not run, or no judge)", ha="center", va="center", transform=ax.transAxes)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(table.title + (" — SMOKE" if table.smoke else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(results / f"{table.name}.png", dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU smoke mode (offline stand-ins, a few rounds)")
    parser.add_argument("--only", action="append", default=[], help="table name(s), e.g. table3 (repeat or comma)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands that would run, run nothing")
    parser.add_argument("--results_dir", default=None, help="default results/ (paper) or results/smoke/ (smoke)")
    parser.add_argument("--presets", default=str(PRESETS))
    parser.add_argument("--judge_base_url", default=None, help="OpenAI-compatible judge endpoint")
    parser.add_argument("--judge_model", default="gpt-4-1106-preview")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    presets = load_presets(Path(args.presets))
    only = [name for item in args.only for name in item.split(",") if name]
    tables = select_tables(presets, only)
    results = Path(args.results_dir or ("results/smoke" if args.smoke else "results"))
    results = results if results.is_absolute() else ROOT / results
    ctx = Context(presets, results, args.smoke, judge_base_url=args.judge_base_url, judge_model=args.judge_model)
    if args.smoke:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = plan(ctx, tables)
    execute(result.steps, ctx, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    statuses = {s.name: s.status for s in result.steps}
    paper = json.loads(PAPER_RESULTS.read_text(encoding="utf-8"))
    judged = load_judged(ctx.eval_dir)
    for name in tables:
        table = assemble(ctx, name, result, statuses, paper, judged)
        write_table(table, results)
        if presets["tables"][name].get("plot"):
            plot_table(table, results)
    plot_losses(result.runs, ctx)
    (results / "steps.json").write_text(json.dumps(statuses, indent=1))
    print(f"Tables written to {results}: {', '.join(tables)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
