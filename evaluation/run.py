"""Evaluate a base model and LoRA checkpoints: answers, judgments and closed-ended scores.

    python -m evaluation.run --checkpoints runs/aya/checkpoint-100 runs/aya/checkpoint-200 \
        --benchmarks mtbench vicuna advbench aya mmlu humaneval --judge_model gpt-4-1106-preview

Everything lands under --output_dir as JSONL, appended as made:
    <benchmark>/answers/<model_id>.jsonl             one row per question (all turns)
    <benchmark>/judgments/<model_id>__<judge>.jsonl  one row per (question, turn), score -1 if unparseable
A rerun skips what is already there. Bad judge settings fail before any model is loaded.
"""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from evaluation.answers import answer_benchmark, read_answers
from evaluation.benchmarks import BENCHMARKS, Assets, Benchmark
from evaluation.data import load_judge_prompts
from evaluation.humaneval import run_humaneval
from evaluation.judge import JudgeConfig, LLMJudge, judge_all
from evaluation.mmlu import run_mmlu
from evaluation.models import iter_models, resolve
from utils.templates import prompt_text

logger = logging.getLogger("evaluation")

# Closed-ended benchmarks: scored locally, no judge. name -> (score file suffix, runner).
CLOSED = {
    "mmlu": ("exact-match", lambda model, tok, path, meta, args, wrap: run_mmlu(
        model, tok, path, meta, data_dir=args.mmlu_dir, k=args.mmlu_shots, limit=args.limit,
        batch_size=args.batch_size, wrap=wrap)),
    "humaneval": ("execution", lambda model, tok, path, meta, args, wrap: run_humaneval(
        model, tok, path, meta, limit=args.limit, batch_size=args.batch_size, timeout_s=args.humaneval_timeout,
        seed=args.seed, max_new_tokens=min(args.max_new_tokens or 512, 512), wrap=wrap)),
}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmarks", nargs="+", default=["mtbench", "vicuna", "advbench"],
                   choices=[*BENCHMARKS, *CLOSED])
    p.add_argument("--base_model", default=None, help="default: the checkpoints' args.json, else smollm2")
    p.add_argument("--checkpoints", nargs="*", default=[], help="PEFT adapter dirs (OUTPUT_DIR/checkpoint-N)")
    p.add_argument("--include_base", action="store_true", help="also evaluate the base model without adapter")
    p.add_argument("--template", default=None, help="override the template from each run's args.json")
    p.add_argument("--output_dir", default="eval_results")
    p.add_argument("--stage", choices=["all", "answer", "judge"], default="all")
    p.add_argument("--eval_data_dir", default=None, help="local evaluation data (layout in docs/EVALUATION.md)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=None, help="cap the paper's lengths (smoke runs)")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each benchmark")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge_model", default=JudgeConfig.model)
    p.add_argument("--judge_base_url", default=None, help="OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    p.add_argument("--judge_concurrency", type=int, default=4)
    p.add_argument("--judge_max_retries", type=int, default=JudgeConfig.max_retries)
    p.add_argument("--judge_timeout", type=float, default=JudgeConfig.timeout_s, help="seconds per request")
    p.add_argument("--judge_backoff", type=float, default=JudgeConfig.backoff_s, help="first retry delay (s)")
    p.add_argument("--rejudge_failures", action="store_true", help="ask again where the score did not parse")
    p.add_argument("--advbench_judge", choices=["paper", "corrected", "llm"], default="paper",
                   help="paper: the paper's phrase list (fused-comma quirk kept); corrected: list fixed; llm")
    p.add_argument("--mmlu_dir", default=None, help="local MMLU (dev/ and test/ CSVs); default: download")
    p.add_argument("--mmlu_shots", type=int, default=5)
    p.add_argument("--humaneval_timeout", type=float, default=10.0)
    p.add_argument("--closed_template", choices=["none", "train"], default="none",
                   help="wrap MMLU/HumanEval prompts in the training template (InstructEval: none)")
    return p.parse_args(argv)


def grader_name(bench: Benchmark, args) -> str:
    # Only AdvBench offers graders besides the LLM judge; --advbench_judge names one of them.
    return args.advbench_judge if args.advbench_judge in bench.graders else bench.default_grader


def judge_file_tag(bench: Benchmark, args) -> str:
    name = grader_name(bench, args)
    return slug(args.judge_model) if bench.graders[name] is None else f"rule-{name}"


def generate_all(args, open_benches: dict, items: dict, closed: list[str]) -> list[str]:
    settings, targets = resolve(args.base_model, args.checkpoints, args.template, args.include_base)
    out = Path(args.output_dir)
    for target, model, tokenizer in iter_models(settings, targets):
        for name, bench in open_benches.items():
            n = answer_benchmark(model, tokenizer, target.template, bench, items[name],
                                 out / name / "answers" / f"{target.model_id}.jsonl", target.model_id,
                                 args.batch_size, args.max_new_tokens, args.seed)
            logger.info("%s %s: %d questions answered now", name, target.model_id, n)
        for name in closed:
            tag, runner = CLOSED[name]
            wrap = (lambda text, t=target.template, tok=tokenizer: prompt_text(t, tok, text)) \
                if args.closed_template == "train" else (lambda text: text)
            meta = {"model_id": target.model_id, "benchmark": name, "judge": tag}
            counts = runner(model, tokenizer, out / name / "judgments" / f"{target.model_id}__{tag}.jsonl",
                            meta, args, wrap)
            logger.info("%s %s: %s", name, target.model_id, counts)
    return [t.model_id for t in targets]


def judge_benchmark(args, bench: Benchmark, items, assets: Assets, judge: LLMJudge | None,
                    model_ids: list[str] | None) -> None:
    out = Path(args.output_dir) / bench.name
    grader = bench.graders[grader_name(bench, args)] or judge.grade
    tag = judge_file_tag(bench, args)
    by_id = {item.question_id: item for item in items}
    files = [out / "answers" / f"{m}.jsonl" for m in model_ids] if model_ids else \
        sorted((out / "answers").glob("*.jsonl"))
    for path in files:
        answers = read_answers(path)
        requests = [r for qid, row in answers.items() if qid in by_id
                    for r in bench.requests(by_id[qid], row["turns"], assets)]
        meta = {"model_id": path.stem, "benchmark": bench.name, "judge": tag}
        counts = judge_all(requests, grader, out / "judgments" / f"{path.stem}__{tag}.jsonl", meta,
                           concurrency=args.judge_concurrency, rejudge_failures=args.rejudge_failures)
        logger.info("judged %s %s with %s: %s", bench.name, path.stem, tag, counts)
        if counts["errors"]:
            logger.warning("%d requests failed after retries; rerun the same command to resume", counts["errors"])


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    open_benches = {n: BENCHMARKS[n] for n in args.benchmarks if n in BENCHMARKS}
    closed = [n for n in args.benchmarks if n in CLOSED]
    # Everything that can fail fast does so before the (slow) model work: data, then the judge endpoint.
    items = {n: b.load(args.eval_data_dir)[:args.limit] for n, b in open_benches.items()}
    judging = args.stage in ("all", "judge") and bool(open_benches)
    assets = Assets(load_judge_prompts(args.eval_data_dir) if judging else {})
    needs_llm = [n for n, b in open_benches.items() if b.graders[grader_name(b, args)] is None]
    judge = None
    if judging and needs_llm:
        judge = LLMJudge(JudgeConfig(model=args.judge_model, base_url=args.judge_base_url,
                                     max_retries=args.judge_max_retries,
                                     timeout_s=args.judge_timeout, backoff_s=args.judge_backoff))
        judge.preflight()
    model_ids = None
    if args.stage in ("all", "answer"):
        model_ids = generate_all(args, open_benches, items, closed)
    elif args.checkpoints or args.include_base:
        model_ids = [t.model_id for t in resolve(args.base_model, args.checkpoints, args.template,
                                                 args.include_base)[1]]
    if judging:
        for name, bench in open_benches.items():
            judge_benchmark(args, bench, items[name], assets, judge, model_ids)
        if judge is not None and judge.retries:
            logger.info("judge requests retried %d times in all", judge.retries)


if __name__ == "__main__":
    main()
