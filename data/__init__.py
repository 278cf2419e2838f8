"""Federated datasets by name: `load_federated_dataset(name, ...)`; see data/registry.py."""
from data.registry import DATASETS, FederatedDataset, load_federated_dataset, register_dataset  # noqa: F401
