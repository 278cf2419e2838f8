"""Collect judgments and scores into the paper's tables, as markdown and CSV.

    python -m evaluation.show_results --output_dir eval_results

Reads <benchmark>/judgments/<model_id>__<judge>.jsonl. Rows judged with other settings (parser, response
format, max tokens, prompts) form a column of their own, labelled "<judge> #<digest>", and a table lists the
settings behind every column, flagging judges the endpoint did not list. Rows with score -1 (unparseable
judge replies) are left out of every mean and counted: the share per benchmark is printed right under the
scores, and each cell also reports how many items were scored. Aya's score is the mean of its eight
per-language means, as in the paper; the per-language table is printed beside it.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from evaluation.judge import FAILED, read_judgments


@dataclass(frozen=True)
class Column:
    title: str
    benchmark: str
    turn: int | None = None  # only rows of this turn (MT-Bench-1 / -2)
    group_by: str | None = None  # mean of per-group means (Aya: per language)
    scale: float = 1.0  # 100 for rates shown as percentages


COLUMNS = (
    Column("MT-Bench-1", "mtbench", turn=1),
    Column("MT-Bench-2", "mtbench", turn=2),
    Column("MT-Bench", "mtbench"),
    Column("Vicuna", "vicuna"),
    Column("Ref-GPT4 Aya", "aya", group_by="language"),
    Column("Ref-GPT4 ChatbotIT", "chatbot"),
    Column("Ref-GPT4 WildChat", "wildchat"),
    Column("AdvBench harmless %", "advbench", scale=100),
    Column("MMLU %", "mmlu", scale=100),
    Column("HumanEval pass@1 %", "humaneval", scale=100),
)


@dataclass(frozen=True)
class Cell:
    value: float | None
    scored: int
    failed: int


def summarize(rows: list[dict], column: Column) -> Cell:
    rows = [r for r in rows if column.turn is None or r["turn"] == column.turn]
    valid = [r for r in rows if r["score"] != FAILED]
    failed = len(rows) - len(valid)
    if not valid:
        return Cell(None, 0, failed)
    if column.group_by:
        groups = defaultdict(list)
        for r in valid:
            groups[r.get(column.group_by, "")].append(r["score"])
        value = mean(mean(scores) for scores in groups.values())
    else:
        value = mean(r["score"] for r in valid)
    return Cell(value * column.scale, len(valid), failed)


def settings_of(row: dict) -> dict:
    """What sets a column apart: the judge's settings and where its prompts came from."""
    return {**(row.get("judge_settings") or {}), "prompts": row.get("prompt_source", "")}


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:6]


def load(output_dir: Path) -> dict[tuple[str, str, str], list[dict]]:
    """Rows by (benchmark, model_id, judge): the judge is the file name's, with "#<digest>" of the settings
    added where one benchmark's files hold rows judged with different settings."""
    groups: dict[tuple[str, str, str], dict[str, list[dict]]] = {}
    for path in sorted(output_dir.glob("*/judgments/*.jsonl")):
        model_id, _, judge = path.stem.rpartition("__")
        by_settings = groups.setdefault((path.parent.parent.name, model_id, judge), {})
        for row in read_judgments(path):
            by_settings.setdefault(_digest(settings_of(row)), []).append(row)
    variants = defaultdict(set)
    for (benchmark, _, judge), by_settings in groups.items():
        variants[(benchmark, judge)].update(by_settings)
    found = {}
    for (benchmark, model_id, judge), by_settings in groups.items():
        for digest, rows in by_settings.items():
            label = judge if len(variants[(benchmark, judge)]) == 1 else f"{judge} #{digest}"
            found[(benchmark, model_id, label)] = rows
    return found


def settings_table(found) -> str:
    """The settings behind each judge column; (!) where the endpoint's model list lacked the judge or the
    replies reported another model than the one asked for."""
    lines = ["| benchmark | judge | judge model | replies reported | listed by endpoint | response format | parser "
             "| max tokens | prompts |", "|---" * 9 + "|"]
    seen = {}
    for (benchmark, _, judge), rows in sorted(found.items()):
        entry = seen.setdefault((benchmark, judge), {"settings": settings_of(rows[0]), "reported": set(),
                                                     "listed": set()})
        entry["reported"].update(r.get("judge_reported_model") for r in rows if r.get("judge_reported_model"))
        entry["listed"].update(r.get("judge_model_listed") for r in rows if "judge_model_listed" in r)
    for (benchmark, judge), entry in seen.items():
        settings = entry["settings"]
        if not settings.get("judge_model"):
            continue  # a rule or a local scorer: nothing to show
        asked = settings["judge_model"]
        listed = "unknown" if entry["listed"] in (set(), {None}) else \
            ("no **(!)**" if False in entry["listed"] else "yes")
        reported = ", ".join(sorted(entry["reported"])) or "-"
        if entry["reported"] - {asked}:
            reported += " **(!)**"
        lines.append(f"| {benchmark} | {judge} | {asked} | {reported} | {listed} | {settings.get('response_format')} "
                     f"| {settings.get('parser')} | {settings.get('max_tokens')} | {settings['prompts']} |")
    return "\n".join(lines)


def main_table(found) -> tuple[list[str], dict[str, dict[str, Cell]]]:
    """Column titles and cells by model; a benchmark judged two ways gets one column per judge."""
    judges = defaultdict(set)
    for benchmark, _, judge in found:
        judges[benchmark].add(judge)
    titles, table = [], defaultdict(dict)
    for column in COLUMNS:
        for judge in sorted(judges.get(column.benchmark, ())):
            title = column.title + (f" [{judge}]" if len(judges[column.benchmark]) > 1 else "")
            titles.append(title)
            for (benchmark, model_id, j), rows in found.items():
                if benchmark == column.benchmark and j == judge:
                    table[model_id][title] = summarize(rows, column)
    return titles, dict(table)


def language_table(found) -> tuple[list[str], dict[str, dict[str, Cell]]]:
    """Aya per language; "All" is the mean of the language means (the paper's "all averaged score")."""
    languages = sorted({r.get("language", "") for (b, _, _), rows in found.items() if b == "aya" for r in rows})
    table = {}
    for (benchmark, model_id, judge), rows in found.items():
        if benchmark != "aya":
            continue
        key = model_id if sum(b == "aya" and m == model_id for b, m, _ in found) == 1 else f"{model_id} [{judge}]"
        cells = {lang: summarize([r for r in rows if r.get("language") == lang], Column(lang, "aya"))
                 for lang in languages}
        cells["All"] = summarize(rows, Column("All", "aya", group_by="language"))
        table[key] = cells
    return [*languages, "All"], table


def unparseable_share(found) -> str:
    """Per benchmark and judge, over all models: how many judge replies had no score. A high share means the
    means rest on few items (or the judge ignores the rating format: see --judge_parser/--judge_response_format)."""
    totals = defaultdict(lambda: [0, 0])
    for (benchmark, _, judge), rows in found.items():
        totals[(benchmark, judge)][0] += len(rows)
        totals[(benchmark, judge)][1] += sum(r["score"] == FAILED for r in rows)
    lines = ["| benchmark | judge | replies | unparseable | share |", "|---|---|---|---|---|"]
    for (benchmark, judge), (replies, failed) in sorted(totals.items()):
        share = f"{100 * failed / replies:.1f}%" + (" **(!)**" if failed > replies / 10 else "") if replies else "-"
        lines.append(f"| {benchmark} | {judge} | {replies} | {failed} | {share} |")
    return "\n".join(lines)


def _fmt(cell: Cell | None, digits: int = 2) -> str:
    return "-" if cell is None or cell.value is None else f"{cell.value:.{digits}f}"


def _counts(cell: Cell | None) -> str:
    return "-" if cell is None else f"{cell.scored}/{cell.failed}"


def markdown(titles: list[str], table: dict, cell_text) -> str:
    lines = ["| model | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
    for model_id in sorted(table):
        lines.append(f"| {model_id} | " + " | ".join(cell_text(table[model_id].get(t)) for t in titles) + " |")
    return "\n".join(lines)


def to_csv(titles: list[str], table: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", *[f"{t}{suffix}" for t in titles for suffix in ("", " scored", " unparseable")]])
    for model_id in sorted(table):
        row = [model_id]
        for t in titles:
            cell = table[model_id].get(t)
            row += ["", "", ""] if cell is None else [
                "" if cell.value is None else f"{cell.value:.4f}", cell.scored, cell.failed]
        writer.writerow(row)
    return buffer.getvalue()


def report(output_dir: Path) -> str:
    """Write results.md, results.csv and aya_languages.csv into `output_dir`; return the markdown."""
    found = load(output_dir)
    titles, table = main_table(found)
    lang_titles, lang_table = language_table(found)
    parts = ["## Scores", markdown(titles, table, _fmt),
             "## Unparseable judge replies per benchmark (left out of the means; (!) above 10%)",
             unparseable_share(found),
             "## Scored items / unparseable judge replies (left out of the means)",
             markdown(titles, table, _counts),
             "## Judge settings behind each column ((!): not the model asked for, or not listed by the endpoint)",
             settings_table(found)]
    if lang_table:
        parts += ["## Ref-GPT4 Aya per language", markdown(lang_titles, lang_table, _fmt),
                  "## Aya scored / unparseable", markdown(lang_titles, lang_table, _counts)]
    text = "\n\n".join(parts) + "\n"
    (output_dir / "results.md").write_text(text, encoding="utf-8")
    (output_dir / "results.csv").write_text(to_csv(titles, table), encoding="utf-8")
    if lang_table:
        (output_dir / "aya_languages.csv").write_text(to_csv(lang_titles, lang_table), encoding="utf-8")
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="eval_results")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    if not any(output_dir.glob("*/judgments/*.jsonl")):
        raise SystemExit(f"No judgments under {output_dir}/<benchmark>/judgments/: run `python -m evaluation.run` "
                         "first, or pass the --output_dir it used.")
    print(report(output_dir))


if __name__ == "__main__":
    main()
