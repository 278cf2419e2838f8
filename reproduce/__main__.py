"""Regenerate FedLLM-Bench's tables: train, evaluate, tabulate (bash run_all.sh passes its arguments here).

    bash run_all.sh                      # paper scale (GPU, judge endpoint, built datasets)
    bash run_all.sh --smoke              # every row of every table on a CPU, offline, in minutes
    bash run_all.sh --only table3 --dry-run
    bash run_all.sh --local_data_dir ~/FedLLM-Bench-data   # the authors' released files instead of building

The plan (reproduce/plan.py) turns reproduce/presets.json into training runs and evaluations; the steps
(reproduce/steps.py) run them, skipping what is done and resuming what was interrupted; the tables
(reproduce/tables.py) put our value of every cell beside the paper's published number and the difference,
in <results>/<table>.md and .csv (and figure6.png), plus a training-loss plot per run.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from reproduce.plan import PRESETS, ROOT, load_presets, plan, released_files, select_tables, with_script_settings
from reproduce.steps import Context, execute, judge_load_lines, steps_for
from reproduce.tables import Values, assemble, load_paper, plot_losses, plot_sweep, write_table
from utils.files import write_json_atomic


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run_all.sh", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU smoke mode (offline stand-ins, a few rounds)")
    parser.add_argument("--only", action="append", default=[], help="table name(s), e.g. table3 (repeat or comma)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands that would run, run nothing")
    parser.add_argument("--results_dir", default=None, help="default results/ (paper) or results/smoke/ (smoke)")
    parser.add_argument("--presets", default=str(PRESETS))
    parser.add_argument("--settings", choices=("paper", "scripts"), default="paper",
                        help="the paper's text (default), or the released training scripts' settings where they "
                             "differ (docs/RUN_ALL.md lists each difference; results in results/scripts/)")
    parser.add_argument("--judge_base_url", default=None, help="OpenAI-compatible judge endpoint")
    parser.add_argument("--judge_model", default=None,
                        help="one judge for every benchmark; default: the authors' (MT-Bench gpt-4-1106-preview, "
                             "the others gpt-4)")
    parser.add_argument("--eval_data_dir", default=None, help="local evaluation data (default: downloaded, cached)")
    parser.add_argument("--local_data_dir", default=None, help="folder of the authors' released files (e.g. "
                        "aya_38c_25k.json, chatbotIT_237c_6k.json, wildchat_100c_53k.json, wildchat_50c.json, "
                        "chatbot_by_client-10k.json, in any subfolders): each table's dataset reads its file")
    parser.add_argument("--jobs", type=int, default=1, help="steps run side by side (independent trainings and "
                        "evaluations), each with cores/jobs torch threads; 2 suits the smoke on a 2-core machine")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    presets = load_presets(Path(args.presets))
    if args.settings == "scripts":
        presets = with_script_settings(presets)
    tables = select_tables(presets, [name for item in args.only for name in item.split(",") if name])
    default_results = "results/smoke" if args.smoke else "results/scripts" if args.settings == "scripts" else "results"
    results = Path(args.results_dir or default_results)
    results = results if results.is_absolute() else ROOT / results
    if args.smoke and args.local_data_dir:
        raise SystemExit("--local_data_dir has no effect with --smoke (the smoke runs on offline stand-ins): drop one.")
    local_files = released_files(args.local_data_dir) if args.local_data_dir else None
    for dataset, path in (local_files or {}).items():
        print(f"{dataset}: the released file {path}")
    ctx = Context(presets, results, args.smoke, judge_base_url=args.judge_base_url, judge_model=args.judge_model,
                  eval_data_dir=args.eval_data_dir, local_files=local_files)
    if args.smoke:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = plan(presets, tables, args.smoke, local_files)
    steps = steps_for(ctx, work)
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs} is invalid: give 1 or more steps to run at a time.")
    execute(steps, ctx, dry_run=args.dry_run, jobs=args.jobs)
    if args.dry_run:
        print("Judge load (MT-Bench turn 2 judged only where a table reads it):")
        print("\n".join(judge_load_lines(ctx, work)))
        return 0

    statuses = {s.name: s.status for s in steps}
    paper, values = load_paper(), Values.load(ctx, work)
    for name in tables:
        table = assemble(ctx, work, name, statuses, paper, values)
        write_table(table, results)
        if "plot" in presets["tables"][name]:
            plot_sweep(table, presets["tables"][name], work, results)
    plot_losses(work.runs, ctx)
    write_json_atomic(results / "steps.json", statuses, indent=1)
    print(f"Tables written to {results}: {', '.join(tables)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
