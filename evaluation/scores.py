"""Score rows for locally scored benchmarks (MMLU, HumanEval), in the same JSONL shape as judgments."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from evaluation.judge import read_judgments

_lock = threading.Lock()


def done_keys(path: Path) -> set[tuple[str, int]]:
    return {(r["question_id"], r["turn"]) for r in read_judgments(path)}


def append_score(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock, open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({**row, "tstamp": time.time()}, ensure_ascii=False) + "\n")
