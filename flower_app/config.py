"""The Flower app's configuration: run-config keys that mirror the entry scripts' flags, parsed into the same
dataclasses (ScriptArguments, FedArguments, DPOArguments) and checked by the same check_arguments, plus the few
settings only a networked run has (FlowerArguments). Node-config keys say which data a node holds.

A run-config key is a flag's name with dashes: --fed_alg fedavg is `fed-alg = "fedavg"`. TOML has no null, so
a flag whose default is None has the default "" (empty string), read back as None.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from federated.config import FedArguments, ScriptArguments

TASKS = ("sft", "dpo")


@dataclass
class FlowerArguments:
    task: str = field(default="sft", metadata={"help": "sft (main_sft.py's training) or dpo (main_dpo.py's)"})
    min_replies: int = field(default=1, metadata={"help": "a round needs at least this many clients to answer; "
                                                          "with fewer, its failed clients are asked again "
                                                          "(round-retries), then the run stops"})
    round_retries: int = field(default=1, metadata={"help": "times a round's failed clients are asked again when "
                                                            "fewer than min-replies answered"})
    round_timeout: float = field(default=3600.0, metadata={"help": "seconds to wait for a round's replies; a "
                                                                   "client that has not answered by then failed"})
    wait_for_nodes: float = field(default=120.0, metadata={"help": "seconds the start waits without a new node "
                                                                   "answering (the wait starts again with each "
                                                                   "one) for a node of every client (partition)"})
    secagg: bool = field(default=False, metadata={"help": "Flower's secure aggregation (SecAgg+): the server sees "
                                                          "only the weighted sum of the clients' updates "
                                                          "(FedAvg-family rules; docs/FLOWER.md)"})
    secagg_num_shares: float = field(default=1.0, metadata={"help": "SecAgg+: nodes each client's key is shared "
                                                                    "with, itself included: an integer > 2, or a "
                                                                    "fraction <= 1 of the round's clients (1.0: all)"})
    secagg_reconstruction_threshold: float = field(default=0.67, metadata={
        "help": "SecAgg+: shares needed to rebuild a key: an integer >= 2, or a fraction <= 1 of num-shares"})
    secagg_clipping_range: float = field(default=1.0, metadata={
        "help": "SecAgg+: each coordinate of a client's update (y - x, times its weight / the largest weight) is "
                "clipped to [-range, range] before quantization"})
    secagg_quantization_range: int = field(default=4194304, metadata={
        "help": "SecAgg+: levels of the quantization of [-clipping-range, clipping-range] (2^22); the mean's error "
                "per coordinate is at most 2 clipping-range / quantization-range for equal weights"})


def _dpo_arguments():
    from main_dpo import DPOArguments  # main_dpo.py owns the DPO flags
    return DPOArguments


def config_classes() -> list[type]:
    return [ScriptArguments, FedArguments, _dpo_arguments(), FlowerArguments]


def key_of(name: str) -> str:
    return name.replace("_", "-")


def default_run_config() -> dict:
    """Every run-config key with its default, as [tool.flwr.app.config] in pyproject.toml lists them."""
    defaults = {}
    for cls in config_classes():
        instance = cls()
        for f in fields(cls):
            value = getattr(instance, f.name)
            defaults[key_of(f.name)] = "" if value is None else value
    defaults["dataset"] = ""  # the task's default: fed-synthetic (sft) or fed-synthetic-pref (dpo)
    return defaults


@dataclass
class RunSettings:
    task: str
    script_args: ScriptArguments
    fed_args: FedArguments
    dpo_args: object | None  # DPOArguments for task dpo
    flower: FlowerArguments

    @property
    def configs(self) -> list:
        """The dataclasses args.json records: those of the entry script this run mirrors."""
        return [c for c in (self.script_args, self.fed_args, self.dpo_args) if c is not None]


def parse_run_config(run_config: dict, check: bool = True) -> RunSettings:
    """Context.run_config -> the entry scripts' dataclasses; an unknown key or a bad value is one clear line."""
    known = {f.name: cls for cls in config_classes() for f in fields(cls)}
    values: dict[type, dict] = {cls: {} for cls in config_classes()}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name not in known or "_" in key:
            raise SystemExit(f"Unknown run-config key {key!r}: the keys mirror the flags of main_sft.py/main_dpo.py "
                             f"with dashes (see [tool.flwr.app.config] in pyproject.toml).")
        values[known[name]][name] = None if value == "" else value
    try:
        script_args, fed_args, dpo_args, flower = (cls(**values[cls]) for cls in config_classes())
    except TypeError as err:
        raise SystemExit(f"Bad run config: {err}") from None
    if flower.task not in TASKS:
        raise SystemExit(f"Run-config task {flower.task!r} is invalid: it must be one of {', '.join(TASKS)}.")
    if not script_args.dataset:
        from main_dpo import DEFAULT_DATASET
        script_args.dataset = DEFAULT_DATASET if flower.task == "dpo" else ScriptArguments.dataset
    if check:
        check_flower_arguments(script_args, fed_args, dpo_args, flower)
    return RunSettings(flower.task, script_args, fed_args, dpo_args if flower.task == "dpo" else None, flower)


def check_flower_arguments(script_args, fed_args, dpo_args, flower: FlowerArguments) -> None:
    from federated.config import check_arguments

    check_arguments(script_args, fed_args)
    from federated.lora_methods import LORA_METHODS
    if LORA_METHODS[fed_args.lora_method].folds_into_base:
        raise SystemExit(f"Run-config lora-method {fed_args.lora_method!r} is not supported by the Flower app yet: "
                         f"its residual is folded into the frozen base weights, which are not sent to the nodes. "
                         f"Use main_sft.py, or lora-method standard, ffa, hetero_rank or personal.")
    if script_args.client_groups:
        raise SystemExit("Run-config client-groups runs one federation per language group, which the Flower app does "
                         "not: start one Flower run per group (num-clients and the groups' data files), or use "
                         "main_sft.py.")
    if not (isinstance(flower.min_replies, int) and flower.min_replies >= 1):
        raise SystemExit(f"Run-config min-replies {flower.min_replies!r} is invalid: it must be an integer >= 1.")
    if not (isinstance(flower.round_retries, int) and flower.round_retries >= 0):
        raise SystemExit(f"Run-config round-retries {flower.round_retries!r} is invalid: it must be an integer >= 0.")
    for key, value in (("round-timeout", flower.round_timeout), ("wait-for-nodes", flower.wait_for_nodes)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise SystemExit(f"Run-config {key} {value!r} is invalid: it must be a number of seconds > 0.")
    if flower.secagg:
        from flower_app.secure import check_secure_aggregation
        check_secure_aggregation(script_args, fed_args, flower)
    if flower.task == "dpo" and not (math.isfinite(dpo_args.dpo_beta) and dpo_args.dpo_beta > 0):
        raise SystemExit(f"Run-config dpo-beta {dpo_args.dpo_beta!r} is invalid: it must be a finite number > 0.")


@dataclass
class NodeData:
    """Which client a node is: its partition (the client's index in the federation, the order sampling uses) and
    where its samples come from: a partition of the run's dataset (simulation), or the silo's own file."""
    partition_id: int
    num_partitions: int | None
    data_file: str | None


def parse_node_config(node_config: dict) -> NodeData:
    """node-config keys: partition-id (required), num-partitions, data-file (a silo's own released-format JSON
    file holding this one client's samples; nothing but vectors and metrics leave the node)."""
    unknown = set(node_config) - {"partition-id", "num-partitions", "data-file"}
    if unknown:
        raise SystemExit(f"Unknown node-config key(s) {', '.join(sorted(unknown))}: use partition-id, num-partitions "
                         f"and data-file.")
    partition = node_config.get("partition-id")
    if not (isinstance(partition, int) and partition >= 0):
        raise SystemExit(f"node-config partition-id {partition!r} is invalid: start the SuperNode with --node-config "
                         f"'partition-id=N' (N >= 0: this client's index in the federation).")
    count = node_config.get("num-partitions")
    if count is not None and not (isinstance(count, int) and count > partition):
        raise SystemExit(f"node-config num-partitions {count!r} is invalid: it must be an integer > partition-id "
                         f"{partition}.")
    data_file = node_config.get("data-file") or None
    return NodeData(partition, count, data_file)
