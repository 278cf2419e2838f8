"""Smoke-mode scoring of one checkpoint on a few held-out samples per task (exact match, or DPO preference accuracy).

    python -m utils.smoke_eval --checkpoint RUN/checkpoint-2 --per_task 2 --output RUN/smoke_eval.json

The full held-out sets of fed-synthetic(-pref) take many minutes per model on a shared CPU; run_all's smoke mode
scores a balanced subset instead: the first `per_task` test samples of every task.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def balanced_subset(test: list[dict], per_task: int) -> list[dict]:
    """The first `per_task` samples of each task, in the test set's order."""
    taken: dict[str, int] = {}
    subset = []
    for sample in test:
        task = sample.get("task", "all")
        if taken.get(task, 0) < per_task:
            taken[task] = taken.get(task, 0) + 1
            subset.append(sample)
    return subset


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--per_task", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=16, help="exact match: answer length cap")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    from peft import PeftModel

    from data import load_federated_dataset
    from utils.model import load_base_model, load_tokenizer

    run_args = json.loads((Path(args.checkpoint).parent / "args.json").read_text())
    base, template = run_args.get("model_name_or_path", "smollm2"), run_args.get("template", "alpaca")
    options = {k: v for k, v in run_args.items() if k.startswith("synthetic_")}
    dataset = load_federated_dataset(run_args["dataset"], **options)
    test = balanced_subset(dataset.test or [], args.per_task)
    if not test:
        raise SystemExit(f"Dataset {run_args['dataset']} has no held-out test set for smoke scoring.")
    tokenizer = load_tokenizer(base)
    model = PeftModel.from_pretrained(load_base_model(base), args.checkpoint)
    if dataset.kind == "preference":
        from evaluation.preference import score_preferences
        scores = score_preferences(model, tokenizer, template, test, beta=run_args.get("dpo_beta", 0.1))
    else:
        from evaluation.exact_match import score_exact_match
        scores = score_exact_match(model, tokenizer, template, test, max_new_tokens=args.max_new_tokens)
    scores["subset"] = f"first {args.per_task} held-out samples per task"
    Path(args.output).write_text(json.dumps(scores, indent=2))
    print(json.dumps({k: v for k, v in scores.items() if k != "per_task"}))
    return scores


if __name__ == "__main__":
    main()
