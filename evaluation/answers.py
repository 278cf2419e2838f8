"""Answering a benchmark's questions with a model, turn by turn, appending to a resumable JSONL file.

Questions are grouped by decoding settings (MT-Bench varies the temperature by category), then answered one
batch at a time: turn 1 for the batch, then turn 2 with turn 1's answer in the history, then the batch's rows
are written. A killed run loses at most one batch; a rerun skips questions already in the file.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from itertools import groupby
from pathlib import Path

from tqdm.auto import tqdm

from evaluation.benchmarks import Benchmark, Decoding
from evaluation.data import Item, read_jsonl
from evaluation.generate import generate_answers
from utils.templates import prompt_text


def read_answers(path: Path) -> dict[str, dict]:
    """Answer rows by question_id (a row is written only once all its turns are answered)."""
    return {r["question_id"]: r for r in read_jsonl(path)} if path.exists() else {}


def _answer_batch(model, tokenizer, template: str, bench: Benchmark, items: list[Item], decoding: Decoding,
                  seed: int, batch_size: int, bar) -> list[list[str]]:
    answers: list[list[str]] = [[] for _ in items]
    for turn in range(max(len(item.turns) for item in items)):
        active = [i for i, item in enumerate(items) if len(item.turns) > turn]
        # Each later turn sees the model's own earlier answers, as in MT-Bench's second turn.
        batch_prompts = [prompt_text(template, tokenizer, bench.instruction(items[i].turns[turn]),
                                     history=[(bench.instruction(q), a)
                                              for q, a in zip(items[i].turns[:turn], answers[i])])
                         for i in active]
        outputs = generate_answers(model, tokenizer, batch_prompts, batch_size=batch_size,
                                   max_new_tokens=decoding.max_new_tokens, do_sample=decoding.do_sample,
                                   temperature=decoding.temperature, top_p=decoding.top_p, seed=seed, progress=bar)
        for i, text in zip(active, outputs):
            answers[i].append(text)
    return answers


def answer_benchmark(model, tokenizer, template: str, bench: Benchmark, items: list[Item], out_path: Path,
                     model_id: str, batch_size: int = 8, max_new_tokens: int | None = None, seed: int = 0) -> int:
    """Answer the questions of `items` missing from `out_path`; returns how many were answered now.

    `max_new_tokens` caps the paper's length settings (for smoke runs on a CPU).
    """
    done = read_answers(out_path)
    pending = [item for item in items if item.question_id not in done]
    if not pending:
        return 0
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def settings(item: Item) -> Decoding:
        d = bench.decoding(item)
        return Decoding(min(d.max_new_tokens, max_new_tokens or d.max_new_tokens), d.temperature, d.top_p)

    # Sorting by decoding then prompt length keeps batches homogeneous and padding small.
    pending.sort(key=lambda item: (settings(item).temperature, len(item.turns[0])))
    bar = tqdm(total=sum(len(item.turns) for item in pending), desc=f"{bench.name} {model_id}", unit="answer",
               dynamic_ncols=True)
    batch_number = 0
    with bar:
        for decoding, group in groupby(pending, key=settings):
            group = list(group)
            for start in range(0, len(group), batch_size):
                batch = group[start:start + batch_size]
                answers = _answer_batch(model, tokenizer, template, bench, batch, decoding,
                                        seed + batch_number, batch_size, bar)
                batch_number += 1
                with open(out_path, "a", encoding="utf-8") as f:
                    for item, turns in zip(batch, answers):
                        row = {"question_id": item.question_id, "model_id": model_id, "turns": turns,
                               "template": template, "decoding": asdict(decoding), "tstamp": time.time()}
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(pending)
