"""Evaluate a base model and LoRA checkpoints: answers, judgments and closed-ended scores.

    python -m evaluation.run --checkpoints runs/aya/checkpoint-100 runs/aya/checkpoint-200 \
        --benchmarks mtbench vicuna advbench aya mmlu humaneval --judge_model gpt-4-1106-preview

Everything lands under --output_dir as JSONL, appended as made:
    <benchmark>/answers/<model_id>.jsonl             one row per question (all turns)
    <benchmark>/judgments/<model_id>__<judge>.jsonl  one row per (question, turn), score -1 if unparseable
A rerun skips what is already there, and loads no model when nothing is left to answer or score. Missing data
of any benchmark and bad judge settings fail before any model is loaded. `--limit N` answers a seeded subset
balanced over categories, languages or subjects; its question ids go to <benchmark>/subset.json.
"""
from __future__ import annotations

import argparse
import logging
import re
from collections import defaultdict
from pathlib import Path

from evaluation import humaneval, mmlu, mmlu_harness
from evaluation.answers import answer_benchmark, read_answers
from evaluation.benchmarks import BENCHMARKS, Assets, Benchmark
from evaluation.data import load_judge_prompts
from evaluation.judge import PARSERS, RESPONSE_FORMATS, JudgeConfig, LLMJudge, judge_all
from evaluation.models import iter_models, resolve
from evaluation.scores import done_keys
from evaluation.subsets import record_subset, stratified_subset
from utils.templates import prompt_text

logger = logging.getLogger("evaluation")


class MMLU:
    """MMLU 5-shot: lm-evaluation-harness by default, the InstructEval letter match as an option."""
    stratum = staticmethod(lambda q: q.subject)
    question_id = staticmethod(lambda q: q.question_id)

    def tag(self, args) -> str:
        return "lm-eval" if args.mmlu_harness == "lm-eval" else "exact-match"

    def load(self, args) -> list:
        if args.mmlu_harness == "lm-eval":
            mmlu_harness.check_installed()
            if args.closed_template == "train":
                raise SystemExit("--closed_template train wraps prompts in the training template, which the harness's "
                                 "prompts do not take: add --mmlu_harness instructeval, or drop --closed_template.")
        self.dev, questions = mmlu.load_mmlu(args.mmlu_dir)
        self.test = defaultdict(list)
        for q in questions:
            self.test[q.subject].append(q)
        return questions

    def score(self, model, tokenizer, todo, out_path, meta, args, wrap) -> dict:
        if args.mmlu_harness == "lm-eval":
            return mmlu_harness.run_mmlu_lm_eval(model, tokenizer, todo, self.dev, self.test, out_path, meta,
                                                 k=args.mmlu_shots, batch_size=args.batch_size)
        return mmlu.run_mmlu(model, tokenizer, todo, self.dev, out_path, meta, k=args.mmlu_shots,
                             batch_size=args.batch_size, wrap=wrap)


class HumanEval:
    """HumanEval pass@1, executed locally; see evaluation/humaneval.py for how code is taken from an answer."""
    stratum = staticmethod(lambda problem: "")
    question_id = staticmethod(lambda problem: problem["task_id"])

    def tag(self, args) -> str:
        return "execution"

    def load(self, args) -> list:
        if args.humaneval_no_network:
            humaneval.check_no_network()
        return humaneval.load_problems()

    def score(self, model, tokenizer, todo, out_path, meta, args, wrap) -> dict:
        return humaneval.run_humaneval(
            model, tokenizer, todo, out_path, meta, batch_size=args.batch_size, timeout_s=args.humaneval_timeout,
            seed=args.seed, max_new_tokens=min(args.max_new_tokens or humaneval.MAX_NEW_TOKENS,
                                               humaneval.MAX_NEW_TOKENS),
            wrap=wrap, extract=args.humaneval_extract, memory_mb=args.humaneval_memory_mb or None,
            no_network=args.humaneval_no_network)


# Closed-ended benchmarks: scored locally, no judge.
CLOSED = {"mmlu": MMLU, "humaneval": HumanEval}


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
    p.add_argument("--eval_data_dir", default=None, help="local copy with the layout of ../shared/eval_data")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=None, help="cap the paper's lengths (smoke runs)")
    p.add_argument("--limit", type=int, default=None,
                   help="N questions of each benchmark, the same number per category/language/subject (seeded)")
    p.add_argument("--subset_seed", type=int, default=0, help="which --limit subset; recorded in subset.json")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the answers")
    p.add_argument("--judge_model", default=JudgeConfig.model)
    p.add_argument("--judge_base_url", default=None, help="OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    p.add_argument("--judge_concurrency", type=int, default=4)
    p.add_argument("--judge_max_retries", type=int, default=JudgeConfig.max_retries)
    p.add_argument("--judge_max_tokens", type=int, default=JudgeConfig.max_tokens, help="length cap of a judgment")
    p.add_argument("--judge_timeout", type=float, default=JudgeConfig.timeout_s,
                   help="seconds without a reply, not counting time queued behind this run's own requests")
    p.add_argument("--judge_response_format", choices=list(RESPONSE_FORMATS), default=JudgeConfig.response_format,
                   help="json_schema: ask for {explanation, rating} JSON (structured output, if the server has it)")
    p.add_argument("--judge_parser", choices=list(PARSERS), default=JudgeConfig.parser,
                   help="fastchat: [[x]] or [x] (the paper's); lenient: also 'Rating: x', 'x/10'")
    p.add_argument("--judge_backoff", type=float, default=JudgeConfig.backoff_s, help="first retry delay (s)")
    p.add_argument("--rejudge_failures", action="store_true", help="ask again where the score did not parse")
    p.add_argument("--advbench_judge", choices=["paper", "corrected", "llm"], default="paper",
                   help="paper: the paper's phrase list (fused-comma quirk kept); corrected: list fixed; llm")
    p.add_argument("--mmlu_dir", default=None, help="local MMLU (dev/ and test/ CSVs); default: download")
    p.add_argument("--mmlu_shots", type=int, default=5)
    p.add_argument("--mmlu_harness", choices=["lm-eval", "instructeval"], default="lm-eval",
                   help="lm-eval: EleutherAI's harness, log-likelihood of the letters; instructeval: generated letter")
    p.add_argument("--humaneval_timeout", type=float, default=10.0)
    p.add_argument("--humaneval_extract", choices=humaneval.EXTRACT_MODES, default="auto",
                   help="auto: code from chat answers (fences, full functions); completion: the paper's blank-line cut")
    p.add_argument("--humaneval_memory_mb", type=int, default=4096, help="address-space limit per test (0: none)")
    p.add_argument("--humaneval_no_network", action="store_true",
                   help="run each test in a new network namespace (unshare --net)")
    p.add_argument("--closed_template", choices=["none", "train"], default="none",
                   help="wrap MMLU/HumanEval prompts in the training template (InstructEval: none)")
    return p.parse_args(argv)


def grader_name(bench: Benchmark, args) -> str:
    # Only AdvBench offers graders besides the LLM judge; --advbench_judge names one of them.
    return args.advbench_judge if args.advbench_judge in bench.graders else bench.default_grader


def judge_file_tag(bench: Benchmark, args) -> str:
    name = grader_name(bench, args)
    return slug(args.judge_model) if bench.graders[name] is None else f"rule-{name}"


def select(name: str, entries: list, question_id, stratum, args) -> list:
    """The --limit subset of a benchmark's questions, recorded in <output_dir>/<name>/subset.json."""
    chosen = stratified_subset(entries, args.limit, args.subset_seed, stratum)
    record_subset(Path(args.output_dir) / name / "subset.json", [question_id(e) for e in chosen],
                  [stratum(e) for e in chosen], args.limit, args.subset_seed)
    return chosen


def generate_all(args, open_benches: dict, items: dict, closed: dict) -> list[str]:
    """Answer the open benchmarks and score the closed ones for every target. The model is loaded only for the
    targets that have something left to do: a rerun after a finished answer stage loads nothing."""
    settings, targets = resolve(args.base_model, args.checkpoints, args.template, args.include_base)
    out = Path(args.output_dir)

    def pending(target) -> bool:
        answered = [read_answers(out / name / "answers" / f"{target.model_id}.jsonl") for name in open_benches]
        if any(i.question_id not in done for name, done in zip(open_benches, answered) for i in items[name]):
            return True
        return any(closed_todo(target, name) for name in closed)

    def closed_todo(target, name) -> list:
        bench, entries = closed[name]
        done = done_keys(out / name / "judgments" / f"{target.model_id}__{bench.tag(args)}.jsonl")
        return [e for e in entries if (bench.question_id(e), 1) not in done]

    todo_targets = [t for t in targets if pending(t)]
    if not todo_targets:
        logger.info("every answer and score is already there: no model loaded")
    for target, model, tokenizer in iter_models(settings, todo_targets) if todo_targets else ():
        for name, bench in open_benches.items():
            n = answer_benchmark(model, tokenizer, target.template, bench, items[name],
                                 out / name / "answers" / f"{target.model_id}.jsonl", target.model_id,
                                 args.batch_size, args.max_new_tokens, args.seed)
            logger.info("%s %s: %d questions answered now", name, target.model_id, n)
        for name, (bench, _) in closed.items():
            wrap = (lambda text, t=target.template, tok=tokenizer: prompt_text(t, tok, text)) \
                if args.closed_template == "train" else (lambda text: text)
            tag = bench.tag(args)
            meta = {"model_id": target.model_id, "benchmark": name, "judge": tag}
            counts = bench.score(model, tokenizer, closed_todo(target, name),
                                 out / name / "judgments" / f"{target.model_id}__{tag}.jsonl", meta, args, wrap)
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
        meta = {"model_id": path.stem, "benchmark": bench.name, "judge": tag,
                **(judge.identity() if bench.graders[grader_name(bench, args)] is None else {})}
        counts = judge_all(requests, grader, out / "judgments" / f"{path.stem}__{tag}.jsonl", meta,
                           concurrency=args.judge_concurrency, rejudge_failures=args.rejudge_failures)
        logger.info("judged %s %s with %s: %s", bench.name, path.stem, tag, counts)
        if counts["errors"]:
            logger.warning("%d requests failed after retries; rerun the same command to resume", counts["errors"])


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    open_benches = {n: BENCHMARKS[n] for n in args.benchmarks if n in BENCHMARKS}
    answering = args.stage in ("all", "answer")
    # Everything that can fail fast does so before the (slow) model work: every benchmark's data, then the judge.
    items = {n: select(n, b.load(args.eval_data_dir), lambda i: i.question_id, b.stratum, args)
             for n, b in open_benches.items()}
    closed = {}
    for name in (n for n in args.benchmarks if n in CLOSED and answering):
        bench = CLOSED[name]()
        closed[name] = bench, select(name, bench.load(args), bench.question_id, bench.stratum, args)
    judging = args.stage in ("all", "judge") and bool(open_benches)
    assets = Assets(load_judge_prompts(args.eval_data_dir) if judging else {})
    needs_llm = [n for n, b in open_benches.items() if b.graders[grader_name(b, args)] is None]
    judge = None
    if judging and needs_llm:
        judge = LLMJudge(JudgeConfig(model=args.judge_model, base_url=args.judge_base_url,
                                     max_tokens=args.judge_max_tokens, max_retries=args.judge_max_retries,
                                     timeout_s=args.judge_timeout, backoff_s=args.judge_backoff,
                                     response_format=args.judge_response_format, parser=args.judge_parser))
    try:
        if judge is not None:
            judge.preflight()
        model_ids = None
        if answering:
            model_ids = generate_all(args, open_benches, items, closed)
        elif args.checkpoints or args.include_base:
            model_ids = [t.model_id for t in resolve(args.base_model, args.checkpoints, args.template,
                                                     args.include_base)[1]]
        if judging:
            for name, bench in open_benches.items():
                judge_benchmark(args, bench, items[name], assets, judge, model_ids)
            if judge is not None and judge.retries:
                logger.info("judge requests retried %d times in all", judge.retries)
    finally:
        if judge is not None:
            judge.close()


if __name__ == "__main__":
    main()
