"""The dataset registry: a name maps to a builder that returns one FederatedDataset (data/dataset.py).

Builders (fed-synthetic, the FedLLM-Bench source builders) register themselves with `@register_dataset(name)`;
a released-format file (data/released.py) is read by `load_federated_dataset(local_data_dir=...)` or
`--dataset released`.
"""
from __future__ import annotations

import importlib
from typing import Callable

from data.dataset import FederatedDataset, validate
from data.released import load_released_file

DATASETS: dict[str, Callable[..., FederatedDataset]] = {}
# Modules whose import registers builders; imported lazily so that `import data` stays cheap.
_BUILDER_MODULES = ["data.synthetic", "data.synthetic_pref", "data.fedllm_bench"]


def register_dataset(name: str):
    def wrap(fn):
        DATASETS[name] = fn
        return fn
    return wrap


def _import_builders() -> None:
    for module in _BUILDER_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real missing dependency inside the module
                raise


def available_datasets() -> list[str]:
    _import_builders()
    return sorted(DATASETS)


def load_federated_dataset(name: str | None = None, local_data_dir: str | None = None, kind: str | None = None,
                           **options) -> FederatedDataset:
    """Build the dataset `name`, or load the released-format file `local_data_dir` (which wins when given)."""
    _import_builders()
    if local_data_dir:
        return load_released_file(local_data_dir, kind=kind, name=name)
    if name not in DATASETS:
        raise SystemExit(f"Unknown --dataset {name!r}: choose one of {', '.join(sorted(DATASETS))}, "
                         "or pass --local_data_dir FILE with a released-format JSON file.")
    return validate(DATASETS[name](**options))


@register_dataset("released")
def released(path: str | None = None, **_) -> FederatedDataset:
    if not path:
        raise SystemExit("--dataset released needs --local_data_dir FILE (a released-format JSON file).")
    return load_released_file(path)
