"""The reproduction driver (python -m reproduce, run_all.sh): the paper's numbers and layouts, the planned runs,
client choice, skip/resume, table assembly; slow: the full smoke run end to end."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from reproduce import plan as rp
from reproduce import steps as rs
from reproduce import tables as rt

ROOT = Path(__file__).resolve().parent.parent
SHARED_PAPER = ROOT.parent / "shared" / "paper" / "fedllm_bench_tables.json"
PAPER = rt.load_paper()
PRESETS = rp.load_presets()


class _AnySet(set):
    def __contains__(self, item):
        return True


def everything(entry):
    """A flags_of stub: the entry exists and accepts every flag."""
    return _AnySet()


def ctx_for(tmp_path, smoke=False, flags_of=everything, **kw):
    return rs.Context(rp.load_presets(), tmp_path / "results", smoke, python="PY", flags_of=flags_of, **kw)


def dry_run(ctx, tables):
    work = rp.plan(ctx.presets, tables, ctx.smoke)
    lines = []
    rs.execute(rs.steps_for(ctx, work), ctx, dry_run=True, echo=lines.append)
    return work, [line for line in lines if " main_sft.py " in line or " main_dpo.py " in line]


def flag(command: str, name: str) -> str | None:
    parts = command.split()
    return parts[parts.index(f"--{name}") + 1] if f"--{name}" in parts else None


# ------------------------------------------------------------------------------------------------------------
# The published numbers and the paper's layouts
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not SHARED_PAPER.exists(), reason="../shared/paper is not beside this checkout")
def test_paper_results_equal_the_shared_transcription_cell_by_cell():
    shared = json.loads(SHARED_PAPER.read_text())["tables"]
    assert list(PAPER) == list(shared)
    for name, table in shared.items():
        ours = PAPER[name]
        assert ours["columns"] == table["columns"] and [r["row"] for r in ours["rows"]] == [r["row"] for r in table["rows"]]
        for theirs, mine in zip(table["rows"], ours["rows"]):
            assert list(mine["values"]) == list(theirs["values"]), (name, theirs["row"])
            for column, value in theirs["values"].items():
                cell = mine["values"][column]
                assert cell["value"] == value and type(cell["value"]) is type(value), (name, theirs["row"], column)
                assert cell["source"] == f"FedLLM-Bench, Table {name.removeprefix('table')}"


def test_every_table_has_the_papers_rows_and_columns_in_its_order():
    work = rp.plan(PRESETS, list(PRESETS["tables"]), smoke=False)
    for name, published in PAPER.items():
        rows = [r["row"] for r in published["rows"]]
        table = PRESETS["tables"][name]
        if table["kind"] == "stats":
            assert [c["title"] for c in table["columns"]] == published["columns"]
            assert ["Characteristic", "Applied Task", *rt.STATS_ROWS] == rows
        elif table["kind"] == "settings":
            assert [r["row"] for r in table["rows"]] == rows
        else:
            assert [label for label, _ in work.tables[name].rows] == rows, name
            assert work.tables[name].columns == published["columns"], name
    assert list(PRESETS["methods"]) == ["FedAvg", "FedProx", "SCAFFOLD", "FedAvgM", "FedYogi", "FedAdagrad", "FedAdam"]
    assert "figure6" in PRESETS["tables"] and "figure6" not in PAPER  # a plot: no published numbers


# Four published Averages are off the mean of their own (rounded) cells by more than rounding: the paper probably
# averaged over all judged questions, unparseable judgments left out. Measured: 4.6125 vs 4.62, 4.9125 vs 4.92,
# 4.875 vs 4.86, 5.2929 vs 5.30 (docs/RUN_ALL.md).
PAPER_AVERAGE_QUIRKS = {("table2", "Local Training (es)"), ("table2", "FedProx"), ("table2", "FedAvgM"),
                        ("table6", "FedSimLang")}


def test_average_formulas_reproduce_the_papers_own_average_cells():
    checked = 0
    for name, table in PRESETS["tables"].items():
        for column in (c for c in table.get("columns", []) if "mean_of" in c):
            for row in PAPER[name]["rows"]:
                values = {c: v["value"] for c, v in row["values"].items()}
                recomputed = sum(values[c] for c in column["mean_of"]) / len(column["mean_of"])
                tolerance = 0.016 if (name, row["row"]) in PAPER_AVERAGE_QUIRKS else 0.0051  # 2-decimal rounding
                assert abs(recomputed - values[column["title"]]) <= tolerance, (name, row["row"], recomputed)
                checked += 1
    assert checked == 15 + 8 + 9 + 4  # Tables 2, 3, 5 and 6: every row's Average
    assert {tuple(c["mean_of"]) for t in ("table3", "table5") for c in PRESETS["tables"][t]["columns"]
            if "mean_of" in c} == {("MT-Bench-1", "Vicuna", "Ref-GPT4"), ("MT-Bench-1", "Vicuna")}


# ------------------------------------------------------------------------------------------------------------
# The paper's runs
# ------------------------------------------------------------------------------------------------------------

def test_dry_run_plans_exactly_the_papers_runs(tmp_path):
    ctx = ctx_for(tmp_path, judge_base_url="http://judge/v1")
    expected = {"table2": 15, "table3": 9, "table4": 18, "table5": 9, "table6": 2 + 7 + 1, "table8": 7,
                "figure6": 7 + 4}
    for table, count in expected.items():
        work, train = dry_run(ctx, [table])
        assert len(train) == count, (table, len(train))
        for command in train:
            local = flag(command, "local_epochs")
            assert (local is not None) == flag(command, "fed_alg").startswith("local{"), command
            if local:  # one client alone for the paper's local epochs, not rounds x steps
                assert flag(command, "num_rounds") is None and flag(command, "max_steps") is None
    everything_once, train = dry_run(ctx, list(PRESETS["tables"]))
    assert len(train) == 15 + 9 + 18 + 9 + 2 + 7 + 8  # Table 6 reuses Table 2's runs, Figure 6 Table 8's locals

    epochs = {"fed-aya": "5", "fed-chatbotit": "10", "fed-wildchat": "5", "fed-wildchat-mt": "20",
              "fed-chatbotpa": "10"}
    for command in train:
        dataset = flag(command, "dataset")
        if flag(command, "local_epochs"):
            assert flag(command, "local_epochs") == epochs[dataset], command
        elif dataset == "fed-wildchat-mt":
            assert flag(command, "num_rounds") == "50" and flag(command, "sample_clients") == "3"
        if dataset == "fed-chatbotpa":
            assert " main_dpo.py " in command and flag(command, "peft_lora_r") == "16"
            assert flag(command, "model_name_or_path") == "chavinlo/alpaca-native"

    _, table8 = dry_run(ctx, ["table8"])
    assert sorted(flag(c, "dp_sigma") for c in table8 if flag(c, "dp_sigma")) == ["0.001", "0.01", "0.1", "1.0"]
    assert sorted(flag(c, "fed_alg") for c in table8) == ["fedavg", "feddp", "feddp", "feddp", "feddp",
                                                          "local{size-1702}", "local{size-813}"]
    assert all(flag(c, "batch_size") == "1" and flag(c, "dp_delta") == "0.0001" for c in table8)
    assert all(flag(c, "max_steps") == "10" for c in table8 if not flag(c, "local_epochs"))
    _, figure6 = dry_run(ctx, ["figure6"])
    assert sorted(flag(c, "dp_epsilon") for c in figure6 if flag(c, "dp_epsilon")) == \
        ["0.001", "0.001", "0.01", "0.01", "0.1", "0.1", "1.0", "1.0"]
    assert sorted(flag(c, "dp_clip") for c in figure6 if flag(c, "dp_clip")) == ["1373"] * 4
    assert not any(flag(c, "dp_sigma") for c in figure6)

    _, table6 = dry_run(ctx, ["table6"])
    groups = {flag(c, "client_groups"): flag(c, "dataset") for c in table6 if flag(c, "client_groups")}
    assert groups == {"same_language": "fed-aya", "similar_language": "fed-aya-similar"}
    # Table 6 reads no Telugu column: the same-language run trains 7 federations, not 8.
    assert [flag(c, "skip_groups") for c in table6 if flag(c, "client_groups")] == ["Telugu", None]


def test_the_assumed_clip_bound_puts_figure6s_epsilon_sweep_on_table8s_sigmas():
    from federated.privacy import paper_sigma

    wildchat = PRESETS["settings"]["fed-wildchat-dp"]["args"]
    rows = [r for r in PRESETS["tables"]["figure6"]["rows"] if "dp_clip" in r.get("args", {})]

    def sigma(row, clip):  # Fed-WildChat as the paper counts it: 52,703 samples over 100 clients, 5 per round
        return paper_sigma(row["args"]["dp_epsilon"], wildchat["dp_delta"], wildchat["learning_rate"], clip,
                           52703, 100, 5 / 100, wildchat["num_rounds"])
    assert [sigma(r, 1.0) for r in rows] == pytest.approx([7.28e-4, 7.28e-5, 7.28e-6, 7.28e-7], rel=1e-3)  # C = 1
    assert [sigma(r, r["args"]["dp_clip"]) for r in rows] == pytest.approx([1.0, 0.1, 0.01, 0.001], rel=1e-3)
    notes = " ".join(PRESETS["tables"]["figure6"]["notes"])
    assert "does not publish the clip bound C" in notes and "our assumption" in notes


def test_table6_local_row_is_table2s_diagonal_and_groups_pick_the_columns_language():
    work = rp.plan(PRESETS, ["table2", "table6"], smoke=False)
    table2 = dict(work.tables["table2"].rows)
    table6 = dict(work.tables["table6"].rows)
    for code in ("ar", "es", "en", "fr", "pt", "ru", "zh"):
        assert table6["Local"][code].models == table2[f"Local Training ({code})"][code].models
        assert table6["FedAvg"][code].models == table2["FedAvg"][code].models
    assert table6["FedSamLang"]["zh"].models[0].group == "group-Simplified_Chinese"
    same_family = {table6["FedSimLang"][c].models[0].group for c in ("es", "fr", "pt")}
    assert len(same_family) == 1 and same_family != {table6["FedSimLang"]["en"].models[0].group}
    assert len(table2["FedAvg"]["ar"].models) == 1 and len(dict(work.tables["table2"].rows)) == 15


def test_local_rows_average_two_random_clients_and_the_evaluations_cover_every_metric(tmp_path):
    work = rp.plan(PRESETS, ["table3"], smoke=False)
    local = dict(work.tables["table3"].rows)["Local Training"]
    assert [work.runs[m.run].local.label() for m in local["MT-Bench-1"].models] == ["random1of2", "random2of2"]
    ctx = ctx_for(tmp_path, judge_base_url="http://judge/v1")
    evaluate = [s.command() for s in rs.steps_for(ctx, work) if s.name.startswith("evaluate")]
    assert len(evaluate) == 18 and sum("--benchmarks humaneval mmlu " in c for c in evaluate) == 9
    assert sum("--benchmarks chatbot mtbench vicuna " in c for c in evaluate) == 9
    table5 = rs.steps_for(ctx, rp.plan(PRESETS, ["table5"], smoke=False))
    base = [s.command() for s in table5 if "--base_model chavinlo/alpaca-native" in s.command()]
    assert len(base) == 2 and any("advbench mmlu" in c for c in base)  # the Base Model row: no training


def test_clients_are_chosen_on_the_built_dataset():
    clients = tuple((f"c{i}", n, language) for i, (n, language) in
                    enumerate([(30, "English"), (813, "French"), (800, "English"), (1700, "French"), (5, None)]))
    first = rs.pick_client(rp.LocalChoice("random", 0, 2, seed=0), clients)[0]
    second = rs.pick_client(rp.LocalChoice("random", 1, 2, seed=0), clients)[0]
    assert first != second and first == rs.pick_client(rp.LocalChoice("random", 0, 2, seed=0), clients)[0]
    assert {rs.pick_client(rp.LocalChoice("language", "English", seed=s), clients)[0] for s in range(20)} == {0, 2}
    assert rs.pick_client(rp.LocalChoice("size", 813), clients) == (1, "the client with 813 samples")
    index, how = rs.pick_client(rp.LocalChoice("size", 1702), clients)
    assert index == 3 and "nearest to the paper's 1702" in how
    assert rs.pick_client(rp.LocalChoice("language", "Telugu"), clients)[0] is None
    assert rs.pick_client(rp.LocalChoice("random", 0, 9), clients)[0] is None


def test_the_local_client_is_resolved_into_the_command_and_recorded(tmp_path):
    ctx = ctx_for(tmp_path, smoke=True)
    work = rp.plan(ctx.presets, ["table8"], smoke=True)
    run = next(r for r in work.runs.values() if r.local is not None and r.local.value == 813)
    step = rs.train_step(ctx, run)
    assert step.before(step) is None
    sizes = [n for _, n, _ in rs.run_clients(run)]
    index = int(step.argv[step.argv.index("--fed_alg") + 1].removeprefix("local"))
    assert sizes[index] == max(sizes) < 813  # the stand-in has no 813-sample client: the nearest is the largest
    record = json.loads((ctx.runs_dir / run.name / rs.LOCAL_CLIENT).read_text())
    assert record["client"] == index and record["samples"] == sizes[index] and record["clients"] == 20


# ------------------------------------------------------------------------------------------------------------
# Smoke mode and execution
# ------------------------------------------------------------------------------------------------------------

def test_smoke_runs_every_row_of_every_table_on_the_stand_ins(tmp_path):
    work = rp.plan(PRESETS, list(PRESETS["tables"]), smoke=True)
    assert all(rp.missing_piece(r) is None for r in work.runs.values())  # the repository runs every row
    for name, table in work.tables.items():
        for label, cells in table.rows:
            paper_scale_only = "(assumed)" in label  # Figure 6's second sweep, at our assumed clip bound
            assert all((c.why_empty is not None) == paper_scale_only and (c.models or c.mean_of or paper_scale_only)
                       for c in cells.values()), (name, label)
    trained = [r for r in work.runs.values() if r.entry]
    assert all(r.args["model_name_or_path"] == "smollm2" and r.args["eval_after"] for r in trained)
    assert {r.args["dataset"] for r in trained} == {"fed-synthetic", "fed-synthetic-pref"}
    assert all(r.args["local_epochs"] == 1 for r in trained if r.local)
    ctx = ctx_for(tmp_path, smoke=True)
    steps = rs.steps_for(ctx, work)
    scores = [s for s in steps if s.name.startswith("score")]
    assert len(scores) == 1 and "--base_model smollm2" in scores[0].command()  # trained runs score themselves
    assert not any(s.name.startswith("evaluate") for s in steps)  # no judge: no judged evaluation


def test_finished_step_is_skipped_and_interrupted_run_resumes(tmp_path):
    ctx = ctx_for(tmp_path, smoke=True)
    marker = tmp_path / "marker"
    step = rs.Step("statistics x", [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('1')"], marker)
    rs.execute([step], ctx, echo=lambda _: None)
    assert step.status == "ran" and marker.exists()
    again = rs.Step(step.name, ["false"], marker)
    rs.execute([again], ctx, echo=lambda _: None)
    assert again.status == "done earlier"

    run = next(r for r in rp.plan(ctx.presets, ["table8"], True).runs.values() if r.local is None)
    out = ctx.runs_dir / run.name
    out.mkdir(parents=True)
    (out / "args.json").write_text("{}")  # an interrupted run: arguments written, no done marker
    train = rs.train_step(ctx, run)
    assert train.before(train) is None and train.argv[-1] == "--resume"
    failing = rs.Step(f"train {run.name}", [sys.executable, "-c", "raise SystemExit(3)"], out / rs.DONE, run=run.name)
    evaluation = rs.Step(f"evaluate {run.name}", ["true"], out / "x.json", run=run.name)
    rs.execute([failing, evaluation], ctx, echo=lambda _: None)
    assert failing.status.startswith("failed (exit 3")
    assert evaluation.status == "skipped: its training run did not finish"


def test_a_torn_json_output_is_redone_not_done_earlier(tmp_path):
    """A statistics file cut short (its writer killed mid-write) is no done marker: the step runs again, instead of
    every later call reporting it done and the tables failing on it."""
    ctx = ctx_for(tmp_path, smoke=True)
    output = tmp_path / "table1" / "fed-x.json"
    output.parent.mkdir(parents=True)
    output.write_text('{"samples": 1')
    write = f"import json; open({str(output)!r}, 'w').write(json.dumps({{'samples': 12}}))"
    step = rs.Step("statistics fed-x", [sys.executable, "-c", write], output)
    rs.execute([step], ctx, echo=lambda _: None)
    assert step.status == "ran" and json.loads(output.read_text()) == {"samples": 12}
    again = rs.Step(step.name, ["false"], output)
    rs.execute([again], ctx, echo=lambda _: None)
    assert again.status == "done earlier"


def test_jobs_run_trainings_side_by_side_and_evaluations_after_their_training(tmp_path):
    """--jobs 2: two trainings that can only finish together (each waits for the other's start file) both finish,
    so they ran at the same time; each evaluation starts after its own training's done marker; an evaluation of a
    failed training is skipped as in a sequential run."""
    ctx = ctx_for(tmp_path, smoke=True)

    def waiting_for(me: str, other: str, done: Path) -> list[str]:
        # Waits for the other's start file (up to 5 minutes: a loaded machine may start it late).
        code = (f"import pathlib, time; d = pathlib.Path({str(tmp_path)!r}); (d / {me!r}).touch()\n"
                f"deadline = time.monotonic() + 300\n"
                f"while not (d / {other!r}).exists():\n"
                f"    if time.monotonic() > deadline: raise SystemExit('ran alone')\n    time.sleep(0.05)\n"
                f"pathlib.Path({str(done)!r}).touch()")
        return [sys.executable, "-c", code]

    steps = []
    for me, other in (("a", "b"), ("b", "a")):
        done = ctx.runs_dir / me / rs.DONE
        done.parent.mkdir(parents=True)
        steps.append(rs.Step(f"train {me}", waiting_for(me, other, done), done, run=me))
        check = f"import pathlib; assert pathlib.Path({str(done)!r}).exists(); pathlib.Path({str(tmp_path / (me + '.eval'))!r}).touch()"
        steps.append(rs.Step(f"evaluate {me}", [sys.executable, "-c", check], tmp_path / f"{me}.eval", run=me))
    failed = ctx.runs_dir / "c" / rs.DONE
    steps += [rs.Step("train c", [sys.executable, "-c", "raise SystemExit(2)"], failed, run="c"),
              rs.Step("evaluate c", ["true"], tmp_path / "c.eval", run="c")]
    rs.execute(steps, ctx, echo=lambda _: None, jobs=2)
    assert [s.status for s in steps] == ["ran"] * 4 + ["failed (exit 2; see " + str(ctx.results / "logs" / "train_c.log") + ")",
                                                     "skipped: its training run did not finish"]


def test_missing_entry_or_flag_is_skipped_with_a_reason(tmp_path):
    no_dpo = ctx_for(tmp_path, flags_of=lambda entry: None if entry == "main_dpo.py" else everything(entry))
    steps = rs.steps_for(no_dpo, rp.plan(PRESETS, ["table5"], False))
    rs.execute(steps, no_dpo, dry_run=True, echo=lambda _: None)
    assert all(s.status.startswith("skipped: main_dpo.py is not in the repository") for s in steps
               if s.name.startswith("train"))
    assert rp.missing_piece(rp.Run("x", "main_sft.py", {"fed_alg": "fedavg", "no_such_flag": 1}, "sft")) == \
        "main_sft.py has no --no_such_flag yet"


# ------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------

def write_score(ctx, model: rp.Model, file: str, key: str, value: float):
    folder = ctx.runs_dir / model.key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / file).write_text(json.dumps({key: value}))


def test_cells_average_their_runs_and_print_the_published_value_and_difference(tmp_path):
    ctx = ctx_for(tmp_path, smoke=True)
    work = rp.plan(ctx.presets, ["table3"], smoke=True)
    rows = dict(work.tables["table3"].rows)
    first, second = rows["Local Training"]["MT-Bench-1"].models
    write_score(ctx, first, "eval_exact_match.json", "accuracy", 0.25)
    write_score(ctx, second, "eval_exact_match.json", "accuracy", 0.50)
    (ctx.runs_dir / first.run / rs.LOCAL_CLIENT).write_text(json.dumps(
        {"client": 7, "client_id": "client_7", "samples": 40, "chosen": "draw 1 of 2 distinct random clients, seed 0"}))
    table = rt.assemble(ctx, work, "table3", {}, PAPER, rt.Values.load(ctx, work))
    local = next(ours for label, ours, _, _ in table.rows if label == "Local Training")
    assert local["MT-Bench-1"] == pytest.approx(37.5) and local["Average"] == pytest.approx(37.5)
    fedavg = next(ours for label, ours, _, _ in table.rows if label == "FedAvg")
    assert fedavg["MT-Bench-1"] is None and fedavg["Average"] is None  # not trained yet: no value, no average
    markdown = rt.to_markdown(table)
    assert "| Local Training | 37.5 / 3.73 (+33.77) |" in markdown
    assert "| FedAvg | - / 4.3 |" in markdown and "SMOKE RUN" in markdown
    assert "Local Training: mean of client 7 (id client_7, 40 samples" in markdown
    assert "Average = mean of MT-Bench-1, Vicuna, Ref-GPT4" in markdown
    rows_csv = list(csv.DictReader(rt.to_csv(table).splitlines()))
    assert rows_csv[0]["MT-Bench-1 (paper)"] == "3.73" and rows_csv[0]["MT-Bench-1 (diff)"] == "33.77"


def test_table8_keeps_the_papers_single_row_layout_and_figure6_is_plotted(tmp_path):
    ctx = ctx_for(tmp_path, smoke=True)
    work = rp.plan(ctx.presets, ["table8", "figure6"], smoke=True)
    for label, cells in work.tables["figure6"].rows:
        for model in cells["MT-Bench"].models:  # the assumed-C rows plan no model in smoke
            write_score(ctx, model, "eval_exact_match.json", "accuracy", 0.1)
    values = rt.Values.load(ctx, work)
    table8 = rt.assemble(ctx, work, "table8", {}, PAPER, values)
    assert [label for label, *_ in table8.rows] == ["MT-Bench"]
    assert table8.columns == ["local(813)", "local(1702)", "FedAvg", "FedDP-1e-3", "FedDP-1e-2", "FedDP-0.1", "FedDP-1"]
    ours, paper = table8.rows[0][1], table8.rows[0][2]
    assert ours["local(813)"] == pytest.approx(10) and paper["FedDP-1"] == 1.6875
    # Published values print as published: 3.5375 and 4.5375, not .4g's 3.538 and 4.537.
    assert "/ 3.5375 (" in rt.to_markdown(table8) and "/ 4.5375" in rt.to_markdown(table8)
    assert "3.5375" in rt.to_csv(table8).splitlines()[1].split(",")
    assert ours["FedDP-1e-3"] is None  # the sigma runs are not Figure 6's epsilon runs
    figure6 = rt.assemble(ctx, work, "figure6", {}, PAPER, values)
    assert "no published value" in " ".join(figure6.notes)
    rt.plot_sweep(figure6, ctx.presets["tables"]["figure6"], work, tmp_path)
    assert (tmp_path / "figure6.png").stat().st_size > 1000


def test_table1_reads_the_statistics_in_the_papers_layout(tmp_path):
    ctx = ctx_for(tmp_path)
    stats = ctx.results / "table1"
    stats.mkdir(parents=True)
    (stats / "fed-aya.json").write_text(json.dumps({
        "clients": 38, "samples": 25500, "per_client": [671.0, 810.0], "tokenizer": "llama",
        "instruction_length": {"pooled": [1.0, 1.0], "across_clients": [120.0, 200.0]},
        "response_length": {"across_clients": [225.0, 411.0]}, "quality": None}))
    work = rp.plan(ctx.presets, ["table1"], smoke=False)
    table = rt.assemble(ctx, work, "table1", {"statistics fed-aya": "ran"}, PAPER, rt.Values.load(ctx, work))
    rows = {label: (ours, paper) for label, ours, paper, _ in table.rows}
    assert rows["# Samples (Total)"][0]["Fed-Aya"] == 25500 and rows["# Samples (Total)"][1]["Fed-Aya"] == 25513
    assert rows["L. Instruction (Client) mean"][0]["Fed-Aya"] == 120.0  # across clients, as the paper computes it
    assert rows["Data Quality (Client) mean"][0]["Fed-Aya"] is None
    assert rows["# Clients (Total)"][0]["Fed-ChatbotIT"] is None and rows["Applied Task"][0]["Fed-ChatbotPA"] == "PA"
    assert "| # Samples (Total) | 25500 / 25513 (-13) | - / 6166 |" in rt.to_markdown(table)


def test_losses_are_plotted_per_run(tmp_path):
    ctx = ctx_for(tmp_path, smoke=True)
    run_dir = ctx.runs_dir / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"round": 1, "client_loss": {"0": 2.0, "3": 1.0}}\n'
                                           '{"round": 2, "client_loss": {"1": 1.0}}\n')
    assert rt.round_losses(run_dir) == [1.5, 1.0]
    rt.plot_losses({"r": None}, ctx)
    assert (ctx.results / "plots" / "loss_r.png").exists()


@pytest.mark.slow
def test_full_smoke_run_end_to_end(tmp_path, tiny_model_dir):
    """bash run_all.sh --smoke --jobs 2: every row of every table from real CPU runs, two at a time; a rerun
    skips everything. The runs train the tiny random Llama instead of SmolLM2: what is tested here is that every
    table is planned, trained, scored and assembled end to end (38 trainings; with SmolLM2 they took 8.6 of the
    suite's 20 minutes), and the entry scripts on SmolLM2 itself are tested in test_sft_e2e and test_dpo."""
    presets = json.loads(rp.PRESETS.read_text())
    presets["smoke"]["model"] = tiny_model_dir
    (tmp_path / "presets.json").write_text(json.dumps(presets))
    results = tmp_path / "smoke"
    command = ["bash", str(ROOT / "run_all.sh"), "--smoke", "--jobs", "2", "--results_dir", str(results),
               "--presets", str(tmp_path / "presets.json")]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for name, published in PAPER.items():
        rows = list(csv.DictReader((results / f"{name}.csv").open()))
        assert [r["row"] for r in rows] == [r["row"] for r in published["rows"]], name
        for row in rows:
            assert row["mode"] == "smoke"
            ours = [row[c] for c in published["columns"]]
            assert all(value not in ("", "-") for value in ours), (name, row)
    assert "SMOKE RUN" in (results / "table2.md").read_text()
    assert (results / "figure6.png").exists() and (results / "figure6.md").exists()
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "[ran]" not in second.stdout and "[done earlier]" in second.stdout


def test_language_group_models_get_distinct_evaluation_ids():
    from evaluation.models import model_id_for

    same = model_id_for("/r/runs/aya__fedavg-same_language/group-English/checkpoint-2", "base")
    similar = model_id_for("/r/runs/other__fedavg-same_language/group-English/checkpoint-2", "base")
    assert same == "aya__fedavg-same_language_group-English_checkpoint-2" and same != similar
    assert model_id_for("/r/runs/aya__fedavg/checkpoint-200", "base") == "aya__fedavg_checkpoint-200"


# ------------------------------------------------------------------------------------------------------------
# The authors' released files
# ------------------------------------------------------------------------------------------------------------

def released_folder(tmp_path) -> Path:
    """The authors' layout (data/<dataset>/...): a small file under each released name, Fed-Aya's from the real
    Ref-GPT4 Aya items (one client per language, no language labels)."""
    aya = json.loads((ROOT.parent / "shared" / "eval_data" / "ref_gpt4" / "aya_testset.json").read_text())
    sft = {f"user{c}": [{"instruction": f"q{c}.{i}", "response": "an answer"} for i in range(5)] for c in range(3)}
    files = {"Fed-Aya/aya_38c_25k.json": {f"annotator-{k}": [{"instruction": r["instruction"],
                                                               "response": r["reference"]} for r in rows]
                                          for k, rows in aya.items()},
             "Fed-ChatbotIT/chatbotIT_237c_6k.json": sft, "Fed-WildChat/single_turn/wildchat_100c_53k.json": sft,
             "Fed-WildChat/multi_turn/wildchat_50c.json": {"u": [{"conversations": [
                 {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]},
             "Fed-ChatbotPA/chatbot_by_client-10k.json": {"u": [{"prompt": "p", "chosen": "a", "rejected": "b"}]}}
    for name, content in files.items():
        path = tmp_path / "released" / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return tmp_path / "released"


@pytest.mark.skipif(not (ROOT.parent / "shared" / "eval_data").is_dir(), reason="../shared/eval_data is not there")
def test_local_data_dir_maps_each_tables_dataset_to_its_released_file(tmp_path, capsys):
    pytest.importorskip("py3langid")
    from reproduce.__main__ import main

    folder = released_folder(tmp_path)
    files = rp.released_files(str(folder))
    assert {d: Path(p).name for d, p in files.items()} == {
        "fed-aya": "aya_38c_25k.json", "fed-chatbotit": "chatbotIT_237c_6k.json",
        "fed-wildchat": "wildchat_100c_53k.json", "fed-wildchat-mt": "wildchat_50c.json",
        "fed-chatbotpa": "chatbot_by_client-10k.json"}
    assert main(["--local_data_dir", str(folder), "--dry-run", "--only", "table1,table2,table4,table5,table6",
                 "--results_dir", str(tmp_path / "results")]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines()
                if " main_sft.py " in line or " main_dpo.py " in line or " -m data.stats " in line]
    for command in commands:
        dataset = flag(command, "dataset")
        expected = files.get(dataset)  # fed-aya-similar has no released file: built from its source
        assert flag(command, "local_data_dir") == expected, command
    assert {flag(c, "dataset") for c in commands} == set(files) | {"fed-aya-similar"}
    # Table 2's per-language local baselines choose their client on the released file's recovered languages.
    work = rp.plan(PRESETS, ["table2"], smoke=False, local_files=files)
    run = next(r for r in work.runs.values() if r.local and r.local.value == "Telugu")
    assert rs.pick_client(run.local, rs.run_clients(run))[0] == list(json.loads(
        Path(files["fed-aya"]).read_text())).index("annotator-Telugu")


def test_local_data_dir_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="is not a folder"):
        rp.released_files(str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="holds none of the released files .*aya_38c_25k.json"):
        rp.released_files(str(tmp_path))
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "wildchat_50c.json").write_text("{}")
    with pytest.raises(SystemExit, match="2 files for fed-wildchat-mt"):
        rp.released_files(str(tmp_path))


def test_section_3_3_figures_are_a_target_beside_table1(tmp_path):
    ctx = ctx_for(tmp_path, local_files={"fed-aya": "/data/aya_38c_25k.json"})
    work = rp.plan(ctx.presets, ["table1", "analysis"], smoke=False, local_files=ctx.local_files)
    figures = {s.name: s for s in rs.steps_for(ctx, work) if s.name.startswith("figures")}
    assert list(figures) == [f"figures {d}" for d in ("fed-aya", "fed-chatbotit", "fed-wildchat", "fed-chatbotpa")]
    aya = figures["figures fed-aya"].command()
    assert " -m data.analyze --dataset fed-aya " in aya and flag(aya, "local_data_dir") == "/data/aya_38c_25k.json"
    assert flag(aya, "quality_model") == "meta-llama/Llama-2-7b-hf" and flag(aya, "out").endswith("analysis/fed-aya")
    assert flag(figures["figures fed-chatbotit"].command(), "local_data_dir") is None
    done = ctx.results / "analysis" / "fed-aya" / "figures.json"
    assert figures["figures fed-aya"].done == done
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"figures": ["fig1a_language.png", "fig5_quantity.png"]}))
    table = rt.assemble(ctx, work, "analysis", {"figures fed-aya": "ran"}, PAPER, rt.Values.load(ctx, work))
    rows = {label: ours for label, ours, _, _ in table.rows}
    assert rows["Fig. 1a languages"] == {"Fed-Aya": "analysis/fed-aya/fig1a_language.png", "Fed-ChatbotIT": None,
                                         "Fed-WildChat": None, "Fed-ChatbotPA": None}
    assert rows["Fig. 4 t-SNE embeddings"]["Fed-Aya"] is None and len(rows) == 7
    assert "| Fig. 5 samples per client | analysis/fed-aya/fig5_quantity.png | - | - | - |" in rt.to_markdown(table)


def test_the_scripts_settings_switch_changes_exactly_the_listed_differences(tmp_path):
    scripts = rp.with_script_settings(PRESETS)
    assert len(scripts["scripts"]["differences"]) == 4 and scripts["settings_from"] == "scripts"
    ctx = rs.Context(scripts, tmp_path / "results", False, python="PY", flags_of=everything,
                     judge_base_url="http://judge/v1")
    paper_runs, _ = dry_run(ctx_for(tmp_path, judge_base_url="http://judge/v1"), list(PRESETS["tables"]))
    script_runs, _ = dry_run(ctx, list(PRESETS["tables"]))
    changed = {r.args["dataset"] + ("/local" if r.local else "") for r in script_runs.runs.values()
               if r.name not in paper_runs.runs}
    assert changed == {"fed-wildchat-mt", "fed-wildchat-mt/local", "fed-chatbotpa", "fed-chatbotpa/local",
                       "fed-wildchat", "fed-wildchat/local"}  # the DP runs of Table 8 and Figure 6 are on fed-wildchat
    runs = list(script_runs.runs.values())
    assert {r.args["template"] for r in runs if r.args["dataset"] == "fed-wildchat-mt"} == {"alpaca"}
    assert {r.args["model_name_or_path"] for r in runs if r.task == "preference"} == {"alpaca_recovered"}
    dp = [r for r in runs if r.args.get("dp_delta")]
    local_dp = [r for r in dp if r.local]
    assert len(local_dp) == 2 and all(r.args["num_rounds"] == 50 and r.args["max_steps"] == 10 and
                                      r.args["batch_size"] == 16 and "local_epochs" not in r.args for r in local_dp)
    assert all(r.args["max_steps"] == 160 for r in dp if not r.local)
    # Everything else is the paper's: Table 3's runs are the same commands.
    assert all(r.name in paper_runs.runs for r in runs if r.args["dataset"] in ("fed-aya", "fed-chatbotit"))
    table = rt.assemble(ctx, script_runs, "table8", {}, PAPER, rt.Values.load(ctx, script_runs))
    assert any("released training scripts" in note for note in table.notes)
