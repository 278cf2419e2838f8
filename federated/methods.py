"""The run's federated method, built from its arguments: the server rule named by --fed_alg (federated/algorithms.py)
composed with the LoRA method named by --lora_method (federated/lora_methods.py). The one place that knows both, so
neither module needs the other's builder."""
from __future__ import annotations

from federated.algorithms import make_rule
from federated.lora_methods import compose


def make_algorithm(fed_args, num_clients: int):
    """--fed_alg composed with --lora_method (the rule itself for --lora_method standard), for num_clients clients."""
    return compose(make_rule(fed_args, num_clients), fed_args)
