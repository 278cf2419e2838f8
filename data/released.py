"""The released FedLLM-Bench file format: one JSON object mapping client id to a list of samples.

The authors' local-training files (`local_en.json`, `local_154.json`, ...) are plain lists of samples: read as
one client named after the file. A released file of a dataset whose tables choose clients by language
(Fed-Aya) carries no languages: they are recovered from the text (data/languages.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from data.dataset import FederatedDataset, read_utf8, validate
from data.languages import RECOVERED_FOR, recover_client_languages


def infer_kind(sample: dict) -> str:
    if "conversations" in sample:
        return "multiturn"
    if "chosen" in sample or "rejected" in sample:
        return "preference"
    return "sft"


def _object(pairs: list[tuple], repeated: list[str]) -> dict:
    """A JSON object as a dict; `repeated` becomes the keys it repeats (json keeps a repeated key's last value)."""
    obj = dict(pairs)
    repeated[:] = [] if len(obj) == len(pairs) else [key for key in obj if sum(k == key for k, _ in pairs) > 1]
    return obj


def load_released_file(path: str, kind: str | None = None, name: str | None = None) -> FederatedDataset:
    file = Path(path)
    if file.is_dir():
        candidates = sorted(file.glob("*.json"))
        if len(candidates) != 1:
            raise SystemExit(f"--local_data_dir {path} is a directory with {len(candidates)} JSON files; "
                             "pass the one federated file itself.")
        file = candidates[0]
    if not file.exists():
        raise SystemExit(f"Dataset file {path} does not exist: check --local_data_dir (the released JSON file).")
    repeated: list[str] = []  # the keys repeated in the last JSON object the parser closed: the file's own
    try:
        data = json.loads(read_utf8(file, "Local data file"), object_pairs_hook=lambda pairs: _object(pairs, repeated))
    except json.JSONDecodeError as err:
        raise SystemExit(f"Dataset file {file} is not valid JSON ({err}); it must be one JSON object mapping "
                         "client id to a list of samples.") from err
    if isinstance(data, list):  # a local-training file: one client's samples
        data = {file.stem: data}
    if isinstance(data, dict) and repeated:
        raise SystemExit(f"Dataset file {file} holds client id {repeated[0]!r} more than once (JSON keeps only "
                         f"the last one's samples): give each client one id, merging or renaming the duplicates.")
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise SystemExit(f"Dataset file {file} must be one JSON object mapping client id to a list of samples "
                         "(the released FedLLM-Bench format) or one list of samples (a local-training file), "
                         "not a " + type(data).__name__ + " of other values.")
    first = next((s for v in data.values() for s in v if isinstance(s, dict)), {})
    ds = validate(FederatedDataset(name=name or file.stem, kind=kind or infer_kind(first),
                                   client_ids=[str(k) for k in data], clients=list(data.values()),
                                   info={"source": str(file), "local_file": str(file)}))
    if name in RECOVERED_FOR:
        ds = recover_client_languages(ds, RECOVERED_FOR[name])
    return ds
