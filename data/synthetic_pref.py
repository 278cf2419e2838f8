"""fed-synthetic-pref: preference pairs derived from fed-synthetic (no download).

Every fed-synthetic sample becomes a pair: the prompt is its instruction, `chosen` the correct answer and
`rejected` a plausible wrong one (an off-by-one number, a wrong order, the word in the wrong language, ...).
Clients keep fed-synthetic's Dirichlet task skew and sizes; the held-out test pairs come from its balanced test
set, so preference accuracy is measured on prompts no client trained on.
"""
from __future__ import annotations

import random

from data.dataset import FederatedDataset
from data.registry import register_dataset
from data.synthetic import MAX_CORRUPTED_SHARE, NUMBER_WORDS, build_synthetic, clean_samples, corrupt_a_share


def _off_by_one(answer: str, rng: random.Random) -> str:
    n = int(answer)
    return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)


def _swap_adjacent(answer: str, rng: random.Random) -> str:
    """A sorted list with one neighbouring pair out of order (an off-by-one element if all are equal)."""
    xs = answer.split(", ")
    swappable = [i for i in range(len(xs) - 1) if xs[i] != xs[i + 1]]
    if not swappable:
        xs[-1] = _off_by_one(xs[-1], rng)
    else:
        i = rng.choice(swappable)
        xs[i], xs[i + 1] = xs[i + 1], xs[i]
    return ", ".join(xs)


def _unreversed(answer: str, rng: random.Random) -> str:
    """The word spelt forwards: the classic slip when asked to spell it backwards."""
    return answer[::-1]


def _capitalised(answer: str, rng: random.Random) -> str:
    return answer.capitalize()  # "APPLE RIVER" -> "Apple river": only the first letter in capitals


def _reordered(answer: str, rng: random.Random) -> str:
    return answer[::-1] if answer[::-1] != answer else answer.lower()


def _day_month_swapped(answer: str, rng: random.Random) -> str:
    day, month, year = answer.split("/")
    return f"{month}/{day}/{year}" if day != month else f"{day}/{month}/{int(year) + 1:04d}"


def _wrong_language(language: str):
    """The same number in another language (or the neighbouring number where the words coincide)."""
    def wrong(answer: str, rng: random.Random) -> str:
        n = NUMBER_WORDS[language].index(answer)
        other = NUMBER_WORDS[rng.choice([lang for lang in NUMBER_WORDS if lang != language])][n]
        return other if other != answer else NUMBER_WORDS[language][n + 1 if n < 20 else n - 1]
    return wrong


WRONG_ANSWERS = {
    "add": _off_by_one, "multiply": _off_by_one, "maximum": _off_by_one, "count_letters": _off_by_one,
    "sort": _swap_adjacent, "reverse": _unreversed, "uppercase": _capitalised, "acronym": _reordered,
    "date": _day_month_swapped, "spanish_number": _wrong_language("Spanish"),
    "french_number": _wrong_language("French"), "german_number": _wrong_language("German"),
}


def to_pair(sample: dict, rng: random.Random) -> dict:
    """A fed-synthetic sample as a preference pair: the correct answer over a plausible wrong one."""
    rejected = WRONG_ANSWERS[sample["task"]](sample["response"], rng)
    return {"prompt": sample["instruction"], "chosen": sample["response"], "rejected": rejected,
            "task": sample["task"]}


def clean_samples_beside(dataset: FederatedDataset, size: int, seed: int) -> list[dict]:
    """`size` clean generated samples of `dataset`'s kind (pairs, made as fed-synthetic-pref makes them, for
    preference data) whose instructions are in neither its test set nor its clients' data: the public anchors
    (data/anchor_quality.py) and retrieval pool (data/feddca.py) beside a fed-synthetic dataset."""
    from data.quality import sample_pair
    taken = {sample_pair(s)[0] for s in dataset.test} | {sample_pair(s)[0] for c in dataset.clients for s in c}
    samples = clean_samples(size, seed, exclude=taken)
    if dataset.kind != "preference":
        return samples
    rng = random.Random(seed + 3)
    return [to_pair(s, rng) for s in samples]


def build_synthetic_pref(num_clients: int = 20, alpha: float = 0.3, seed: int = 0,
                         mean_samples: int = 64) -> FederatedDataset:
    sft = build_synthetic(num_clients, alpha, seed, mean_samples)
    rng = random.Random(seed + 7)  # independent of the draws that made the SFT samples
    return FederatedDataset(
        name="fed-synthetic-pref", kind="preference", client_ids=sft.client_ids,
        clients=[[to_pair(s, rng) for s in samples] for samples in sft.clients],
        test=[to_pair(s, rng) for s in sft.test], client_metadata=sft.client_metadata,
        info={**sft.info, "derived_from": "fed-synthetic", "rejected": "plausible wrong answer per task"})


@register_dataset("fed-synthetic-pref")
def fed_synthetic_pref(synthetic_num_clients: int = 20, synthetic_alpha: float = 0.3, synthetic_seed: int = 0,
                       synthetic_mean_samples: int = 64, **_) -> FederatedDataset:
    return build_synthetic_pref(synthetic_num_clients, synthetic_alpha, synthetic_seed, synthetic_mean_samples)


def build_noisy_synthetic_pref(num_clients: int = 20, alpha: float = 0.3, seed: int = 0,
                               mean_samples: int = 64) -> FederatedDataset:
    """fed-synthetic-pref with a known share of each client's pairs flipped (the wrong answer marked chosen), the
    share varying per client as in fed-synthetic-noisy (U(0, MAX_CORRUPTED_SHARE)); each pair is marked
    {"corrupted": ...}, the test pairs stay clean: the preference setting of the data quality methods."""
    base = build_synthetic_pref(num_clients, alpha, seed, mean_samples)
    clients, metadata = corrupt_a_share(base, random.Random(seed * 104_729 + 5),
                                        lambda p, rng: {**p, "chosen": p["rejected"], "rejected": p["chosen"]})
    return FederatedDataset(
        name="fed-synthetic-pref-noisy", kind="preference", client_ids=base.client_ids, clients=clients,
        test=base.test, client_metadata=metadata,
        info={**base.info, "corrupted": f"a share U(0, {MAX_CORRUPTED_SHARE}) of each client's pairs, chosen and "
                                        "rejected swapped"})


@register_dataset("fed-synthetic-pref-noisy")
def fed_synthetic_pref_noisy(synthetic_num_clients: int = 20, synthetic_alpha: float = 0.3, synthetic_seed: int = 0,
                             synthetic_mean_samples: int = 64, **_) -> FederatedDataset:
    return build_noisy_synthetic_pref(synthetic_num_clients, synthetic_alpha, synthetic_seed, synthetic_mean_samples)
