"""Exact-match scoring on a dataset's held-out test set (fed-synthetic), per task and overall.

    python -m evaluation.exact_match --checkpoint OUTPUT_DIR/checkpoint-R [--base_model smollm2]
    python -m evaluation.exact_match --base_model smollm2 --template alpaca     # the base model alone
"""
from __future__ import annotations

import argparse
from collections import defaultdict

from data.synthetic import exact_match
from evaluation.generate import generate_answers
from evaluation.models import add_scoring_args, report_scores, scoring_target_from_args
from utils.templates import prompt_text


def score_exact_match(model, tokenizer, template: str, test: list[dict], batch_size: int = 16,
                      max_new_tokens: int = 24) -> dict:
    """{'accuracy': overall, 'per_task': {task: accuracy}, 'n': count} with greedy decoding."""
    prompts = [prompt_text(template, tokenizer, s["instruction"]) for s in test]
    answers = generate_answers(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               desc="exact match")
    per_task = defaultdict(list)
    for sample, answer in zip(test, answers):
        # Models often continue after the answer; the first line is the answer.
        first_line = answer.strip().split("\n")[0]
        per_task[sample.get("task", "all")].append(exact_match(first_line, sample["response"]))
    hits = [h for v in per_task.values() for h in v]
    return {"accuracy": sum(hits) / len(hits), "n": len(hits),
            "per_task": {k: sum(v) / len(v) for k, v in sorted(per_task.items())}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scoring_args(parser, default_dataset="fed-synthetic")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    args = parser.parse_args(argv)
    target = scoring_target_from_args(args)
    scores = score_exact_match(target.model, target.tokenizer, target.template, target.test,
                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    return report_scores(scores, args.output)


if __name__ == "__main__":
    main()
