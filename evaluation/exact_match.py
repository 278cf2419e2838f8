"""Exact-match scoring on a dataset's held-out test set (fed-synthetic), per task and overall.

    python -m evaluation.exact_match --checkpoint OUTPUT_DIR/checkpoint-R [--base_model smollm2]
    python -m evaluation.exact_match --base_model smollm2 --template alpaca     # the base model alone
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from data.synthetic import exact_match
from evaluation.generate import generate_answers
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
        first_line = answer.strip().split("\n")[0] if answer.strip() else ""
        per_task[sample.get("task", "all")].append(exact_match(first_line, sample["response"]))
    hits = [h for v in per_task.values() for h in v]
    return {"accuracy": sum(hits) / len(hits), "n": len(hits),
            "per_task": {k: sum(v) / len(v) for k, v in sorted(per_task.items())}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a checkpoint-<round> folder of a training run")
    parser.add_argument("--base_model", help="default: the run's model_name_or_path, else smollm2")
    parser.add_argument("--template", help="default: the run's template, else alpaca")
    parser.add_argument("--dataset", help="default: the run's dataset, else fed-synthetic")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--per_task", type=int, help="score only the first N samples of each task")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--output", help="write the scores as JSON here")
    args = parser.parse_args(argv)

    from evaluation.models import scoring_target

    target = scoring_target(args.checkpoint, args.base_model, args.template, args.dataset, "fed-synthetic",
                            args.per_task)
    scores = score_exact_match(target.model, target.tokenizer, target.template, target.test,
                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    print(json.dumps(scores, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(scores, indent=2))
    return scores


if __name__ == "__main__":
    main()
