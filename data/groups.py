"""Client groups for the multilingual exploration (Table 6): one global adapter per group.

`same_language` puts clients of one language together (FedSamLang; the group's name is the language).
`similar_language` puts clients of similar languages together (FedSimLang), in the paper's five groups
(FedLLM-Bench, Section 4.2), named by Aya `language` values:
  arabic-urdu-persian  Standard Arabic, Urdu, Iranian Persian
  romance              French, Italian, Spanish, Portuguese
  english-german       English, German
  slavic               Russian, Polish, Ukrainian
  cjk                  Simplified Chinese, Traditional Chinese, Japanese, Korean
Nine of these languages are not Fed-Aya's: their clients come from `fed-aya-similar` (data.fedllm_bench).
Telugu is in no group, so its clients take part in no FedSimLang federation. `families` overrides the groups;
`skip` names groups to train in no federation (Table 6 reads no Telugu column, so its FedSamLang run skips Telugu).
"""
from __future__ import annotations

import logging

from data.dataset import FederatedDataset

logger = logging.getLogger(__name__)

LANGUAGE_FAMILIES = {
    "arabic-urdu-persian": ("Standard Arabic", "Urdu", "Iranian Persian"),
    "romance": ("French", "Italian", "Spanish", "Portuguese"),
    "english-german": ("English", "German"),
    "slavic": ("Russian", "Polish", "Ukrainian"),
    "cjk": ("Simplified Chinese", "Traditional Chinese", "Japanese", "Korean"),
}
GROUP_MODES = ("same_language", "similar_language")


def client_languages(dataset: FederatedDataset) -> list[str]:
    languages = [meta.get("language") for meta in dataset.client_metadata] if dataset.client_metadata else []
    if len(languages) != dataset.num_clients or not all(languages):
        raise SystemExit(f"--client_groups needs each client's language, which {dataset.name} does not carry: "
                         "build fed-aya from its source, or load the released file as --dataset fed-aya "
                         "--local_data_dir FILE (its languages are then recovered from the text).")
    return languages


def client_groups(dataset: FederatedDataset, mode: str, families: dict[str, tuple[str, ...]] = LANGUAGE_FAMILIES,
                  skip: tuple[str, ...] = ()) -> dict[str, list[int]]:
    """{group name: [client indices]} for mode `same_language` or `similar_language`, in client order.

    With `similar_language`, clients whose language no family lists join no group (one INFO line names them).
    """
    if mode not in GROUP_MODES:
        raise SystemExit(f"Unknown --client_groups {mode!r}: choose one of {', '.join(GROUP_MODES)}.")
    family_of = {language: family for family, members in families.items() for language in members}
    groups: dict[str, list[int]] = {}
    left_out: dict[str, int] = {}
    for index, language in enumerate(client_languages(dataset)):
        name = language if mode == "same_language" else family_of.get(language)
        if name is None:
            left_out[language] = left_out.get(language, 0) + 1
            continue
        groups.setdefault(name, []).append(index)
    if left_out:
        logger.info("similar_language: clients of %s are in no language group and join no federation",
                    ", ".join(f"{language} ({count})" for language, count in left_out.items()))
    skipped = {name: len(groups.pop(name)) for name in skip if name in groups}
    if skipped:
        logger.info("%s: groups skipped (--skip_groups): %s", mode,
                    ", ".join(f"{name} ({count} clients)" for name, count in skipped.items()))
    if not groups:
        raise SystemExit(f"--client_groups {mode}: no client of {dataset.name} speaks a language of the groups "
                         f"({', '.join(families)}); use fed-aya-similar or same_language.")
    return groups
