"""Evaluate a base model and LoRA checkpoints: answers, judgments and closed-ended scores.

    python -m evaluation.run --checkpoints runs/aya/checkpoint-100 runs/aya/checkpoint-200 \
        --benchmarks mtbench vicuna advbench aya mmlu humaneval

Each benchmark is judged by the authors' judge (MT-Bench gpt-4-1106-preview, the others gpt-4) unless
--judge_model (all) or --judge_models BENCH=MODEL (some) say otherwise. Everything lands under --output_dir
as JSONL, appended as made:
    <benchmark>/answers/<model_id>.jsonl             one row per question (all turns)
    <benchmark>/judgments/<model_id>__<judge>.jsonl  one row per (question, turn, judge settings), score -1 if
                                                     unparseable
A rerun skips what is already there (judgments with the same settings), and loads no model when nothing is
left to answer or score. Missing data of any benchmark and bad judge settings fail before any model is
loaded. `--limit N` answers a seeded subset balanced over categories, languages or subjects; its question
ids go to <benchmark>/subset.json.
"""
from __future__ import annotations

import argparse
import logging
import re
from collections import defaultdict
from pathlib import Path

from evaluation import humaneval, mmlu, mmlu_harness
from evaluation.answers import answer_benchmark, read_answers
from evaluation.benchmarks import BENCHMARKS, REF_GPT4_CHOICES, Assets, Benchmark, ref_gpt4_prompts
from evaluation.data import load_judge_prompts
from evaluation.judge import AUTO, PARSERS, RESPONSE_FORMATS, JudgeConfig, LLMJudge, judge_all
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
    p.add_argument("--eval_data_dir", default=None, help="local evaluation data (layout in docs/EVALUATION.md)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=None, help="cap the paper's lengths (smoke runs)")
    p.add_argument("--limit", type=int, default=None,
                   help="N questions of each benchmark, the same number per category/language/subject (seeded)")
    p.add_argument("--subset_seed", type=int, default=0, help="which --limit subset; recorded in subset.json")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the answers")
    p.add_argument("--judge_model", default=None,
                   help="one judge for every benchmark; default: the authors' (mtbench gpt-4-1106-preview, else gpt-4)")
    p.add_argument("--judge_models", nargs="+", default=[], metavar="BENCH=MODEL",
                   help="a judge for some benchmarks, e.g. mtbench=gpt-4o vicuna=gpt-4 (wins over --judge_model)")
    p.add_argument("--judge_allow_unlisted", action="store_true",
                   help="judge under a --judge_model the endpoint's GET /v1/models does not list")
    p.add_argument("--judge_turns", choices=["all", "1"], default="all",
                   help="1: judge MT-Bench turn 1 only (for tables that read only MT-Bench-1)")
    p.add_argument("--ref_gpt4_prompts", choices=REF_GPT4_CHOICES, default="authors",
                   help="authors: FedLLM-Bench's judge prompts, read from their scripts at a pinned commit (our "
                        "wording, labelled, when they cannot be had); own: this project's wording")
    p.add_argument("--judge_base_url", default=None, help="OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    p.add_argument("--judge_concurrency", type=int, default=4)
    p.add_argument("--judge_max_retries", type=int, default=JudgeConfig.max_retries)
    p.add_argument("--judge_max_tokens", type=int, default=JudgeConfig.max_tokens, help="length cap of a judgment")
    p.add_argument("--judge_timeout", type=float, default=JudgeConfig.timeout_s,
                   help="seconds a request may take once it is the oldest of this run's requests in flight")
    p.add_argument("--judge_preflight_timeout", type=float, default=JudgeConfig.preflight_s,
                   help="seconds the pre-flight keeps retrying a busy judge (timeouts, 429, 5xx)")
    p.add_argument("--judge_response_format", choices=[*RESPONSE_FORMATS, AUTO], default=JudgeConfig.response_format,
                   help="ask for {explanation, rating} JSON: json_schema (OpenAI, vLLM, llama-server, SGLang), "
                        "json_object (llama-cpp-python), auto (the first the endpoint follows, else text)")
    p.add_argument("--judge_parser", choices=list(PARSERS), default=JudgeConfig.parser,
                   help="fastchat: [[x]] or [x] (the paper's); lenient: also 'Rating: x', 'x/10'")
    p.add_argument("--judge_backoff", type=float, default=JudgeConfig.backoff_s, help="first retry delay (s)")
    p.add_argument("--rejudge_failures", action="store_true",
                   help="ask again where the score did not parse (after re-reading the stored reply)")
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


def judge_models(args) -> dict[str, str]:
    """The judge of each open benchmark: --judge_models, else --judge_model, else the authors' choice."""
    chosen = {}
    for spec in args.judge_models:
        bench, sep, model = spec.partition("=")
        if not sep or bench not in BENCHMARKS or not model:
            raise SystemExit(f"--judge_models {spec!r} is not BENCH=MODEL with BENCH one of {', '.join(BENCHMARKS)}.")
        chosen[bench] = model
    return {name: chosen.get(name) or args.judge_model or bench.judge_model for name, bench in BENCHMARKS.items()}


def judge_file_tag(bench: Benchmark, args) -> str:
    name = grader_name(bench, args)
    return slug(judge_models(args)[bench.name]) if bench.graders[name] is None else f"rule-{name}"


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
    rule = bench.graders[grader_name(bench, args)]
    tag = judge_file_tag(bench, args)
    max_turn = 1 if args.judge_turns == "1" else None
    by_id = {item.question_id: item for item in items}
    files = [out / "answers" / f"{m}.jsonl" for m in model_ids] if model_ids else \
        sorted((out / "answers").glob("*.jsonl"))
    for path in files:
        answers = read_answers(path)
        requests = [r for qid, row in answers.items() if qid in by_id
                    for r in bench.requests(by_id[qid], row["turns"], assets)
                    if max_turn is None or r.turn <= max_turn]
        meta = {"model_id": path.stem, "benchmark": bench.name, "judge": tag, **({} if rule else judge.identity())}
        counts = judge_all(requests, rule or judge.grade, out / "judgments" / f"{path.stem}__{tag}.jsonl", meta,
                           concurrency=args.judge_concurrency, rejudge_failures=args.rejudge_failures,
                           settings=None if rule else judge.settings(), reparse=None if rule else judge.parse_reply)
        logger.info("judged %s %s with %s: %s", bench.name, path.stem, tag, counts)
        if counts["errors"]:
            logger.warning("%d requests failed after retries; rerun the same command to resume", counts["errors"])


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    models = judge_models(args)
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
    needs_llm = [n for n, b in open_benches.items() if b.graders[grader_name(b, args)] is None] if judging else []
    ref_gpt4 = any(open_benches[n].ref_gpt4 for n in needs_llm)
    assets = Assets(load_judge_prompts(args.eval_data_dir) if judging else {},
                    ref_gpt4_prompts(args.ref_gpt4_prompts, args.eval_data_dir) if ref_gpt4 else {})
    # One judge per model name: benchmarks that share a judge share its connection and its pre-flight.
    judges = {model: LLMJudge(JudgeConfig(
        model=model, base_url=args.judge_base_url, max_tokens=args.judge_max_tokens,
        max_retries=args.judge_max_retries, timeout_s=args.judge_timeout, backoff_s=args.judge_backoff,
        preflight_s=args.judge_preflight_timeout, response_format=args.judge_response_format,
        parser=args.judge_parser, allow_unlisted=args.judge_allow_unlisted))
        for model in dict.fromkeys(models[n] for n in needs_llm)}
    try:
        for judge in judges.values():
            judge.preflight()
        model_ids = None
        if answering:
            model_ids = generate_all(args, open_benches, items, closed)
        elif args.checkpoints or args.include_base:
            model_ids = [t.model_id for t in resolve(args.base_model, args.checkpoints, args.template,
                                                     args.include_base)[1]]
        if judging:
            for name, bench in open_benches.items():
                judge_benchmark(args, bench, items[name], assets, judges.get(models[name]), model_ids)
            for judge in judges.values():
                if judge.retries:
                    logger.info("requests to judge %s retried %d times in all", judge.config.model, judge.retries)
    finally:
        for judge in judges.values():
            judge.close()


if __name__ == "__main__":
    main()
