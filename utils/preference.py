"""Preference pairs as the model sees them: template-wrapped texts and token ids, shared by DPO training and its
evaluation, so that both score exactly the same tokens.

A pair tokenises to trl's preference format: `prompt_ids`, `chosen_ids`, `rejected_ids` (what trl's
DataCollatorForPreference pads and what DPOTrainer trains on), so client data is tokenised once per run.
"""
from __future__ import annotations

from utils.templates import bounded, prompt_text, segments


def _answer_text(template: str, tokenizer, prompt: str, answer: str) -> str:
    [text] = [text for text, trainable in segments(template, [(prompt, answer)], tokenizer) if trainable]
    return text


def pair_texts(template: str, tokenizer, sample: dict) -> dict:
    """The prompt wrapped in the template, each answer as the template's assistant turn (end-of-turn included)."""
    return {"prompt": prompt_text(template, tokenizer, sample["prompt"]),
            "chosen": _answer_text(template, tokenizer, sample["prompt"], sample["chosen"]),
            "rejected": _answer_text(template, tokenizer, sample["prompt"], sample["rejected"])}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(tokenizer, template: str, sample: dict, max_length: int | None = None) -> dict:
    """prompt_ids, chosen_ids, rejected_ids of one pair (the collator cuts prompt + answer to max_length; only
    text beyond what max_length tokens can cover is cut here, before tokenising)."""
    texts = pair_texts(template, tokenizer, sample)
    texts["prompt"], texts["chosen"] = bounded([texts["prompt"], texts["chosen"]], tokenizer, max_length)
    texts["rejected"] = bounded([texts["prompt"], texts["rejected"]], tokenizer, max_length)[1]
    # verbose=False: long pairs are expected here, the collator cuts them (no "longer than the maximum" note).
    prompt = tokenizer(texts["prompt"], verbose=False)["input_ids"]
    chosen = tokenizer(texts["prompt"] + texts["chosen"], verbose=False)["input_ids"]
    rejected = tokenizer(texts["prompt"] + texts["rejected"], verbose=False)["input_ids"]
    # The answers start where the token streams part from the prompt's: a token may merge across the boundary.
    n = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    return {"prompt_ids": chosen[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]}

