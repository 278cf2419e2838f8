"""run_all: presets, planned commands, skip/resume logic, table assembly; slow: the full smoke run end to end."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from utils import run_all as ra

ROOT = Path(__file__).resolve().parent.parent


def everything(entry):
    """A flags_of stub: the entry exists and accepts every flag."""
    return _AnySet()


class _AnySet(set):
    def __contains__(self, item):
        return True


def ctx_for(tmp_path, smoke=False, flags_of=everything, **kw):
    return ra.Context(ra.load_presets(), tmp_path / "results", smoke, python="PY", flags_of=flags_of, **kw)


def test_presets_load_and_cover_every_table():
    presets = ra.load_presets()
    assert set(presets["tables"]) == {"table1", "table2", "table3", "table4", "table5", "table6", "table8", "figure6"}
    assert len(presets["methods"]) == 7
    for name, table in presets["tables"].items():
        if table["kind"] == "runs":
            assert table["setting"] in presets["settings"], name
            assert ra.expand_rows(table, presets), name
            for column in table["columns"]:
                kind, _, key = column["metric"].partition(":")
                assert kind in {"judged", "aya"} and (kind == "aya" or key in ra.BENCHMARK_OF), column


def test_select_tables_rejects_unknown_names():
    presets = ra.load_presets()
    assert ra.select_tables(presets, ["table3"]) == ["table3"]
    with pytest.raises(SystemExit, match="no such table"):
        ra.select_tables(presets, ["table7"])


def test_dry_run_prints_the_paper_settings(tmp_path):
    ctx = ctx_for(tmp_path, judge_base_url="http://judge/v1")
    result = ra.plan(ctx, ["table3"])
    lines = []
    ra.execute(result.steps, ctx, dry_run=True, echo=lines.append)
    train = [line for line in lines if line.startswith("PY main_sft.py") and "--fed_alg fedavg " in line]
    assert len(train) == 1
    for flag in ("--dataset fed-chatbotit", "--num_clients 237", "--sample_clients 10", "--num_rounds 100",
                 "--max_steps 5", "--batch_size 4", "--gradient_accumulation_steps 4", "--seq_length 1024",
                 "--peft_lora_r 16", "--learning_rate 2e-05", "--load_in_8bit",
                 "--model_name_or_path meta-llama/Llama-2-7b-hf"):
        assert flag in train[0], flag
    evals = [line for line in lines if "-m evaluation.run" in line]
    assert len(evals) == 18 and all("--judge_base_url http://judge/v1" in line for line in evals)
    assert sum("--benchmarks humaneval mmlu --output_dir" in line for line in evals) == 9  # rule-scored
    assert sum("--benchmarks chatbot mtbench vicuna --output_dir" in line for line in evals) == 9  # judged
    assert not any("--per_task" in line for line in lines)


def test_without_a_judge_only_rule_scored_benchmarks_run(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ctx = ctx_for(tmp_path)
    steps = [s for s in ra.plan(ctx, ["table3"]).steps if s.name.startswith("evaluate")]
    assert {s.skip is None for s in steps if "mmlu" in s.name} == {True}
    assert all(s.skip.startswith("no judge configured for chatbot, mtbench, vicuna") for s in steps
               if "vicuna" in s.name)
    smoke = ctx_for(tmp_path, smoke=True)
    assert not [s for s in ra.plan(smoke, ["table3"]).steps if s.name.startswith("evaluate")]
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


def test_preference_table_uses_alpaca_dpo_and_dynamic_steps(tmp_path):
    result = ra.plan(ctx_for(tmp_path), ["figure6"])
    fedavg = next(r for r in result.runs.values() if r.args["fed_alg"] == "fedavg")
    assert fedavg.entry == "main_dpo.py" and fedavg.args["dynamic_local_step"] is True
    assert fedavg.args["model_name_or_path"] == "chavinlo/alpaca-native" and fedavg.args["learning_rate"] == 1e-4


def test_smoke_shares_runs_across_tables_and_marks_the_subset(tmp_path):
    ctx = ctx_for(tmp_path, smoke=True)
    result = ra.plan(ctx, ["table3", "table4", "table5"])
    assert len(result.runs) == 9  # 2 locals + 7 methods, the same fed-synthetic runs for all three tables
    runnable = [r for r in result.runs.values() if r.skip is None]
    assert len(runnable) == 9  # the default smoke runs every row
    assert all(r.args["model_name_or_path"] == "smollm2" and r.args["dataset"] == "fed-synthetic" for r in runnable)
    scores = [s.command() for s in result.steps if s.name.startswith("score") and not s.skip]
    assert len(scores) == 9 and all("-m evaluation.exact_match" in c and "--per_task 1 --output" in c for c in scores)
    quick = ra.Context(ra.load_presets(), tmp_path / "results", True, python="PY", flags_of=everything)
    quick.presets["smoke"].update(methods=["fedavg", "local"], local_clients=[1])  # a shorter smoke
    subset = ra.plan(quick, ["table3"]).runs.values()
    assert sorted(r.args["fed_alg"] for r in subset if r.skip is None) == ["fedavg", "local1"]
    assert {r.skip for r in subset if r.skip} == {"not run in smoke (smoke.methods in utils/presets.json)",
                                                  "not run in smoke (smoke.local_clients in utils/presets.json)"}
    table6 = ra.plan(ctx, ["table6"])
    assert [r.skip for r in table6.runs.values() if "client_groups" in r.args] == \
        ["not run in smoke: the stand-in datasets carry no client language"] * 2


def test_missing_entry_or_flag_is_skipped_with_a_reason(tmp_path):
    no_dpo = ctx_for(tmp_path, flags_of=lambda entry: None if entry == "main_dpo.py" else everything(entry))
    result = ra.plan(no_dpo, ["figure6"])
    lines = []
    ra.execute(result.steps, no_dpo, dry_run=True, echo=lines.append)
    assert all(s.status.startswith("skipped: main_dpo.py is not in the repository") for s in result.steps
               if s.name.startswith("train"))
    real = ctx_for(tmp_path, flags_of=ra.entry_flags)
    table6 = ra.plan(real, ["table6"])
    groups = [s for s in table6.steps if s.name.startswith("train") and "client_groups" in s.command()]
    assert len(groups) == 2
    if "client_groups" not in ra.entry_flags("main_sft.py"):  # until the core grows the flag
        assert all("main_sft.py has no --client_groups yet" in s.skip for s in groups)


def test_finished_step_is_skipped_and_interrupted_run_resumes(tmp_path):
    ctx = ctx_for(tmp_path, smoke=True)
    marker = tmp_path / "marker"
    step = ra.Step("score x (smoke)", [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('1')"], marker)
    ra.execute([step], ctx, echo=lambda _: None)
    assert step.status == "ran" and marker.exists()
    again = ra.Step(step.name, ["false"], marker)
    ra.execute([again], ctx, echo=lambda _: None)
    assert again.status == "done earlier"

    run = next(r for r in ra.plan(ctx, ["table8"]).runs.values() if r.skip is None)
    out = ctx.runs_dir / run.name
    out.mkdir(parents=True)
    (out / "args.json").write_text("{}")  # an interrupted run: arguments written, no done marker
    train = ra.train_step(ctx, run)
    assert train.before(train) is None and train.argv[-1] == "--resume"
    failing = ra.Step(f"train {run.name}", [sys.executable, "-c", "raise SystemExit(3)"], out / ra.DONE)
    evaluation = ra.Step(f"score {run.name} (smoke)", ["true"], out / "smoke_eval.json")
    ra.execute([failing, evaluation], ctx, echo=lambda _: None)
    assert failing.status.startswith("failed (exit 3")
    assert evaluation.status == "skipped: its training run did not finish"


def test_table_has_paper_column_and_difference(tmp_path):
    ctx = ctx_for(tmp_path, smoke=False)
    stats = ctx.results / "table1"
    stats.mkdir(parents=True)
    (stats / "fed-aya.json").write_text(json.dumps({
        "clients": 38, "samples": 25500, "per_client": [671.0, 810.0],
        "instruction_length": {"pooled": [120.0, 200.0]}, "response_length": {"pooled": [225.0, 411.0]},
        "quality": None}))
    result = ra.plan(ctx, ["table1"])
    paper = json.loads(ra.PAPER_RESULTS.read_text())
    table = ra.assemble(ctx, "table1", result, {}, paper, ({}, {}))
    header, records = ra.to_records(table)
    aya = dict(zip(header, records[0]))
    assert aya["row"] == "Fed-Aya"
    assert aya["# samples"] == "25500" and aya["# samples (paper)"] == "25513" and aya["# samples (diff)"] == "-13"
    assert aya["L. instruction (mean) (diff)"] == "4"
    assert aya["IFD (mean)"] == "-" and aya["IFD (mean) (paper)"] == "0.63"
    chatbot = dict(zip(header, records[1]))
    assert chatbot["# clients"] == "-" and chatbot["# clients (paper)"] == "237"
    ra.write_table(table, ctx.results)
    assert "| Fed-Aya |" in (ctx.results / "table1.md").read_text()
    assert (ctx.results / "table1.csv").read_text().startswith("mode,row,# clients,# clients (paper)")


def test_run_values_come_from_scores_and_missing_paper_numbers_say_not_found(tmp_path):
    ctx = ctx_for(tmp_path, smoke=True)
    result = ra.plan(ctx, ["table8"])
    run_name = result.cells["table8"][0][1]
    run_dir = ctx.runs_dir / run_name
    (run_dir / "checkpoint-2").mkdir(parents=True)
    (run_dir / "smoke_eval.json").write_text(json.dumps({"accuracy": 0.25}))
    (run_dir / "metrics.jsonl").write_text('{"round": 1, "client_loss": {"0": 2.0, "3": 1.0}}\n'
                                           '{"round": 2, "client_loss": {"1": 1.0}}\n')
    table = ra.assemble(ctx, "table8", result, {f"train {run_name}": "ran"}, json.loads(ra.PAPER_RESULTS.read_text()),
                        ({}, {}))
    header, records = ra.to_records(table)
    first = dict(zip(header, records[0]))
    assert first["Exact match % (smoke)"] == "25" and first["Exact match % (smoke) (paper)"] == "n/a"
    assert first["MT-Bench-1 (paper)"] == "not found"
    assert first["status"] == "ran"
    markdown = ra.to_markdown(table)
    assert "SMOKE" in markdown and "not found" in markdown and "Differential-privacy scores not found" in markdown
    assert ra.round_losses(run_dir) == [1.5, 1.0]
    ra.plot_losses({run_name: result.runs[run_name]}, ctx)
    assert (ctx.results / "plots" / f"loss_{run_name}.png").exists()
    ra.plot_table(table, ctx.results)
    assert (ctx.results / "table8.png").exists()


@pytest.mark.slow
def test_full_smoke_run_end_to_end(tmp_path):
    """bash run_all.sh --smoke: every table from real tiny CPU runs (24 trainings, each scored); a rerun skips all."""
    results = tmp_path / "smoke"
    command = ["bash", str(ROOT / "run_all.sh"), "--smoke", "--results_dir", str(results)]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for table in ("table2", "table3", "table4", "table5", "table6", "table8", "figure6"):
        assert "SMOKE" in (results / f"{table}.md").read_text()
        for row in csv.DictReader((results / f"{table}.csv").open()):
            assert row["mode"] == "smoke"
            if row["status"] == "ran":
                smoke_cells = [value for column, value in row.items() if "(smoke)" in column and "(paper)" not in column
                               and "(diff)" not in column]
                assert smoke_cells and all(value not in ("", "-") for value in smoke_cells), (table, row)
            else:  # only Table 6's language groups are left out of smoke
                assert table == "table6" and "no client language" in row["status"], (table, row)
    assert "FedAvg + DP (epsilon 1.0)" in (results / "table8.md").read_text()
    assert (results / "figure6.png").exists() and (results / "table1.md").exists()
    assert len(list((results / "plots").glob("loss_*.png"))) == 24
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "[ran]" not in second.stdout and "[done earlier]" in second.stdout
