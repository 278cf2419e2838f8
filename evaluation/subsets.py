"""Representative `--limit` subsets: seeded and stratified, with the chosen question ids written down.

The first N questions of a benchmark are not a sample of it: MT-Bench's first 10 are all writing questions and
Aya's first 20 all Arabic. `stratified_subset` takes N questions round-robin over the strata (MT-Bench and Vicuna
categories, Aya languages, MMLU subjects), each stratum in a seeded random order, so every stratum gets the same
number (one more for some when N is not a multiple of their count; a stratum that runs out leaves its turn to
the others). Without strata it is a seeded random sample.
"""
from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def stratified_subset(entries: Sequence[T], limit: int | None, seed: int,
                      stratum: Callable[[T], str] = lambda entry: "") -> list[T]:
    """`limit` of `entries` (all of them when limit is None or not smaller), in their original order."""
    if limit is None or limit >= len(entries):
        return list(entries)
    if limit < 0:
        raise SystemExit(f"--limit {limit} is negative: pass a number of questions, or omit it for all of them.")
    rng = random.Random(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, entry in enumerate(entries):
        groups[stratum(entry)].append(index)
    names = sorted(groups)
    for name in names:  # sorted first, so the shuffles depend on the seed only
        rng.shuffle(groups[name])
    rng.shuffle(names)  # which strata get one more when the limit does not divide evenly
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        for name in names:
            if depth < len(groups[name]) and len(chosen) < limit:
                chosen.append(groups[name][depth])
        depth += 1
    return [entries[i] for i in sorted(chosen)]


def record_subset(path: Path, question_ids: list[str], strata: list[str], limit: int | None, seed: int) -> None:
    """Write which questions a `--limit` run used (`<output_dir>/<benchmark>/subset.json`); without a limit, remove
    a stale record so it never describes a full run."""
    if limit is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"limit": limit, "seed": seed, "per_stratum": dict(sorted(Counter(strata).items())),
              "question_ids": question_ids}
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
