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


MIN_TASK_SHARE = 0.05  # a client's own test distribution: the tasks of at least this share of its mixture


def own_distribution(mixture: dict[str, float], min_share: float = MIN_TASK_SHARE) -> dict[str, float]:
    """A client's task mixture restricted to its tasks of share >= min_share, renormalised (scoring the rare ones
    would multiply the generation cost for a few percent of the weight)."""
    kept = {task: p for task, p in mixture.items() if p >= min_share}
    total = sum(kept.values())
    return {task: p / total for task, p in kept.items()}


def mixture_score(per_task: dict[str, float], distribution: dict[str, float]) -> float:
    """Expected exact match on a client's test distribution, from per-task accuracies."""
    return sum(p * per_task.get(task, 0.0) for task, p in distribution.items())


def score_personal_models(model, tokenizer, template: str, test: list[dict], load, client_models: dict,
                          mixtures: list[dict], global_per_task: dict[str, float]) -> dict:
    """Each client's own model (load(vector) puts it into `model`) scored on its own test distribution (its
    tasks' held-out samples, weighted by its task mixture), beside the global model's per-task accuracies on the
    same weighting. Returns per-client scores and their means."""
    rows = {}
    for client, vector in client_models.items():
        distribution = own_distribution(mixtures[client])
        load(vector)
        own = [s for s in test if s.get("task") in distribution]
        per_task = score_exact_match(model, tokenizer, template, own)["per_task"]
        rows[str(client)] = {"personal": mixture_score(per_task, distribution),
                             "global": mixture_score(global_per_task, distribution),
                             "tasks": distribution, "personal_per_task": per_task}
    mean = {key: sum(r[key] for r in rows.values()) / len(rows) if rows else float("nan")
            for key in ("personal", "global")}
    return {"clients": rows, "mean_personal": mean["personal"], "mean_global": mean["global"],
            "min_task_share": MIN_TASK_SHARE}


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
