"""Language groups for Table 6 (FedSamLang, FedSimLang) and fed-synthetic's stand-in language labels.

Groups built from Aya-schema source files (fed-aya-similar) are tested with the builders in test_data_builders.py.
"""
from __future__ import annotations

import pytest

from data.groups import LANGUAGE_FAMILIES, client_groups
from data.registry import FederatedDataset, load_federated_dataset
from data.synthetic import STAND_IN_LANGUAGES


def labelled(languages: list[str] | None, name: str = "toy") -> FederatedDataset:
    """One one-sample client per language label (no metadata at all when `languages` is None)."""
    n = len(languages) if languages else 2
    return FederatedDataset(name=name, kind="sft", client_ids=[f"c{i}" for i in range(n)],
                            clients=[[{"instruction": f"q{i}", "response": "a"}] for i in range(n)],
                            client_metadata=[{"language": lang} for lang in languages] if languages else [])


def test_client_groups_same_and_similar_language(caplog):
    ds = labelled(["English", "Spanish", "Telugu", "English", "Simplified Chinese", "French", "Russian",
                   "Standard Arabic", "Portuguese", "German", "Korean", "Telugu"])
    same = client_groups(ds, "same_language")
    assert same["English"] == [0, 3] and same["Telugu"] == [2, 11] and len(same) == 10
    with caplog.at_level("INFO", logger="data.groups"):
        similar = client_groups(ds, "similar_language")
    assert similar == {"english-german": [0, 3, 9], "romance": [1, 5, 8], "cjk": [4, 10], "slavic": [6],
                       "arabic-urdu-persian": [7]}
    assert "Telugu (2)" in caplog.text and all(" " not in name for name in LANGUAGE_FAMILIES)
    assert client_groups(ds, "similar_language", families={"only-english": ("English",)}) == {"only-english": [0, 3]}
    with caplog.at_level("INFO", logger="data.groups"):
        kept = client_groups(ds, "same_language", skip=("Telugu",))
    assert "Telugu" not in kept and len(kept) == 9 and kept["English"] == [0, 3]
    assert "groups skipped (--skip_groups): Telugu (2 clients)" in caplog.text
    with pytest.raises(SystemExit, match="no client of toy speaks a language of the groups"):
        client_groups(labelled(["Telugu"]), "similar_language")
    with pytest.raises(SystemExit, match="language"):
        client_groups(labelled(None), "same_language")
    with pytest.raises(SystemExit, match="Unknown"):
        client_groups(ds, "by_country")


def test_the_five_groups_are_the_papers():
    assert {name: set(members) for name, members in LANGUAGE_FAMILIES.items()} == {
        "arabic-urdu-persian": {"Standard Arabic", "Urdu", "Iranian Persian"},
        "romance": {"French", "Italian", "Spanish", "Portuguese"},
        "english-german": {"English", "German"},
        "slavic": {"Russian", "Polish", "Ukrainian"},
        "cjk": {"Simplified Chinese", "Traditional Chinese", "Japanese", "Korean"}}


@pytest.mark.parametrize("name", ["fed-synthetic", "fed-synthetic-pref"])
def test_synthetic_clients_carry_round_robin_stand_in_languages(name):
    from data.fedllm_bench import AYA_LANGUAGES

    assert sorted(STAND_IN_LANGUAGES) == sorted(AYA_LANGUAGES)
    ds = load_federated_dataset(name, synthetic_num_clients=10)
    assert [m["language"] for m in ds.client_metadata] == [STAND_IN_LANGUAGES[i % 8] for i in range(10)]
    assert ds.client_metadata[1]["language"] == "English" and ds.client_metadata[8]["language"] == "Standard Arabic"
    same = client_groups(ds, "same_language")
    assert same["Standard Arabic"] == [0, 8] and same["Telugu"] == [6] and len(same) == 8
    similar = client_groups(ds, "similar_language")
    assert similar == {"arabic-urdu-persian": [0, 8], "english-german": [1, 9], "romance": [2, 3, 4],
                       "slavic": [5], "cjk": [7]}


def test_group_folders_are_safe_names_inside_the_output_folder(tmp_path):
    """Language names come from the data: '/', '..' and spaces must not reach a path, and two names that clean
    to the same folder are refused rather than mixed into one run."""
    from federated.config import FedArguments, ScriptArguments
    from federated.setup import group_runs
    ds = labelled(["Chinese/Simplified", "../../etc", "Simplified Chinese", "Español"])
    runs = group_runs(ds, ScriptArguments(output_dir=str(tmp_path), client_groups="same_language"),
                      FedArguments(num_clients=4))
    folders = [run_args.output_dir for _, _, run_args, _ in runs]
    assert folders == [f"{tmp_path}/group-{name}" for name in
                       ("Chinese_Simplified", ".._.._etc", "Simplified_Chinese", "Español")]
    with pytest.raises(SystemExit, match="groups 'Simplified Chinese' and 'Simplified/Chinese' would share the "
                                         "folder group-Simplified_Chinese"):
        group_runs(labelled(["Simplified Chinese", "Simplified/Chinese"]),
                   ScriptArguments(output_dir=str(tmp_path), client_groups="same_language"),
                   FedArguments(num_clients=2))
