"""Preference accuracy and reward margin of a DPO adapter on a dataset's held-out pairs, next to the base model.

    python -m evaluation.preference --checkpoint OUTPUT_DIR/checkpoint-R
    python -m evaluation.preference --base_model smollm2 --template alpaca      # the base model alone
    python -m evaluation.preference --checkpoint OUTPUT_DIR/checkpoint-R --per_task 8   # a quick look on a CPU

DPO's implicit reward of an answer a is beta (log pi(a|x) - log ref(a|x)), the reference being the base model.
For an adapter we report the preference accuracy (share of pairs with reward margin > 0) and the mean margin
beta [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))]. The base model is its own reference (margin 0), so
for it we report the log-prob accuracy, log pi(c) > log pi(r), which we report for the adapter as well.
Log-probabilities are summed over the answer tokens, tokenised as in training (utils.preference).
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from evaluation.generate import untruncated
from evaluation.models import add_scoring_args, report_scores, scoring_target_from_args
from utils.preference import tokenize_pair


def left_padded(examples: list[dict], pad_token_id: int, max_length: int | None) -> dict[str, torch.Tensor]:
    """The chosen sequences then the rejected ones (prompt + answer), cut to their first max_length tokens as trl's
    collator cuts them in training, padded on the left so that every answer ends at the last position: the model
    then computes logits for the last positions only."""
    seqs, answer_lens = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for example in examples:
            ids = (example["prompt_ids"] + example[key])[:max_length]
            seqs.append(ids)
            answer_lens.append(max(0, len(ids) - len(example["prompt_ids"])))
    width = max(len(ids) for ids in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(seqs):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "answer_lens": torch.tensor(answer_lens)}


@torch.no_grad()
def answer_log_probs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the chosen and of the rejected answer tokens, one value per pair."""
    input_ids, answer_lens = batch["input_ids"], batch["answer_lens"]
    span = int(answer_lens.max())  # the last `span` tokens hold every answer
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # positions as without padding
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], position_ids=position_ids,
                   logits_to_keep=span + 1).logits[:, :-1].float()
    targets = input_ids[:, input_ids.shape[1] - span:]
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    in_answer = torch.arange(span, device=input_ids.device) >= span - answer_lens[:, None]
    return (token_logps * in_answer).sum(dim=-1).chunk(2)


def _reference_log_probs(model, batch, policy: tuple[torch.Tensor, torch.Tensor]):
    """log ref of chosen and rejected: the base model, i.e. the adapter disabled. A model without an adapter is its
    own reference, so its policy log-probs are reused instead of running the same forward pass again."""
    if not hasattr(model, "disable_adapter"):
        return policy
    with model.disable_adapter():
        return answer_log_probs(model, batch)


def pair_log_probs(model, tokenizer, template: str, pairs: list[dict], max_length: int | None,
                   batch_size: int) -> dict[str, torch.Tensor]:
    """log pi and log ref of the chosen and rejected answers of every pair."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = defaultdict(list)
    for start in range(0, len(pairs), batch_size):
        with untruncated(tokenizer):  # the collator-style cut to max_length is done in left_padded
            examples = [tokenize_pair(tokenizer, template, p) for p in pairs[start:start + batch_size]]
        batch = {k: v.to(device) for k, v in left_padded(examples, tokenizer.pad_token_id, max_length).items()}
        policy = answer_log_probs(model, batch)
        reference = _reference_log_probs(model, batch, policy)
        for key, value in zip(("chosen", "rejected", "ref_chosen", "ref_rejected"), (*policy, *reference)):
            out[key].append(value.cpu())
    model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


def _summary(margin: torch.Tensor, logprob_gap: torch.Tensor, base_gap: torch.Tensor) -> dict:
    return {"n": len(margin), "preference_accuracy": float((margin > 0).float().mean()),
            "mean_margin": float(margin.mean()), "dpo_loss": float(-torch.nn.functional.logsigmoid(margin).mean()),
            "logprob_accuracy": float((logprob_gap > 0).float().mean()),
            "base_logprob_accuracy": float((base_gap > 0).float().mean())}


def score_preferences(model, tokenizer, template: str, pairs: list[dict], beta: float = 0.1,
                      max_length: int | None = None, batch_size: int = 8) -> dict:
    """Overall and per-task scores: preference_accuracy, mean_margin and dpo_loss (the adapter against the base
    model), logprob_accuracy (the adapter) and base_logprob_accuracy (the base model)."""
    lp = pair_log_probs(model, tokenizer, template, pairs, max_length, batch_size)
    margin = beta * ((lp["chosen"] - lp["ref_chosen"]) - (lp["rejected"] - lp["ref_rejected"]))
    logprob_gap, base_gap = lp["chosen"] - lp["rejected"], lp["ref_chosen"] - lp["ref_rejected"]
    tasks = defaultdict(list)
    for i, pair in enumerate(pairs):
        tasks[pair.get("task", "all")].append(i)
    scores = _summary(margin, logprob_gap, base_gap)
    scores["beta"] = beta
    scores["per_task"] = {task: _summary(margin[idx], logprob_gap[idx], base_gap[idx])
                          for task, idx in sorted(tasks.items())}
    return scores


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scoring_args(parser, default_dataset="fed-synthetic-pref")
    parser.add_argument("--beta", type=float, help="default: the run's dpo_beta, else 0.1")
    parser.add_argument("--max_length", type=int, help="default: the run's seq_length, else no truncation")
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args(argv)
    target = scoring_target_from_args(args)
    beta = args.beta if args.beta is not None else target.run.get("dpo_beta", 0.1)
    scores = score_preferences(target.model, target.tokenizer, target.template, target.test, beta=beta,
                               max_length=args.max_length or target.run.get("seq_length"), batch_size=args.batch_size)
    return report_scores(scores, args.output)


if __name__ == "__main__":
    main()
