"""Each client's language recovered from its samples, for released files without language labels.

The authors' `aya_38c_25k.json` maps annotator to samples and carries no language, yet Tables 2 and 6 choose
clients by language. The Aya source maps annotators to languages, but offline only the text is there: a
language identifier runs over each client's first `PER_CLIENT` samples (instruction and response), restricted
to the languages the dataset has, and the client's language is the most common answer (an Aya annotator
writes in one language). The identifier is py3langid, langid.py's naive Bayes model with its weights shipped
inside the package (no download). Chinese is labelled Simplified Chinese: langid does not tell the two scripts
apart, and Fed-Aya has only Simplified.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from functools import lru_cache

from data.dataset import FederatedDataset

IDENTIFIER = "py3langid 0.4 (langid.py model)"
PER_CLIENT = 50  # samples identified per client; more changes nothing once one language dominates
TEXT_CHARS = 400  # characters of each sample given to the identifier
# langid's ISO 639-1 labels -> Aya `language` names, for the datasets whose released file has no languages.
FED_AYA_LANGUAGES = {"ar": "Standard Arabic", "en": "English", "es": "Spanish", "fr": "French",
                     "pt": "Portuguese", "ru": "Russian", "te": "Telugu", "zh": "Simplified Chinese"}
RECOVERED_FOR = {"fed-aya": FED_AYA_LANGUAGES}


@lru_cache(maxsize=4)
def _identifier(codes: tuple[str, ...]):
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ModuleNotFoundError:
        raise SystemExit("Recovering client languages needs py3langid (in requirements.txt): "
                         ".venv/bin/pip install py3langid==0.4.0") from None
    identifier = LanguageIdentifier.from_model_file(MODEL_FILE)
    identifier.set_languages(list(codes))
    return identifier


def sample_text(sample: dict) -> str:
    if "conversations" in sample:
        return " ".join(t.get("value", "") for t in sample["conversations"])[:TEXT_CHARS]
    parts = (sample.get("instruction") or sample.get("prompt") or "",
             sample.get("response") or sample.get("chosen") or "")
    return " ".join(parts)[:TEXT_CHARS]


def identify(texts: list[str], languages: dict[str, str]) -> Counter:
    """How many of `texts` the identifier assigns to each language (by name), among `languages`."""
    identifier = _identifier(tuple(sorted(languages)))
    return Counter(languages[identifier.classify(text)[0]] for text in texts if text.strip())


def recover_client_languages(dataset: FederatedDataset, languages: dict[str, str]) -> FederatedDataset:
    """The dataset with each client's `language` (and the counts behind it) in its client metadata."""
    metadata = []
    for samples in dataset.clients:
        counts = identify([sample_text(s) for s in samples[:PER_CLIENT]], languages)
        top = counts.most_common(1)[0][0] if counts else None
        metadata.append({"num_samples": len(samples), "language": top, "languages": dict(counts.most_common())})
    note = (f"client languages recovered with {IDENTIFIER} over each client's first {PER_CLIENT} samples "
            f"(the file has none); candidates {sorted(languages.values())}")
    return replace(dataset, client_metadata=metadata, info={**dataset.info, "client_languages": note})
