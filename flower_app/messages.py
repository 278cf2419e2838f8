"""What crosses the network in a round, as Flower records: the server's instructions to a sampled client (its
ClientTask, the global vector, the server-state entries the algorithm's client hooks read, and the client's own
state kept by the server) and the client's answer (its ClientResult). Vectors travel as fp32 arrays, bit-exact.

Under secure aggregation (flower_app/secure.py) the same task and result travel in the legacy FitIns/FitRes
layout that Flower's SecAgg+ workflow and client mod read: the task's fields in the FitIns config, the global
vector as its one parameter array; the client's update (y - x) as the FitRes parameters, which the mod masks
before anything leaves the node, its weight as num_examples, its loss and steps as metrics.

A result's own costs (ClientResult.metrics: FedCOG's generation) travel in the clear next to its loss, steps and
time, each under "metric/" + its name: they are costs, not data.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat

from federated.loop import ClientResult, ClientTask

GLOBAL, SERVER, CLIENT, UPLOAD, METRIC = "x", "server/", "client/", "upload/", "metric/"


@dataclass
class Exchange:
    """One round's traffic: the clients' results, the clients that failed (with why), the bytes really moved."""
    results: dict = field(default_factory=dict)  # client -> ClientResult
    failed: dict = field(default_factory=dict)  # client -> reason
    uploaded: int = 0
    downloaded: int = 0
    summed: object = None  # SummedUpdate: the round's mean update from secure aggregation (results: no vectors)


def _array(tensor: torch.Tensor) -> Array:
    return Array(tensor.detach().to("cpu", torch.float32).contiguous())


def _tensor(array: Array, device) -> torch.Tensor:
    return torch.from_numpy(array.numpy().copy()).to(device)


def payload_bytes(content: RecordDict) -> int:
    """The bytes of the arrays and byte strings in a message (SecAgg+'s keys, shares and masked vectors travel as
    byte strings in config records): what a transfer really moves (record framing and metrics aside)."""
    arrays = sum(len(array.data) for record in content.array_records.values() for array in record.values())
    strings = 0
    for record in content.config_records.values():
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                strings += len(item) if isinstance(item, bytes) else 0
    return arrays + strings


def _task_config(task: ClientTask, num_clients: int) -> dict:
    config = {k: v for k, v in asdict(task).items() if v is not None}
    config["num_clients"] = num_clients
    return config


def _read_task_config(config: dict) -> tuple[ClientTask, int]:
    names = {f.name for f in fields(ClientTask)}
    return ClientTask(**{name: config.get(name) for name in names}), int(config["num_clients"])


def task_content(task: ClientTask, num_clients: int, x: torch.Tensor, server_state: dict, client_state: dict,
                 shared_keys: tuple[str, ...]) -> RecordDict:
    arrays = {GLOBAL: _array(x)}
    arrays.update({SERVER + key: _array(server_state[key]) for key in shared_keys})
    arrays.update({CLIENT + key: _array(value) for key, value in client_state.items()})
    return RecordDict({"arrays": ArrayRecord(arrays), "task": ConfigRecord(_task_config(task, num_clients))})


def read_task(content: RecordDict, device) -> tuple[ClientTask, int, torch.Tensor, dict, dict]:
    """-> (task, num_clients, x, server state for the hooks, this client's kept state)."""
    task, num_clients = _read_task_config(dict(content["task"]))
    arrays = content["arrays"]
    x = _tensor(arrays[GLOBAL], device)
    server_state = {k[len(SERVER):]: _tensor(v, device) for k, v in arrays.items() if k.startswith(SERVER)}
    client_state = {k[len(CLIENT):]: _tensor(v, "cpu") for k, v in arrays.items() if k.startswith(CLIENT)}
    return task, num_clients, x, server_state, client_state


def _result_metrics(result: ClientResult) -> dict:
    """The scalars of a result (both layouts): its loss, steps, time, whether it diverged, and its own costs."""
    return {"client": result.client, "loss": float(result.loss), "steps": result.steps,
            "train_time": result.train_time, "diverged": int(result.vector is None),
            **{METRIC + key: value for key, value in result.metrics.items()}}


def _read_result_metrics(metrics) -> tuple[float, int, float, dict]:
    """-> (loss, steps, train time, the result's own costs)."""
    costs = {key[len(METRIC):]: value for key, value in metrics.items() if key.startswith(METRIC)}
    return float(metrics["loss"]), int(metrics["steps"]), float(metrics["train_time"]), costs


def result_content(result: ClientResult) -> RecordDict:
    arrays = {}
    if result.vector is not None:
        arrays[GLOBAL] = _array(result.vector)
        arrays.update({UPLOAD + key: _array(value) for key, value in result.uploads.items()})
        arrays.update({CLIENT + key: _array(value) for key, value in result.state.items()})
    return RecordDict({"arrays": ArrayRecord(arrays), "result": MetricRecord(_result_metrics(result))})


def read_result(content: RecordDict, device) -> ClientResult:
    metrics = content["result"]
    arrays = content["arrays"]
    vector = None if metrics["diverged"] else _tensor(arrays[GLOBAL], device)
    uploads = {k[len(UPLOAD):]: _tensor(v, device) for k, v in arrays.items() if k.startswith(UPLOAD)}
    state = {k[len(CLIENT):]: _tensor(v, "cpu") for k, v in arrays.items() if k.startswith(CLIENT)}
    return ClientResult(int(metrics["client"]), vector, uploads, state, *_read_result_metrics(metrics))


# --- secure aggregation: the legacy Fit layout of Flower's SecAgg+ ------------------------------------------------

def secure_task(task: ClientTask, num_clients: int, x: torch.Tensor, weight: int) -> FitIns:
    """A sampled client's instructions in a SecAgg+ round: its task, and the weight its update gets in the sum."""
    config = {**_task_config(task, num_clients), "weight": weight}
    return FitIns(ndarrays_to_parameters([x.detach().to("cpu", torch.float32).numpy()]), config)


def read_secure_task(content: RecordDict, device) -> tuple[ClientTask, int, int, torch.Tensor]:
    """-> (task, num_clients, the weight of its update, x)."""
    fitins = recorddict_compat.recorddict_to_fitins(content, keep_input=True)
    config = dict(fitins.config)
    task, num_clients = _read_task_config(config)
    x = torch.from_numpy(parameters_to_ndarrays(fitins.parameters)[0].copy()).to(device)
    return task, num_clients, int(config["weight"]), x


def secure_reply(result: ClientResult, update: np.ndarray, weight: int, metrics: dict) -> RecordDict:
    """The client's answer for secaggplus_mod: `update` (float64, so the mod's weighting and quantization lose
    nothing before its own rounding) with its weight; the mod masks the update and strips it from the reply."""
    metrics = {**_result_metrics(result), **metrics}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([update]), weight, metrics)
    return recorddict_compat.fitres_to_recorddict(fitres, keep_input=False)


NODE_KEPT = "fedllm-node-kept"  # the record of the node's Context.state that holds its kept state (secure runs)


def read_node_kept(state: RecordDict, device) -> dict[str, torch.Tensor]:
    """The client state this node kept in its Flower Context.state (secure rounds only), {} before its first."""
    record = state.array_records.get(NODE_KEPT)
    return {} if record is None else {name: _tensor(array, device) for name, array in record.items()}


def write_node_kept(state: RecordDict, kept: dict[str, torch.Tensor]) -> None:
    state[NODE_KEPT] = ArrayRecord({name: _array(tensor) for name, tensor in kept.items()})


def read_secure_result(fitres: FitRes) -> ClientResult:
    """A client's result in a secure round: no vector (the server has only the sum), its loss, steps, time and
    own costs."""
    return ClientResult(int(fitres.metrics["client"]), None, {}, {}, *_read_result_metrics(fitres.metrics))
