"""Batched answer generation: the one place where the model writes text for every benchmark.

Prompts are sorted by length and generated in left-padded batches (a decoder-only model continues from the
last position, so padding must sit on the left), then put back in their original order. Greedy batched output
equals one-by-one output: the attention mask hides the padding and the position ids are derived from it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

# Below this temperature sampling is treated as greedy, as FastChat does for MT-Bench's 0.0 categories.
GREEDY_BELOW = 1e-4


@contextmanager
def untruncated(tokenizer):
    """Lift the tokenizer's model_max_length while evaluating: a tokenizer from training carries the training
    seq_length there, which is no limit on evaluation prompts and only makes transformers warn "Token indices
    sequence length is longer than the specified maximum" (nothing is cut either way)."""
    saved = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e30)  # transformers' own "no limit" value
    try:
        yield tokenizer
    finally:
        tokenizer.model_max_length = saved


def _decoding_kwargs(tokenizer, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float) -> dict:
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    if do_sample and temperature >= GREEDY_BELOW:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        # Explicit values override any sampling defaults in the model's generation_config.
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def _batches(prompts: Sequence[str], tokenizer, batch_size: int) -> list[list[int]]:
    """Indices of `prompts` grouped into batches of similar token length (less padding, same results)."""
    lengths = [len(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _generate_batch(model, tokenizer, texts: list[str], kwargs: dict, strip: bool) -> list[str]:
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    new_tokens = out[:, enc["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [t.strip() for t in texts] if strip else texts


def generate_answers(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 8, max_new_tokens: int = 256,
                     do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                     on_answer: Callable[[int, str], None] | None = None, progress=None,
                     strip: bool = True, desc: str = "generating") -> list[str]:
    """Answers to fully formatted `prompts` (template already applied), in input order.

    `on_answer(index, text)` is called as each answer is made, so callers can append it to disk at once.
    `strip=False` keeps surrounding whitespace (code completions start with indentation).
    `progress`: a tqdm bar to advance (one bar across many calls); by default each call shows its own.
    With sampling, `seed` seeds each batch (seed + batch number), so a run is reproducible for a given
    batch size; greedy decoding does not depend on the batch size.
    """
    was_training = model.training
    model.eval()
    kwargs = _decoding_kwargs(tokenizer, max_new_tokens, do_sample, temperature, top_p)
    answers: list[str | None] = [None] * len(prompts)
    bar = progress if progress is not None else tqdm(total=len(prompts), desc=desc, unit="answer", dynamic_ncols=True)
    try:
        with untruncated(tokenizer):
            for number, indices in enumerate(_batches(prompts, tokenizer, batch_size)):
                if seed is not None:
                    torch.manual_seed(seed + number)
                texts = _generate_batch(model, tokenizer, [prompts[i] for i in indices], kwargs, strip)
                for i, text in zip(indices, texts):
                    answers[i] = text
                    if on_answer is not None:
                        on_answer(i, text)
                bar.update(len(indices))
    finally:
        if progress is None:
            bar.close()
        model.train(was_training)
    return answers
