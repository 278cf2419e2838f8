"""Running a plan: one command per step (dataset statistics, training runs, evaluations), each skipped when its
done marker exists, resumed when it was interrupted (--resume), and skipped with a reason when it cannot run here
(no judge, a missing piece of the repository). Every command's output goes to a log file under results/logs/.
"""
from __future__ import annotations

import functools
import os
import random
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from evaluation.show_results import COLUMNS  # standard library only: cheap to import
from reproduce.plan import ROOT, LocalChoice, Model, Plan, Run, entry_flags, missing_piece
from utils.files import reads_as_json, write_json_atomic, write_text_atomic

DONE = "run_all.done"
LOCAL_CLIENT = "local_client.json"  # which client a local baseline trained, written when it starts
BENCHMARK_OF = {column.title: column.benchmark for column in COLUMNS}  # show_results column -> benchmark
JUDGED = {"mtbench", "vicuna", "aya", "chatbot", "wildchat"}
NEEDS_DOWNLOAD = {"mmlu"}  # not part of the offline evaluation data


@dataclass
class Step:
    name: str
    argv: list[str]
    done: Path  # the step is finished when this exists
    skip: str | None = None
    run: str | None = None  # the training run this step belongs to: it waits for that run's training
    before: Callable[["Step"], str | None] | None = None  # last-minute preparation; returns a skip reason
    after: Callable[["Step"], None] | None = None
    status: str = "planned"

    def command(self) -> str:
        return " ".join(self.argv)

    def finished(self) -> bool:
        """The done marker exists, and a JSON output reads whole: a torn one (its writer killed mid-write, by an
        older version that wrote in place) is redone, not counted as done and read later by the tables."""
        return self.done.exists() and (self.done.suffix != ".json" or reads_as_json(self.done))


@dataclass
class Context:
    presets: dict
    results: Path
    smoke: bool
    python: str = sys.executable
    judge_base_url: str | None = None
    judge_model: str | None = None  # None: each benchmark's judge as the authors chose it (evaluation.run)
    eval_data_dir: str | None = None  # evaluation data folder; default: evaluation's download cache
    local_files: dict | None = None  # dataset -> the authors' released file (--local_data_dir)
    flags_of: Callable[[str], set[str] | None] = entry_flags

    @property
    def runs_dir(self) -> Path:
        return self.results / "runs"

    @property
    def eval_dir(self) -> Path:
        return self.results / "eval"

    def judge_configured(self) -> bool:
        return bool(self.judge_base_url or os.environ.get("OPENAI_API_KEY"))

    def checkpoint(self, model: Model, run: Run) -> Path | None:
        """The model's final adapter (None for the base model alone)."""
        if run.entry is None:
            return None
        folder = self.runs_dir / run.name / (model.group or "")
        return folder / f"checkpoint-{run.num_rounds}"


# ------------------------------------------------------------------------------------------------------------
# Steps of a plan
# ------------------------------------------------------------------------------------------------------------

def steps_for(ctx: Context, result: Plan) -> list[Step]:
    steps = [stats_step(ctx, dataset, task) for dataset, task in result.stats]
    steps += [analysis_step(ctx, dataset) for dataset, _ in result.analyses]
    for run in result.runs.values():
        if run.entry is not None:
            steps.append(train_step(ctx, run))
        for model in (m for m in result.evaluations if m.run == run.name):
            steps += eval_steps(ctx, run, model, result.evaluations[model])
    return steps


def train_step(ctx: Context, run: Run) -> Step:
    out = ctx.runs_dir / run.name
    argv = [ctx.python, run.entry, *to_argv(run.args), "--output_dir", str(out)]
    step = Step(f"train {run.name}", argv, out / DONE, skip=missing_piece(run, ctx.flags_of),
                run=run.name)

    def before(s: Step) -> str | None:
        if run.local is not None:
            reason = choose_local_client(s, run, out)
            if reason:
                return reason
        if (out / "args.json").exists() and "--resume" not in s.argv:
            s.argv.append("--resume")  # interrupted earlier: continue from its last checkpoint
        return None

    def after(s: Step) -> None:
        finals = list(out.glob(f"**/checkpoint-{run.num_rounds}"))
        if finals:
            write_text_atomic(s.done, "")

    step.before, step.after = before, after
    return step


def to_argv(args: dict) -> list[str]:
    argv = []
    for key, value in args.items():
        argv += [f"--{key}"] if value is True else [f"--{key}", "false" if value is False else str(value)]
    return argv


def eval_steps(ctx: Context, run: Run, model: Model, metrics: set[str]) -> list[Step]:
    """Smoke: the stand-in score, and judged benchmarks only with a judge. Paper scale: the rule-scored
    benchmarks (AdvBench, MMLU, HumanEval) always, the judged ones when a judge is configured."""
    benchmarks = {BENCHMARK_OF[m.split(":", 1)[1]] if m.startswith("judged:") else "aya" for m in metrics}
    if ctx.smoke:  # a training run scores its own models (eval_after); the base model needs a step of its own
        judged = benchmarks - NEEDS_DOWNLOAD if ctx.judge_configured() else set()
        return ([smoke_score_step(ctx, run)] if run.entry is None else []) + \
            ([benchmark_step(ctx, run, model, judged, metrics)] if judged else [])
    groups = [benchmarks - JUDGED, benchmarks & JUDGED]
    return [benchmark_step(ctx, run, model, group, metrics) for group in groups if group]


def turn1_only(metrics: set[str]) -> bool:
    """Whether a model's tables read MT-Bench turn 1 only (then turn 2 is not judged: nobody reads it)."""
    return not metrics & {"judged:MT-Bench-2", "judged:MT-Bench"}


def judge_load_lines(ctx: Context, work: Plan) -> list[str]:
    """Per table, the judge calls and input tokens (answers at their length cap) its judged cells need; a
    model several tables share is counted in each, and once in the total."""
    from evaluation.benchmarks import judge_load

    limit = ctx.presets["smoke"]["judged_limit"] if ctx.smoke else None
    loads, lines, everything = {}, [], set()

    def load(benchmark: str, turn1: bool):
        if (benchmark, turn1) not in loads:
            try:
                loads[(benchmark, turn1)] = judge_load(benchmark, turn1, ctx.eval_data_dir, limit)
            except SystemExit as err:  # no evaluation data here: counts unknown
                loads[(benchmark, turn1)] = None
                lines.append(f"  ({benchmark}: no evaluation data here, not counted: {err})")
        return loads[(benchmark, turn1)]

    for name, table in work.tables.items():
        needs = {(m, BENCHMARK_OF[c.metric.split(":", 1)[1]]) for _, cells in table.rows for c in cells.values()
                 if c.metric and c.metric.startswith("judged:") for m in c.models}
        needs = {(m, b) for m, b in needs if b in JUDGED}
        everything |= needs
        counted = [load(b, b == "mtbench" and turn1_only(work.evaluations[m])) for m, b in needs]
        calls, tokens = sum(c.calls for c in counted if c), sum(c.input_tokens for c in counted if c)
        lines.append(f"{name}: {calls} judge calls, about {tokens / 1e6:.2f}M input tokens ({len(needs)} judged "
                     "answer sets)")
    counted = [load(b, b == "mtbench" and turn1_only(work.evaluations[m])) for m, b in everything]
    every_turn = [load(b, False) for _, b in everything]
    lines.append(f"all tables: {sum(c.calls for c in counted if c)} judge calls, about "
                 f"{sum(c.input_tokens for c in counted if c) / 1e6:.2f}M input tokens ({len(everything)} judged "
                 f"answer sets; {sum(c.calls for c in every_turn if c)} calls if every MT-Bench turn 2 were judged; "
                 "each call also writes up to --judge_max_tokens tokens)")
    return lines


def smoke_score_step(ctx: Context, run: Run) -> Step:
    """The base model's stand-in score: exact match (SFT) or DPO preference accuracy, as eval_after computes it
    for the trained runs (the first held-out samples of each task)."""
    metric = ctx.presets["smoke"]["metrics"][run.task]
    output = ctx.runs_dir / run.name / metric["file"]
    module = "evaluation.preference" if run.task == "preference" else "evaluation.exact_match"
    argv = [ctx.python, "-m", module, *target_args(ctx, run, Model(run.name), "--checkpoint"),
            "--per_task", str(ctx.presets["smoke"]["args"]["eval_per_task"]), "--output", str(output)]
    return Step(f"score {run.name} (smoke)", argv, output)


def target_args(ctx: Context, run: Run, model: Model, flag: str) -> list[str]:
    checkpoint = ctx.checkpoint(model, run)
    if checkpoint is not None:
        return [flag, str(checkpoint)]
    base = ["--base_model", run.args["model_name_or_path"], "--template", run.args["template"]]
    return base + (["--dataset", run.args["dataset"]] if ctx.smoke else [])


def benchmark_step(ctx: Context, run: Run, model: Model, benchmarks: set[str], metrics: set[str]) -> Step:
    needs_judge = benchmarks & JUDGED
    skip = None
    if needs_judge and not ctx.judge_configured():
        skip = f"no judge configured for {', '.join(sorted(needs_judge))} (set OPENAI_API_KEY or --judge_base_url)"
    argv = [ctx.python, "-m", "evaluation.run", *target_args(ctx, run, model, "--checkpoints"),
            "--benchmarks", *sorted(benchmarks), "--output_dir", str(ctx.eval_dir)]
    if ctx.judge_model:
        argv += ["--judge_model", ctx.judge_model]
    turn1 = "mtbench" in needs_judge and turn1_only(metrics)
    if turn1:
        argv += ["--judge_turns", "1"]
    if ctx.judge_base_url:
        argv += ["--judge_base_url", ctx.judge_base_url]
    if ctx.eval_data_dir:
        argv += ["--eval_data_dir", ctx.eval_data_dir]
    if ctx.smoke:
        smoke = ctx.presets["smoke"]
        argv += ["--limit", str(smoke["judged_limit"]), "--max_new_tokens", str(smoke["judged_max_new_tokens"])]
    marker = ctx.eval_dir / ".done" / (f"{model.key.replace('/', '__')}__{'-'.join(sorted(benchmarks))}" +
                                       ("__turn1" if turn1 else ""))
    step = Step(f"evaluate {model.key} on {', '.join(sorted(benchmarks))}", argv, marker, skip=skip,
                run=run.name if run.entry else None)
    step.after = lambda s: write_text_atomic(s.done, "")
    return step


def stats_step(ctx: Context, dataset: str, task: str) -> Step:
    output = ctx.results / "table1" / f"{dataset}.json"
    options = {**ctx.presets["tables"]["table1"]["stats_args"], **(ctx.presets["smoke"]["stats_args"] if ctx.smoke
                                                                   else {})}
    argv = [ctx.python, "-m", "data.stats", "--dataset", dataset, *to_argv(options), "--json", str(output)]
    return Step(f"statistics {dataset}", argv + local_file_args(ctx, dataset), output)


def analysis_step(ctx: Context, dataset: str) -> Step:
    """Section 3.3's figures of one dataset (python -m data.analyze), into results/analysis/<dataset>/."""
    out = ctx.results / "analysis" / dataset
    options = {**ctx.presets["tables"]["analysis"]["analysis_args"],
               **(ctx.presets["smoke"]["analysis_args"] if ctx.smoke else {})}
    argv = [ctx.python, "-m", "data.analyze", "--dataset", dataset, *to_argv(options), "--out", str(out)]
    return Step(f"figures {dataset}", argv + local_file_args(ctx, dataset), out / "figures.json")


def local_file_args(ctx: Context, dataset: str) -> list[str]:
    """--local_data_dir FILE where run_all.sh was given the authors' released file of `dataset`."""
    return [] if ctx.smoke or dataset not in (ctx.local_files or {}) else ["--local_data_dir", ctx.local_files[dataset]]


# ------------------------------------------------------------------------------------------------------------
# The local baselines' clients
# ------------------------------------------------------------------------------------------------------------

def run_clients(run: Run) -> tuple[tuple[str, int, str | None], ...]:
    options = tuple(sorted((k, v) for k, v in run.args.items() if k.startswith("synthetic_")))
    return client_table(run.args["dataset"], run.args.get("num_clients"), options, run.args.get("local_data_dir"))


@functools.cache
def client_table(dataset: str, num_clients: int | None = None, options: tuple = (),
                 local_data_dir: str | None = None) -> tuple[tuple[str, int, str | None], ...]:
    """(client id, samples, language) of the run's clients (the first num_clients), loaded once per dataset."""
    from data import load_federated_dataset

    data = load_federated_dataset(dataset, local_data_dir=local_data_dir, **dict(options))
    metadata = data.client_metadata or [{}] * data.num_clients
    rows = tuple((cid, n, meta.get("language")) for cid, n, meta in zip(data.client_ids, data.sample_counts, metadata))
    return rows[:num_clients] if num_clients else rows


def pick_client(choice: LocalChoice, clients: tuple[tuple[str, int, str | None], ...]) -> tuple[int | None, str]:
    """(client index, how it was chosen), or (None, why not)."""
    rng = random.Random(choice.seed)
    if choice.how == "random":
        if len(clients) < choice.count:
            return None, f"{choice.count} distinct clients are needed, the dataset has {len(clients)}"
        return rng.sample(range(len(clients)), choice.count)[choice.value], \
            f"draw {choice.value + 1} of {choice.count} distinct random clients, seed {choice.seed}"
    if choice.how == "language":
        speakers = [i for i, (_, _, language) in enumerate(clients) if language == choice.value]
        if not speakers:
            return None, f"no client speaks {choice.value} (the dataset carries no such client language)"
        return rng.choice(speakers), f"a random {choice.value} client, seed {choice.seed}"
    nearest = min(range(len(clients)), key=lambda i: (abs(clients[i][1] - choice.value), i))
    exact = "" if clients[nearest][1] == choice.value else f"nearest to the paper's {choice.value}: "
    return nearest, f"{exact}the client with {clients[nearest][1]} samples"


def choose_local_client(step: Step, run: Run, out: Path) -> str | None:
    """Put local<k> into the command and record the chosen client beside the run (the tables' notes cite it)."""
    clients = run_clients(run)
    index, how = pick_client(run.local, clients)
    if index is None:
        return how
    step.argv[step.argv.index("--fed_alg") + 1] = f"local{index}"
    client_id, samples, language = clients[index]
    out.mkdir(parents=True, exist_ok=True)
    record = {"client": index, "client_id": client_id, "samples": samples, "language": language, "chosen": how,
              "dataset": run.args["dataset"], "clients": len(clients)}
    write_json_atomic(out / LOCAL_CLIENT, record, indent=1)
    return None


# ------------------------------------------------------------------------------------------------------------
# Execution
# ------------------------------------------------------------------------------------------------------------

def execute(steps: list[Step], ctx: Context, dry_run: bool = False, echo: Callable[[str], None] = print,
            jobs: int = 1) -> None:
    """Run the steps, `jobs` at a time (independent trainings and evaluations side by side; a run's evaluations
    start when its training has finished). With jobs > 1 every command gets cores // jobs torch threads."""
    if dry_run or jobs <= 1:
        for step in steps:
            settle(step, ctx, dry_run, echo, blocked_by=None)
        return
    lock = threading.Lock()

    def echo_locked(line: str) -> None:
        with lock:
            echo(line)

    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    trainings: dict[str, Future] = {}
    futures = []
    # Steps that wait for a training go last: a waiting step holds a worker, so it must not stand before a
    # training in the queue (and since the training was queued first, waiting for it never deadlocks).
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for step in sorted(steps, key=waits_for_training):
            training = trainings.get(step.run) if not step.name.startswith("train") else None
            futures.append(pool.submit(settle, step, ctx, False, echo_locked, training, env))
            if step.name.startswith("train"):
                trainings[step.run] = futures[-1]
    for future in futures:
        future.result()  # an error in the executor itself (not a failed command) surfaces here


def settle(step: Step, ctx: Context, dry_run: bool, echo: Callable[[str], None], blocked_by: Future | None,
           env: dict | None = None) -> None:
    """Decide and run one step: skipped, done earlier, waiting for a training that failed, or run now."""
    if blocked_by is not None:
        blocked_by.result()
    if step.skip:
        step.status = f"skipped: {step.skip}"
    elif step.finished():
        step.status = "done earlier"
    elif dry_run:
        step.status = "would run"
        resumes = step.name.startswith("train") and (step.done.parent / "args.json").exists()
        echo(step.command() + (" --resume" if resumes else ""))
        return
    elif waits_for_training(step) and not training_done(ctx, step.run):
        step.status = "skipped: its training run did not finish"
    else:
        reason = step.before(step) if step.before else None
        step.status = f"skipped: {reason}" if reason else run_step(step, ctx.results / "logs", echo, env)
    echo(f"[{step.status}] {step.name}")


def waits_for_training(step: Step) -> bool:
    return step.run is not None and not step.name.startswith("train")


def training_done(ctx: Context, run: str) -> bool:
    return (ctx.runs_dir / run / DONE).exists()


def run_step(step: Step, logs: Path, echo: Callable[[str], None], env: dict | None = None) -> str:
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / (step.name.replace(" ", "_").replace(",", "").replace("/", "-")[:150] + ".log")
    step.done.parent.mkdir(parents=True, exist_ok=True)
    echo(f"$ {step.command()}  (log: {log})")
    env = {**(env or {}), **os.environ, "PYTHONPATH": str(ROOT)}  # the user's own thread settings win
    with open(log, "w", encoding="utf-8") as out:
        rc = subprocess.call(step.argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        return f"failed (exit {rc}; see {log})"
    if step.after:
        step.after(step)
    return "ran" if step.finished() else f"ran, but its output is missing or unreadable (see {log})"
