"""How far two judges agree on the scores of the same answers, so an open judge can be checked against GPT-4 on
a sample before it judges everything.

    python -m evaluation.agreement eval_gpt4 eval_open_judge
    python -m evaluation.agreement gpt-4_single.jsonl eval_open_judge --judge_b Qwen-Qwen2.5-72B-Instruct

Each side is an --output_dir of evaluation.run, or one judgments file: ours, or FastChat's single-answer
judgments (`model_judgment/gpt-4_single.jsonl`: question_id, model, score, turn; read as MT-Bench). Scores are
matched by (benchmark, model, question, turn); unparseable ones (-1) are left out. Per benchmark it prints the
Spearman and Kendall (tau-b) correlations, the mean absolute difference, and the pairwise preference
agreement (for two models' answers to the same question, both judges prefer the same one, or both call it a
tie), each with a percentile bootstrap interval over questions.
"""
from __future__ import annotations

import argparse
import random
from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from statistics import mean

from evaluation.judge import FAILED
from evaluation.show_results import load

Key = tuple[str, str, str, int]  # benchmark, model, question_id, turn


def _scores(rows: list[dict], benchmark: str, model: str | None = None) -> dict[Key, float]:
    return {(benchmark, str(model or r.get("model_id") or r["model"]), str(r["question_id"]), int(r["turn"])):
            float(r["score"]) for r in rows if r["score"] != FAILED}


def read_side(source: str, judge: str | None) -> dict[Key, float]:
    """The scores of one judge: from an evaluation output folder (`judge`: which judge's files, when it holds
    several), or from one JSONL file of judgments."""
    path = Path(source)
    if path.is_file():
        from evaluation.data import read_jsonl

        rows = read_jsonl(path)
        if rows and "benchmark" not in rows[0]:  # FastChat's single-answer judgments: MT-Bench
            return _scores(rows, "mtbench")
        scores = {}
        for benchmark in {r["benchmark"] for r in rows}:
            scores.update(_scores([r for r in rows if r["benchmark"] == benchmark], benchmark))
        return scores
    if not path.is_dir():
        raise SystemExit(f"{source} is neither an evaluation output folder nor a judgments file.")
    # LLM judgments only: rule-scored and locally scored benchmarks would agree by construction.
    found = {key: rows for key, rows in load(path).items() if (rows[0].get("judge_settings") or {}).get("judge_model")}
    labels = defaultdict(set)
    for benchmark, _, label in found:
        labels[benchmark].add(label)
    if judge is None and any(len(v) > 1 for v in labels.values()):
        raise SystemExit(f"{source} holds judgments of several judges or settings "
                         f"({', '.join(sorted(set().union(*labels.values())))}): name one with --judge_a/--judge_b.")
    scores = {}
    for (benchmark, model_id, label), rows in found.items():
        if judge is None or label == judge:
            scores.update(_scores(rows, benchmark, model_id))
    return scores


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties given their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(x: list[float], y: list[float]) -> float | None:
    mx, my = mean(x), mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else None


def spearman(x: list[float], y: list[float]) -> float | None:
    return _pearson(_ranks(x), _ranks(y)) if len(x) > 1 else None


def kendall(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b (ties in either list accounted for)."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif (dx > 0) == (dy > 0):
            concordant += 1
        else:
            discordant += 1
    denominator = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denominator if denominator else None


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


@dataclass(frozen=True)
class Agreement:
    items: int
    pairs: int
    spearman: float | None
    kendall: float | None
    mean_abs_diff: float | None
    preference: float | None  # share of answer pairs both judges order alike (ties alike)


def agreement(groups: list[list[tuple[str, float, float]]]) -> Agreement:
    """The statistics over question groups, each a list of (model, score A, score B) for one question and turn."""
    a = [sa for group in groups for _, sa, _ in group]
    b = [sb for group in groups for _, _, sb in group]
    same = [_sign(a1 - a2) == _sign(b1 - b2) for group in groups for (_, a1, b1), (_, a2, b2) in combinations(group, 2)]
    return Agreement(len(a), len(same), spearman(a, b), kendall(a, b),
                     mean(abs(p - q) for p, q in zip(a, b)) if a else None, mean(same) if same else None)


def bootstrap(groups: list, statistic: str, resamples: int, seed: int) -> tuple[float, float] | None:
    """The 95% percentile interval of a statistic over question groups drawn with replacement."""
    rng = random.Random(seed)
    values = sorted(v for v in (getattr(agreement([rng.choice(groups) for _ in groups]), statistic)
                                for _ in range(resamples)) if v is not None)
    if len(values) < resamples / 2:
        return None
    return values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))]


def compare(a: dict[Key, float], b: dict[Key, float]) -> dict[str, list[list[tuple[str, float, float]]]]:
    """The scores both judges gave, grouped per benchmark by (question, turn)."""
    groups = defaultdict(lambda: defaultdict(list))
    for key in sorted(a.keys() & b.keys()):
        benchmark, model, question, turn = key
        groups[benchmark][(question, turn)].append((model, a[key], b[key]))
    return {benchmark: list(by_question.values()) for benchmark, by_question in groups.items()}


STATISTICS = (("spearman", "Spearman"), ("kendall", "Kendall"), ("mean_abs_diff", "mean abs diff"),
              ("preference", "pairwise preference agreement"))


def report(a: dict[Key, float], b: dict[Key, float], resamples: int = 1000, seed: int = 0) -> str:
    by_benchmark = compare(a, b)
    if not by_benchmark:
        raise SystemExit("The two judges scored no answer in common (same benchmark, model, question and turn): "
                         "judge the same answer files with both.")
    lines = ["| benchmark | items | answer pairs | " + " | ".join(title for _, title in STATISTICS) + " |",
             "|---" * (3 + len(STATISTICS)) + "|"]
    for benchmark, groups in sorted(by_benchmark.items()):
        point = agreement(groups)
        cells = []
        for name, _ in STATISTICS:
            value = getattr(point, name)
            interval = bootstrap(groups, name, resamples, seed) if value is not None else None
            cells.append("-" if value is None else f"{value:.3f}" +
                         (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""))
        lines.append(f"| {benchmark} | {point.items} | {point.pairs} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n95% percentile bootstrap intervals over questions ({resamples} resamples).\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="evaluation output folder or judgments JSONL of the first judge")
    parser.add_argument("b", help="... of the second judge")
    parser.add_argument("--judge_a", default=None, help="which judge's files in folder A (show_results' label)")
    parser.add_argument("--judge_b", default=None, help="which judge's files in folder B")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples for the intervals")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(report(read_side(args.a, args.judge_a), read_side(args.b, args.judge_b), args.bootstrap, args.seed))


if __name__ == "__main__":
    main()
