"""Tables: our value of every cell beside the paper's published number and the difference, in the paper's layout,
written as markdown and CSV (and a PNG for Figure 6), with notes on how each value was obtained.
"""
from __future__ import annotations

import csv
import io
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from reproduce.plan import Cell, Model, Plan, Run, TablePlan, stats_dataset
from reproduce.steps import LOCAL_CLIENT, Context
from utils.files import write_text_atomic

PAPER_RESULTS = Path(__file__).resolve().parent.parent / "evaluation" / "paper_results.json"
TITLES = {"figure6": "Figure 6", "analysis": "Section 3.3"}


@dataclass
class Table:
    name: str
    title: str
    columns: list[str]
    rows: list[tuple[str, dict[str, float | str | None], dict[str, float | str | None], str]]  # ours, paper, status
    smoke: bool
    notes: list[str] = field(default_factory=list)
    paper_notes: list[str] = field(default_factory=list)


def load_paper(path: Path = PAPER_RESULTS) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))["tables"]


def paper_cells(paper: dict, name: str) -> dict[str, dict[str, float | str]]:
    """{row: {column: value}} of a published table ({} for Figure 6, a plot without numbers)."""
    table = paper.get(name, {})
    return {r["row"]: {c: v["value"] for c, v in r["values"].items()} for r in table.get("rows", [])}


# ------------------------------------------------------------------------------------------------------------
# Our values
# ------------------------------------------------------------------------------------------------------------

@dataclass
class Values:
    """Where our numbers come from: the smoke scores beside each model, or the judged/rule-scored results."""
    ctx: Context
    plan: Plan
    judged: tuple[dict, dict] = ({}, {})

    @classmethod
    def load(cls, ctx: Context, plan: Plan) -> "Values":
        eval_dir = ctx.eval_dir
        if ctx.smoke or not any(eval_dir.glob("*/judgments/*.jsonl")):
            return cls(ctx, plan)
        from evaluation.show_results import language_table, load, main_table

        found = load(eval_dir)
        return cls(ctx, plan, (main_table(found)[1], language_table(found)[1]))

    def model(self, model: Model, metric: str) -> float | None:
        run = self.plan.runs[model.run]
        if self.ctx.smoke:
            return self.smoke_score(model, run)
        from evaluation.models import model_id_for  # the evaluation's own naming of a model's results

        checkpoint = self.ctx.checkpoint(model, run)
        model_id = model_id_for(str(checkpoint) if checkpoint else None, run.args["model_name_or_path"])
        kind, _, key = metric.partition(":")
        cells = self.judged[0].get(model_id, {}) if kind == "judged" else self.judged[1].get(model_id, {})
        return next((c.value for title, c in cells.items() if title == key or title.startswith(key + " [")), None)

    def smoke_score(self, model: Model, run: Run) -> float | None:
        spec = self.ctx.presets["smoke"]["metrics"][run.task]
        path = self.ctx.runs_dir / model.key / spec["file"]
        if not path.exists():
            return None
        value = json.loads(path.read_text()).get(spec["key"])
        return None if value is None else value * spec["scale"]

    def cell(self, cell: Cell, row: dict[str, float | None]) -> float | None:
        if cell.mean_of:
            parts = [row.get(c) for c in cell.mean_of]
            return mean(parts) if parts and all(isinstance(p, (int, float)) for p in parts) else None
        values = [self.model(m, cell.metric) for m in cell.models]
        return mean(values) if values and all(v is not None for v in values) else None


# ------------------------------------------------------------------------------------------------------------
# Assembly
# ------------------------------------------------------------------------------------------------------------

def assemble(ctx: Context, plan: Plan, name: str, statuses: dict[str, str], paper: dict, values: Values) -> Table:
    table_plan = plan.tables[name]
    published = paper.get(name, {})
    title = f"{TITLES.get(name, 'Table ' + name.removeprefix('table'))}: " + \
        (published.get("title") or ctx.presets["tables"][name].get("title", ""))
    build = {"runs": runs_rows, "stats": stats_rows, "analysis": analysis_rows,
             "settings": settings_rows}[table_plan.kind]
    columns, rows, notes = build(ctx, plan, table_plan, statuses, paper_cells(paper, name), values)
    if ctx.smoke:
        notes.insert(0, smoke_note(ctx, table_plan.kind))
    if not published:
        notes.append("The paper publishes this as a plot without numbers: there is no published value to compare.")
    notes += ctx.presets["tables"][name].get("notes", [])
    if ctx.presets.get("settings_from") == "scripts":
        notes += ["Settings of the released training scripts, not the paper's text (--settings scripts): " +
                  " ".join(ctx.presets["scripts"]["differences"])]
    if ctx.local_files and not ctx.smoke:
        notes.append("Datasets read from the authors' released files (--local_data_dir): " +
                     "; ".join(f"{d} <- {path}" for d, path in ctx.local_files.items()) + ".")
    return Table(name, title, columns, rows, ctx.smoke, notes, published.get("notes", []))


def runs_rows(ctx: Context, plan: Plan, table: TablePlan, statuses: dict[str, str], paper: dict, values: Values):
    rows, notes = [], []
    for label, cells in table.rows:
        ours: dict[str, float | None] = {}
        for column in table.columns:
            ours[column] = values.cell(cells[column], ours)
        runs = {m.run for c in cells.values() for m in c.models}
        rows.append((label, ours, paper.get(label, {}), row_status(runs, statuses)))
        notes += [f"{label}, {column}: empty, {c.why_empty}" for column, c in cells.items() if c.why_empty]
    notes += local_notes(ctx, plan, table) + formula_notes(ctx.presets["tables"][table.name])
    if not ctx.smoke and not ctx.judge_configured():
        notes.append("Judged columns stay empty until a judge is configured (OPENAI_API_KEY or --judge_base_url).")
    return table.columns, rows, notes


def row_status(runs: set[str], statuses: dict[str, str]) -> str:
    """'done' when every run behind the row trained, else what happened to the others."""
    states = sorted({statuses.get(f"train {r}", "done") for r in runs})
    pending = [s for s in states if s not in ("ran", "done earlier", "done")]
    return "; ".join(pending) if pending else "done"


def local_notes(ctx: Context, plan: Plan, table: TablePlan) -> list[str]:
    """Which client each local baseline trained: ids and sizes, as chosen on the built dataset; one note per row
    when its cells share the local models (Tables 2-5), else one per cell (Table 6's Local row, Table 8)."""
    notes = []
    for label, cells in table.rows:
        local = {column: tuple(c.models) for column, c in cells.items()
                 if any(plan.runs[m.run].local for m in c.models)}
        if len(set(local.values())) == 1:
            notes.append(f"{label}: {describe_local(ctx, plan, next(iter(local.values())))}")
        else:
            notes += [f"{label}, {column}: {describe_local(ctx, plan, models)}" for column, models in local.items()]
    return notes


def describe_local(ctx: Context, plan: Plan, models: tuple[Model, ...]) -> str:
    chosen = []
    for model in models:
        path = ctx.runs_dir / model.run / LOCAL_CLIENT
        record = json.loads(path.read_text()) if path.exists() else None
        chosen.append(f"client {record['client']} (id {record['client_id']}, {record['samples']} samples; "
                      f"{record['chosen']})" if record else f"{plan.runs[model.run].local.label()} (not chosen yet)")
    mean = "mean of " if len(chosen) > 1 else ""
    args = plan.runs[models[0].run].args
    schedule = f"local epochs: {args['local_epochs']}" if "local_epochs" in args else \
        f"{args['num_rounds']} rounds x {args['max_steps']} steps at batch {args['batch_size']} (the released scripts)"
    return f"{mean}{', '.join(chosen)}; {schedule}."


def formula_notes(spec: dict) -> list[str]:
    return [f"{c['title']} = mean of {', '.join(c['mean_of'])} (the paper's formula)"
            for c in spec.get("columns", []) if "mean_of" in c]


def smoke_note(ctx: Context, kind: str) -> str:
    metrics = ctx.presets["smoke"]["metrics"]
    if kind == "runs":
        return (f"SMOKE RUN: every cell holds the stand-in score of the run(s) behind it ({metrics['sft']['label']} "
                f"for instruction tuning, {metrics['preference']['label']} for DPO, on the held-out set of "
                "fed-synthetic or fed-synthetic-pref) after a few tiny rounds of SmolLM2, never the paper's metric. "
                "The published numbers are shown to check the layout; the differences cannot be meaningful.")
    if kind in ("stats", "analysis"):
        return "SMOKE RUN: statistics of the offline stand-in datasets, not of the paper's datasets."
    return "SMOKE RUN: the shrunk settings the smoke mode actually ran, beside the paper's."


STATS_ROWS = {  # the paper's Table 1 row -> (our statistics' key, index in (mean, std) or None)
    "# Clients (Total)": ("clients", None), "# Samples (Total)": ("samples", None),
    "# Samples (Client) mean": ("per_client", 0), "# Samples (Client) std": ("per_client", 1),
    "L. Instruction (Client) mean": ("instruction_length", 0), "L. Instruction (Client) std": ("instruction_length", 1),
    "L. Response (Client) mean": ("response_length", 0), "L. Response (Client) std": ("response_length", 1),
    "Data Quality (Client) mean": ("quality", 0), "Data Quality (Client) std": ("quality", 1),
}


def stats_rows(ctx: Context, plan: Plan, table: TablePlan, statuses: dict[str, str], paper: dict, _: Values):
    spec = ctx.presets["tables"][table.name]
    aggregation = spec["stats_args"]["aggregation"]
    datasets = [stats_dataset(ctx.presets, c, ctx.smoke)[0] for c in spec["columns"]]
    stats = {d: read_stats(ctx.results / "table1" / f"{d}.json") for d in set(datasets)}
    rows = [("Characteristic", {c["title"]: (f"stand-in: {d}" if ctx.smoke else c["characteristic"])
                                for c, d in zip(spec["columns"], datasets)}, paper.get("Characteristic", {}), ""),
            ("Applied Task", {c["title"]: "PA" if c.get("task") == "preference" else "IT" for c in spec["columns"]},
             paper.get("Applied Task", {}), "")]
    for label, (key, index) in STATS_ROWS.items():
        ours = {c["title"]: stat_value(stats[d], key, index, aggregation) for c, d in zip(spec["columns"], datasets)}
        rows.append((label, ours, paper.get(label, {}), ""))
    notes = [f"{d}: {statuses.get(f'statistics {d}', '')}; lengths counted with "
             f"{stats[d].get('tokenizer', 'an unrecorded tokenizer') if stats[d] else '(no statistics yet)'}"
             for d in dict.fromkeys(datasets)]
    notes.append(f"Lengths and quality: mean ± std over clients of each client's average ({aggregation}), "
                 "population std; quality is the IFD score.")
    return table.columns, rows, notes


FIGURES = {  # data.analyze's files -> the paper's figure
    "fig1a_language.png": "Fig. 1a languages", "fig1b_lengths.png": "Fig. 1b lengths",
    "fig1c_length_preference.png": "Fig. 1c length preference", "fig1d_quality_preference.png": "Fig. 1d quality "
    "preference", "fig3_quality.png": "Fig. 3 quality (IFD)", "fig4_tsne.png": "Fig. 4 t-SNE embeddings",
    "fig5_quantity.png": "Fig. 5 samples per client",
}


def analysis_rows(ctx: Context, plan: Plan, table: TablePlan, statuses: dict[str, str], paper: dict, _: Values):
    """Section 3.3's figures: one row per figure, the file of each dataset (- where the dataset has none)."""
    spec = ctx.presets["tables"][table.name]
    datasets = [stats_dataset(ctx.presets, c, ctx.smoke)[0] for c in spec["columns"]]
    written = {d: read_stats(ctx.results / "analysis" / d / "figures.json").get("figures", []) for d in datasets}
    rows = [(label, {c["title"]: (f"analysis/{d}/{file}" if file in written[d] else None)
                     for c, d in zip(spec["columns"], datasets)}, {}, "")
            for file, label in FIGURES.items()]
    notes = [f"{d}: {statuses.get(f'figures {d}', '')}" for d in dict.fromkeys(datasets)]
    notes.append("Figure 1a needs client languages (Fed-Aya), 1c and 1d preference pairs (Fed-ChatbotPA).")
    return table.columns, rows, notes


def read_stats(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def stat_value(stats: dict, key: str, index: int | None, aggregation: str) -> float | None:
    value = stats.get(key)
    if index is None or value is None:
        return value
    value = value.get(aggregation) if isinstance(value, dict) else value
    return None if value is None else value[index]


def settings_rows(ctx: Context, plan: Plan, table: TablePlan, statuses: dict[str, str], paper: dict, _: Values):
    """Table 7 from the settings this driver runs (the smoke mode's shrunk ones in smoke)."""
    presets, smoke = ctx.presets, ctx.presets["smoke"]
    columns = ["Local Epochs", "Clients (sampled)", "Clients (total)", "Local Steps", "Global Rounds"]
    rows = []
    for row in presets["tables"][table.name]["rows"]:
        setting = presets["settings"][row["setting"]]
        args = {**setting["args"], **(smoke["args"] if ctx.smoke else {})}
        ours = {"Local Epochs": smoke["local_epochs"] if ctx.smoke else setting["local_epochs"],
                "Clients (sampled)": args["sample_clients"], "Clients (total)": args["num_clients"] or "all",
                "Local Steps": "Dynamic" if args.get("dynamic_local_step") else args["max_steps"],
                "Global Rounds": args["num_rounds"]}
        rows.append((row["row"], ours, paper.get(row["row"], {}), ""))
    return columns, rows, ["Ours: the settings in reproduce/presets.json that the training runs use."]


# ------------------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------------------

def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def fmt_published(value) -> str:
    """A published value exactly as the paper prints it (3.5375 stays 3.5375; JSON keeps its digits)."""
    return "-" if value is None else str(value)


def fmt_difference(diff: float | None) -> str:
    if diff is None:
        return ""
    if isinstance(diff, int):
        return f"{diff:+d}"
    return f"{diff:+.0f}" if abs(diff) >= 100 else f"{diff:+.2f}" if abs(diff) >= 0.01 else f"{diff:+.2g}"


def difference(ours, paper) -> float | None:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (ours, paper))
    return ours - paper if numeric else None


def to_markdown(table: Table) -> str:
    with_status = any(status for *_, status in table.rows)
    published = any(paper for _, _, paper, _ in table.rows)  # Figure 6 and the figures have no numbers
    header = table.columns + (["status"] if with_status else [])
    lines = [f"# {table.title}" + (" (SMOKE)" if table.smoke else ""), "",
             "Each cell: ours / published (ours − published); `-` where there is no value." if published else
             "Each cell: ours; `-` where there is no value (the paper publishes no numbers here).", "",
             "| | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for label, ours, paper, status in table.rows:
        cells = []
        for column in table.columns:
            diff = fmt_difference(difference(ours.get(column), paper.get(column)))
            both = f"{fmt(ours.get(column))} / {fmt_published(paper.get(column))}" + (f" ({diff})" if diff else "")
            cells.append(both if published else fmt(ours.get(column)))
        lines.append(f"| {label} | " + " | ".join(cells + ([status] if with_status else [])) + " |")
    lines += [""] + [f"- {note}" for note in table.notes]
    if table.paper_notes:
        lines += ["", "About the paper's table:"] + [f"- {note}" for note in table.paper_notes]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["mode", "row"] + [f"{c}{s}" for c in table.columns for s in ("", " (paper)", " (diff)")]
                    + ["status"])
    for label, ours, paper, status in table.rows:
        cells = []
        for column in table.columns:
            diff = difference(ours.get(column), paper.get(column))
            cells += [fmt(ours.get(column)), fmt_published(paper.get(column)), "" if diff is None else f"{diff:.6g}"]
        writer.writerow(["smoke" if table.smoke else "paper", label, *cells, status])
    return buffer.getvalue()


def write_table(table: Table, results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(results / f"{table.name}.md", to_markdown(table))
    write_text_atomic(results / f"{table.name}.csv", to_csv(table))


def plot_sweep(table: Table, spec: dict, plan: Plan, results: Path) -> None:
    """Figure 6: the metric against the swept DP parameter, with the runs that sweep nothing as reference lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, column = spec["plot"]["x"], table.columns[0]
    series: dict[str, list[tuple[float, float]]] = {}  # one line per swept series (the paper's, an assumed C)
    lines = []
    for row, (label, ours, _, _) in zip(spec["rows"], table.rows):
        x = row.get("args", {}).get(x_key)
        if x is None:
            lines.append((x, label, ours.get(column)))
        elif ours.get(column) is not None:
            series.setdefault(row.get("series", "FedAvg + DP"), []).append((x, ours[column]))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    swept = [point for points in series.values() for point in points]
    for i, (name, points) in enumerate(series.items()):
        ax.plot([x for x, _ in points], [v for _, v in points], marker="o", color=f"C{i}", label=name)
    for i, (_, label, value) in enumerate(lines):
        if value is not None:
            ax.axhline(value, linestyle="--", color=f"C{i + len(series)}", label=label)
    ax.set_xscale("log")
    ax.set(xlabel=spec["plot"]["x_label"], ylabel=column + (" (smoke stand-in)" if table.smoke else ""))
    ax.set_title(textwrap.fill(table.title, 70), fontsize=8)
    if not swept and not any(v is not None for *_, v in lines):
        ax.text(0.5, 0.5, "no values yet\n(not run, or no judge)", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results / f"{table.name}.png", dpi=100)
    plt.close(fig)


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
