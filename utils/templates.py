"""Prompt templates and tokenisation with loss only on response tokens.

Every template turns a conversation into text segments, each marked trainable or not. Labels are masked by
prompt length: the number of tokens of each text prefix, which works for any tokenizer (we never search the
token stream for template markers, the reference code's Llama-specific trick).
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = ("alpaca", "vicuna_v1.1", "chat")


def check_template(name: str) -> str:
    if name not in TEMPLATES:
        raise SystemExit(f"Unknown --template {name!r}: choose one of {', '.join(TEMPLATES)}.")
    return name


def _alpaca_block(instruction: str) -> str:
    # The paper's template, exact spacing included: a space after the instruction, "### Response:" then
    # " {response}{eos}". The generation prompt stops at the colon, as the paper's answer scripts do ([:-1]).
    return f"### Instruction:\n{instruction} \n\n### Response:"


def segments(template: str, turns: list[tuple[str, str | None]], tokenizer) -> list[tuple[str, bool]]:
    """Text segments (text, trainable) for user/assistant `turns`; a final assistant of None is a prompt."""
    eos = tokenizer.eos_token or ""
    if template == "chat":
        return _chat_segments(turns, tokenizer)
    out: list[tuple[str, bool]] = []
    for i, (user, assistant) in enumerate(turns):
        if template == "alpaca":
            head = (ALPACA_SYSTEM + "\n\n") if i == 0 else "\n\n"
            out.append((head + _alpaca_block(user), False))
        else:  # vicuna_v1.1: "SYSTEM USER: u1 ASSISTANT: a1</s>USER: u2 ASSISTANT:"
            head = (VICUNA_SYSTEM + " ") if i == 0 else ""
            out.append((f"{head}USER: {user} ASSISTANT:", False))
        if assistant is not None:
            out.append((f" {assistant}{eos}", True))
    return out


def _chat_segments(turns, tokenizer) -> list[tuple[str, bool]]:
    messages, out, done = [], [], ""
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append((prompt[len(done):], False))
        done = prompt
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
            full = tokenizer.apply_chat_template(messages, tokenize=False)
            out.append((full[len(done):], True))
            done = full
    return out


def sample_turns(sample: dict) -> list[tuple[str, str]]:
    """(user, assistant) pairs of a released-format sample: instruction/response or conversations."""
    if "conversations" in sample:
        conv = sample["conversations"]
        if conv and conv[0].get("from") != "human":
            conv = conv[1:]  # the reference drops a leading non-human turn
        return [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv) - 1, 2)]
    return [(sample["instruction"], sample["response"])]


def prompt_text(template: str, tokenizer, instruction: str, history: list[tuple[str, str]] = ()) -> str:
    """The generation prompt for `instruction` after earlier (user, assistant) turns."""
    return "".join(text for text, _ in segments(template, [*history, (instruction, None)], tokenizer))


_LONGEST_TOKEN: dict[int, int] = {}  # id(tokenizer) -> characters of its longest vocabulary entry
_CUT_LOGGED = False  # the first cut sample is a warning, later ones debug lines


def chars_for_tokens(tokenizer, max_length: int) -> int:
    """Characters that hold more than `max_length` tokens of `tokenizer`, however the text reads: no token covers
    more characters than its longest vocabulary entry (a byte-level BPE entry is one character per byte), with a
    factor 2 so that the first max_length tokens are far from a cut."""
    if id(tokenizer) not in _LONGEST_TOKEN:
        _LONGEST_TOKEN[id(tokenizer)] = max(map(len, tokenizer.get_vocab()), default=1)
    return 2 * (max_length + 1) * _LONGEST_TOKEN[id(tokenizer)]


def bounded(texts: list[str], tokenizer, max_length: int | None) -> list[str]:
    """`texts` (read one after the other) cut where their first max_length tokens surely end, before tokenising:
    a 50 MB sample tokenised whole takes minutes and gigabytes for 512 tokens. Texts that fit come back as they
    are, and the first max_length tokens of a cut one are its own."""
    if not max_length:
        return texts
    room, out = chars_for_tokens(tokenizer, max_length), []
    for text in texts:
        out.append(text[:room])
        room = max(room - len(text), 0)
    if sum(map(len, out)) < sum(map(len, texts)):
        global _CUT_LOGGED
        log = logger.debug if _CUT_LOGGED else logger.warning
        _CUT_LOGGED = True
        log("A sample of %d characters is longer than --seq_length %d tokens can cover: only its first %d characters "
            "are tokenised (training sees its first %d tokens either way); further such samples are cut alike.",
            sum(map(len, texts)), max_length, sum(map(len, out)), max_length)
    return out


def tokenize_segments(tokenizer, segs: list[tuple[str, bool]], max_length: int | None) -> dict:
    """input_ids and assistant_masks (1 on trainable tokens), masking by the token count of each prefix."""
    segs = list(zip(bounded([t for t, _ in segs], tokenizer, max_length), [keep for _, keep in segs]))
    text = "".join(t for t, _ in segs)
    # Whole text first, cut to max_length below: verbose=False drops the tokenizer's "longer than the maximum" note.
    input_ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    mask = [0] * len(input_ids)
    prefix, start = "", 0
    for seg_text, trainable in segs:
        prefix += seg_text
        end = len(tokenizer(prefix, add_special_tokens=True, verbose=False)["input_ids"])
        if trainable:
            mask[start:end] = [1] * (end - start)
        start = end
    if max_length:
        input_ids, mask = input_ids[:max_length], mask[:max_length]
    return {"input_ids": input_ids, "assistant_masks": mask}


def tokenize_sft_sample(tokenizer, template: str, sample: dict, max_length: int | None) -> dict:
    """input_ids and labels (-100 outside the assistant's responses) of one training sample."""
    tokens = tokenize_segments(tokenizer, segments(template, sample_turns(sample), tokenizer), max_length)
    labels = [t if keep else -100 for t, keep in zip(tokens["input_ids"], tokens["assistant_masks"])]
    return {"input_ids": tokens["input_ids"], "labels": labels}
