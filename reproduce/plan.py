"""What to run for each table: presets.json turned into training runs, evaluation targets and table cells.

A table is rows x columns in the paper's order. A cell is the value of one metric on one or more models: the
final checkpoint of a run (or of one language group of a run), or the base model alone; cells over several
models (the paper's two random local clients) report their mean, and `mean_of` columns are the paper's
Average formulas over other columns. Runs shared by several cells or tables (the same command) train once.
Nothing here loads a model or a dataset: the local baselines' clients are chosen when their step runs.
"""
from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESETS = Path(__file__).with_name("presets.json")
# A local baseline trains one client for the setting's local epochs: the federated schedule does not apply.
FEDERATED_ONLY = ("num_rounds", "sample_clients", "max_steps", "dynamic_local_step")


def load_presets(path: Path = PRESETS) -> dict:
    presets = json.loads(Path(path).read_text(encoding="utf-8"))
    for name, table in presets["tables"].items():
        named = [table.get("setting")] + [c.get("setting") for c in table.get("columns", [])] + \
                [r.get("setting") for r in table.get("rows", [])]
        unknown = [s for s in named if s and s not in presets["settings"]]
        if unknown:
            raise SystemExit(f"{path}: table {name} names unknown setting(s) {', '.join(unknown)}")
    return presets


def with_script_settings(presets: dict) -> dict:
    """The presets with the released scripts' settings where they differ from the paper's text (presets
    "scripts": models, setting arguments, and the local baselines' schedule); "settings_from" says which."""
    scripts = presets["scripts"]
    settings = {name: {**setting, **{k: v for k, v in scripts["settings"].get(name, {}).items() if k != "args"},
                       "args": {**setting["args"], **scripts["settings"].get(name, {}).get("args", {})}}
                for name, setting in presets["settings"].items()}
    return {**presets, "models": {**presets["models"], **scripts["models"]}, "settings": settings,
            "settings_from": "scripts"}


def select_tables(presets: dict, only: list[str]) -> list[str]:
    names = list(presets["tables"])
    unknown = [n for n in only if n not in names]
    if unknown:
        raise SystemExit(f"--only {', '.join(unknown)}: no such table; choose from {', '.join(names)}")
    return [n for n in names if n in only] if only else names


# ------------------------------------------------------------------------------------------------------------
# Runs and the models they produce
# ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LocalChoice:
    """Which client a local baseline trains, chosen on the built dataset when the run starts: a random client of
    a language (Table 2), draw `value` of `count` distinct random clients (Tables 3-5), or the client nearest to a
    sample count (Table 8's local(813) and local(1702))."""
    how: str  # "language", "random" or "size"
    value: str | int
    count: int = 1
    seed: int = 0

    def label(self) -> str:
        if self.how == "random":
            return f"random{self.value + 1}of{self.count}"
        return f"{self.how}-{str(self.value).replace(' ', '_')}"


@dataclass
class Run:
    name: str
    entry: str | None  # None: nothing to train (the base model alone)
    args: dict
    task: str  # "sft" or "preference"
    local: LocalChoice | None = None

    @property
    def num_rounds(self) -> int:
        return int(self.args.get("local_epochs") or self.args.get("num_rounds", 0))


@dataclass(frozen=True)
class Model:
    """An evaluation target: a run's final adapter, one language group's adapter, or the base model."""
    run: str
    group: str | None = None  # --client_groups runs: the group's subfolder name

    @property
    def key(self) -> str:
        return self.run + (f"/{self.group}" if self.group else "")


@dataclass
class Cell:
    metric: str | None = None
    models: list[Model] = field(default_factory=list)  # the value is the mean over these
    mean_of: list[str] | None = None  # a derived column: the mean of these columns of the same row
    why_empty: str | None = None


@dataclass
class TablePlan:
    name: str
    kind: str  # "runs", "stats", "analysis" or "settings"
    columns: list[str]
    rows: list[tuple[str, dict[str, Cell]]]


@dataclass
class Plan:
    runs: dict[str, Run] = field(default_factory=dict)
    tables: dict[str, TablePlan] = field(default_factory=dict)
    evaluations: dict[Model, set[str]] = field(default_factory=dict)  # model -> metrics asked of it
    stats: list[tuple[str, str]] = field(default_factory=list)  # (dataset, task) for Table 1
    analyses: list[tuple[str, str]] = field(default_factory=list)  # (dataset, task) for Section 3.3's figures


def task_of(setting: dict) -> str:
    return "preference" if setting["entry"] == "main_dpo.py" else "sft"


def make_run(presets: dict, setting_name: str, spec: dict, smoke: bool, local_files: dict | None = None) -> Run:
    """The run of one row (or column) spec under a setting: its command-line arguments and a stable name.
    `local_files` maps a dataset to the authors' released file the run reads instead of building it."""
    setting = presets["settings"][setting_name]
    task = task_of(setting)
    args = {**setting["args"], "model_name_or_path": presets["models"][setting["model"]], **spec.get("args", {})}
    if smoke:
        args.update(presets["smoke"]["args"], model_name_or_path=presets["smoke"]["model"],
                    dataset=presets["smoke"]["datasets"][task])
    elif args["dataset"] in (local_files or {}):
        args["local_data_dir"] = local_files[args["dataset"]]
    if spec.get("base"):
        args = {k: args[k] for k in ("model_name_or_path", "dataset", "template")}
        return Run(f"base__{_slug(args['model_name_or_path'])}__{args['dataset']}", None, args, task)
    choice = local_choice(spec["local"], presets["local_seed"]) if "local" in spec else None
    if choice:
        for key in FEDERATED_ONLY:
            args.pop(key, None)
        if "local_schedule" in setting and not smoke:  # the released scripts: rounds x steps, not epochs
            args.update(setting["local_schedule"])
        else:
            args["local_epochs"] = presets["smoke"]["local_epochs"] if smoke else setting["local_epochs"]
        args.update(presets["smoke"]["local_args"] if smoke else {})
        args["fed_alg"] = f"local{{{choice.label()}}}"  # the client index is resolved when the run starts
    else:
        args["fed_alg"] = spec["fed_alg"]
    if spec.get("groups"):
        args["client_groups"] = spec["groups"]
    args = {k: v for k, v in args.items() if v is not None}
    digest = hashlib.sha1(json.dumps([setting["entry"], args], sort_keys=True).encode()).hexdigest()[:8]
    label = choice.label() if choice else "-".join([args["fed_alg"], *([spec["groups"]] if spec.get("groups") else []),
                                                    *(f"{k}{v}" for k, v in spec.get("args", {}).items()
                                                      if k.startswith("dp_"))])
    return Run(f"{args['dataset']}__{label}__{digest}", setting["entry"], args, task, choice)


def local_choice(spec: dict, seed: int) -> LocalChoice:
    if "language" in spec:
        return LocalChoice("language", spec["language"], seed=seed)
    if "size" in spec:
        return LocalChoice("size", int(spec["size"]), seed=seed)
    return LocalChoice("random", int(spec.get("draw", 0)), int(spec["random"]), seed)


def _slug(text: str) -> str:
    return text.rstrip("/").split("/")[-1]


def group_folder(mode: str, language: str) -> str | None:
    """The subfolder of a --client_groups run that holds the model of `language`'s group (None: in no group)."""
    from data.groups import LANGUAGE_FAMILIES

    if mode == "same_language":
        name = language
    else:
        name = next((family for family, members in LANGUAGE_FAMILIES.items() if language in members), None)
    return None if name is None else "group-" + name.replace(" ", "_")


# ------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------

def expand_rows(table: dict, presets: dict) -> list[dict]:
    """The table's rows, with {"methods": true} replaced by one row per federated method, in the paper's order."""
    rows = []
    for row in table["rows"]:
        rows += [{"row": label, "fed_alg": alg} for label, alg in presets["methods"].items()] \
            if row.get("methods") else [row]
    return rows


def cell_specs(row: dict, column: dict) -> list[dict]:
    """The run spec(s) of one cell: the row's, refined by the column's (Table 8 names its runs per column), one
    per client for the paper's mean over random local clients, the column's language for Table 6's Local row."""
    spec = {k: v for k, v in {**row, **column.get("run", {})}.items() if k not in ("row", "title", "series", "smoke")}
    local = spec.get("local")
    if local and local.get("language") == "column":
        spec["local"] = {"language": column["language"]}
    elif local and "random" in local:
        return [{**spec, "local": {**local, "draw": i}} for i in range(local["random"])]
    return [spec]


def plan_cell(presets: dict, table: dict, row: dict, column: dict, smoke: bool, result: Plan,
              local_files: dict | None = None) -> Cell:
    if "mean_of" in column:
        return Cell(mean_of=column["mean_of"])
    cell = Cell(metric=column["metric"])
    if smoke and row.get("smoke") is False:
        cell.why_empty = "not run in smoke mode (paper scale only)"
        return cell
    setting = column.get("setting") or table["setting"]
    for spec in cell_specs(row, column):
        run = make_run(presets, setting, spec, smoke, local_files)
        run = result.runs.setdefault(run.name, run)
        group = group_folder(spec["groups"], column["language"]) if spec.get("groups") else None
        if spec.get("groups") and group is None:
            cell.why_empty = f"{column['language']} is in no language group"
            continue
        model = Model(run.name, group)
        cell.models.append(model)
        result.evaluations.setdefault(model, set()).add(column["metric"])
    return cell


def plan(presets: dict, tables: list[str], smoke: bool, local_files: dict | None = None) -> Plan:
    """Every run, evaluation and cell the chosen tables need; a run several cells share appears once."""
    result = Plan()
    for name in tables:
        table = presets["tables"][name]
        if table["kind"] in ("stats", "analysis"):  # one step per dataset: Table 1's statistics, or its figures
            steps = result.stats if table["kind"] == "stats" else result.analyses
            for column in table["columns"]:
                if stats_dataset(presets, column, smoke) not in steps:
                    steps.append(stats_dataset(presets, column, smoke))
            result.tables[name] = TablePlan(name, table["kind"], [c["title"] for c in table["columns"]], [])
        elif table["kind"] == "settings":
            result.tables[name] = TablePlan(name, "settings", [], [])
        else:
            rows = [(row["row"], {c["title"]: plan_cell(presets, table, row, c, smoke, result, local_files)
                                  for c in table["columns"]}) for row in expand_rows(table, presets)]
            result.tables[name] = TablePlan(name, "runs", [c["title"] for c in table["columns"]], rows)
    return result


def released_files(folder: str) -> dict[str, str]:
    """Dataset -> the authors' released file for it (its name in the release, or in the authors' scripts), found
    anywhere under `folder`: aya_38c_25k.json, chatbotIT_237c_6k.json, wildchat_100c_53k.json, wildchat_50c.json,
    chatbotPA_747c_10k.json or chatbot_by_client-10k.json. A dataset without a file there is built as usual."""
    from data.fedllm_bench import RECIPES

    root = Path(folder)
    if not root.is_dir():
        raise SystemExit(f"--local_data_dir {folder} is not a folder: give the folder of the authors' released files.")
    found, names = {}, []
    for dataset, recipe in RECIPES.items():
        if not recipe.released:
            continue
        names += [recipe.released_file, *recipe.released_aliases]
        hits = sorted(p for name in (recipe.released_file, *recipe.released_aliases) for p in root.rglob(name))
        if len(hits) > 1:
            raise SystemExit(f"--local_data_dir {folder}: {len(hits)} files for {dataset} "
                             f"({', '.join(map(str, hits))}); keep one.")
        if hits:
            found[dataset] = str(hits[0].resolve())
    if not found:
        raise SystemExit(f"--local_data_dir {folder} holds none of the released files ({', '.join(names)}).")
    return found


def stats_dataset(presets: dict, column: dict, smoke: bool) -> tuple[str, str]:
    task = column.get("task", "sft")
    return (presets["smoke"]["datasets"][task] if smoke else column["dataset"]), task


# ------------------------------------------------------------------------------------------------------------
# Can the repository run it?
# ------------------------------------------------------------------------------------------------------------

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


def missing_piece(run: Run, flags_of=entry_flags) -> str | None:
    if run.entry is None:
        return None
    flags = flags_of(run.entry)
    if flags is None:
        return f"{run.entry} is not in the repository yet"
    unknown = sorted(k for k in run.args if k not in flags)
    return f"{run.entry} has no {', '.join('--' + k for k in unknown)} yet" if unknown else None
