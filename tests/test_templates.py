"""SFT label masking with the real SmolLM2 tokenizer: the trained tokens are exactly the responses with their
end-of-turn marker, every prompt token is masked, for each template, single- and multi-turn."""
import pytest

from utils.templates import tokenize_sft_sample

ONE_TURN = {"instruction": "Name a prime above 10.", "response": "Eleven is one."}
TWO_TURNS = {"conversations": [{"from": "human", "value": "Hi, who are you?"}, {"from": "gpt", "value": "A helper."},
                               {"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "It is 4."}]}


def split(tokenizer, sample, template):
    tokens = tokenize_sft_sample(tokenizer, template, sample, None)
    ids, labels = tokens["input_ids"], tokens["labels"]
    assert all(label in (-100, token) for token, label in zip(ids, labels))  # a label is its token or ignored
    trained = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
    masked = tokenizer.decode([t for t, label in zip(ids, labels) if label == -100])
    return trained, masked


@pytest.mark.parametrize("template,sample,trained,prompt_parts", [
    ("alpaca", ONE_TURN, " Eleven is one.<|im_end|>", ["### Instruction:\nName a prime above 10. \n\n### Response:"]),
    ("vicuna_v1.1", TWO_TURNS, " A helper.<|im_end|> It is 4.<|im_end|>",
     ["USER: Hi, who are you? ASSISTANT:", "USER: What is 2+2? ASSISTANT:"]),
    # The model's own chat template ends an assistant turn with "<|im_end|>\n": that marker is what is trained.
    ("chat", TWO_TURNS, "A helper.<|im_end|>\nIt is 4.<|im_end|>\n",
     ["<|im_start|>user\nHi, who are you?<|im_end|>\n<|im_start|>assistant\n",
      "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]),
])
def test_only_the_responses_and_their_end_of_turn_are_trained(smol_tokenizer, template, sample, trained, prompt_parts):
    got_trained, got_masked = split(smol_tokenizer, sample, template)
    assert got_trained == trained
    assert all(part in got_masked for part in prompt_parts)
    for response in ("Eleven", "A helper", "It is 4"):
        assert response not in got_masked  # no response token is masked, so none is missing from training


class TextLengths:
    """The real tokenizer, recording the length of every text it is asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


HUGE = {"instruction": "Summarise this.", "response": " ".join(f"w{i}" for i in range(20_000))}  # 129k characters


def test_a_huge_sample_is_cut_before_tokenising_and_keeps_its_first_tokens(smol_tokenizer):
    """Only what --seq_length tokens can cover is tokenised (a 50 MB sample tokenised whole was OOM-killed), and
    the first seq_length tokens and labels are those of the whole sample."""
    from utils.templates import chars_for_tokens
    whole = tokenize_sft_sample(smol_tokenizer, "alpaca", HUGE, None)
    spy = TextLengths(smol_tokenizer)
    cut = tokenize_sft_sample(spy, "alpaca", HUGE, 64)
    assert cut == {key: ids[:64] for key, ids in whole.items()} and len(whole["input_ids"]) > 30_000
    assert max(spy.lengths) <= chars_for_tokens(smol_tokenizer, 64) < len(HUGE["response"]) / 10


def test_a_huge_preference_answer_is_cut_before_tokenising(smol_tokenizer):
    from utils.preference import tokenize_pair
    pair = {"prompt": "Summarise this.", "chosen": HUGE["response"], "rejected": "No."}
    whole = tokenize_pair(smol_tokenizer, "alpaca", pair)
    spy = TextLengths(smol_tokenizer)
    cut = tokenize_pair(spy, "alpaca", pair, 64)
    assert cut["prompt_ids"] == whole["prompt_ids"] and cut["rejected_ids"] == whole["rejected_ids"]
    answer = 64 - len(whole["prompt_ids"])  # what the collator keeps of prompt + chosen
    assert cut["chosen_ids"][:answer] == whole["chosen_ids"][:answer] and len(cut["chosen_ids"]) >= answer
    assert max(spy.lengths) < len(pair["chosen"]) / 10
