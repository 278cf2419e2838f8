"""MMLU data, and the InstructEval-style scorer: the answer letter the model generates, by exact match.

The data is the original Hendrycks et al. release (CSV files without header: question, A, B, C, D, answer), from
`--mmlu_dir` or downloaded once into the cache. The default scorer is EleutherAI's lm-evaluation-harness on this
same data (evaluation/mmlu_harness.py, the paper's "lm-eval style"); this module's scorer is kept as
`--mmlu_harness instructeval` and as the harness's cross-check in the tests. InstructEval prompts with k dev
examples per subject, the harness's prompt layout, and counts an answer correct when the model's greedy
continuation starts with the right letter; the harness instead compares the log-likelihoods of " A" to " D".
The two agree wherever the greedy continuation is one of the four letters.
"""
from __future__ import annotations

import csv
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from evaluation.scores import append_score
from evaluation.generate import generate_answers
from utils.model import cache_root
from utils.network import download_blocked

MMLU_URL = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
CHOICES = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: str
    index: int = 0  # row in its subject's test (or dev) file: the harness's doc_id

    @property
    def question_id(self) -> str:
        return f"{self.subject}-{self.index}"


def mmlu_dir(local: str | None) -> Path:
    """A directory with dev/ and test/ CSVs: `local`, or the cached copy of the public tarball."""
    if local:
        path = Path(local)
        if not (path / "dev").is_dir() or not (path / "test").is_dir():
            raise SystemExit(f"--mmlu_dir {local} must hold dev/ and test/ with <subject>_dev.csv and "
                             "<subject>_test.csv (the layout of the Hendrycks data.tar).")
        return path
    target = cache_root() / "eval_data" / "mmlu"
    if not (target / "test").is_dir():
        tar_path = cache_root() / "eval_data" / "mmlu_data.tar"
        tar_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            blocked = download_blocked(MMLU_URL)  # offline mode or no network: at once, not after a TCP timeout
            if blocked:
                raise OSError(blocked)
            urllib.request.urlretrieve(MMLU_URL, tar_path)
        except OSError as err:
            raise SystemExit(f"Could not download MMLU from {MMLU_URL} ({err}); pass --mmlu_dir with a local "
                             "copy (dev/ and test/ CSV folders).") from err
        with tarfile.open(tar_path) as tar:
            tar.extractall(target.parent, filter="data")
        (target.parent / "data").rename(target)
    return target


def read_split(directory: Path, split: str) -> dict[str, list[Question]]:
    by_subject = {}
    for path in sorted((directory / split).glob(f"*_{split}.csv")):
        subject = path.name[: -len(f"_{split}.csv")]
        with open(path, encoding="utf-8", newline="") as f:
            by_subject[subject] = [Question(subject, row[0], tuple(row[1:5]), row[5].strip(), i)
                                   for i, row in enumerate(csv.reader(f))]
    return by_subject


def load_mmlu(data_dir: str | None) -> tuple[dict[str, list[Question]], list[Question]]:
    """(dev questions by subject, all test questions, subjects in name order); fails now if the data is missing."""
    directory = mmlu_dir(data_dir)
    dev, test = read_split(directory, "dev"), read_split(directory, "test")
    if not test:
        raise SystemExit(f"MMLU data in {directory} has no test/<subject>_test.csv files: pass --mmlu_dir with the "
                         "layout of the Hendrycks data.tar (dev/ and test/ CSV folders).")
    return dev, [q for questions in test.values() for q in questions]


def _block(q: Question, with_answer: bool) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(CHOICES, q.options))
    return f"{q.question}{options}\nAnswer:" + (f" {q.answer}\n\n" if with_answer else "")


def few_shot_prompt(question: Question, shots: list[Question]) -> str:
    header = f"The following are multiple choice questions (with answers) about {question.subject.replace('_', ' ')}.\n\n"
    return header + "".join(_block(s, True) for s in shots) + _block(question, False)


def is_correct(prediction: str, answer: str) -> bool:
    return prediction.strip().startswith(answer)


def run_mmlu(model, tokenizer, questions: list[Question], dev: dict[str, list[Question]], out_path: Path,
             meta: dict, k: int = 5, batch_size: int = 8, wrap: Callable[[str], str] = lambda p: p) -> dict:
    """Score `questions` (those not yet in `out_path`) by the letter the model generates.

    `wrap` applies a chat/instruction template to the whole few-shot prompt (default: none, as InstructEval).
    """
    prompts = [wrap(few_shot_prompt(q, dev.get(q.subject, [])[:k])) for q in questions]

    def record(index: int, prediction: str) -> None:
        q = questions[index]
        append_score(out_path, {**meta, "question_id": q.question_id, "turn": 1, "category": q.subject,
                                "score": float(is_correct(prediction, q.answer)), "judgment": prediction,
                                "reference": q.answer})

    # Two new tokens hold " B" whichever way the tokenizer splits the space and the letter.
    generate_answers(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=2, on_answer=record,
                     desc="mmlu")
    return {"scored_now": len(questions)}
