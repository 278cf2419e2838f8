"""What crosses the network in a round, as Flower records: the server's instructions to a sampled client (its
ClientTask, the global vector, the server-state entries the algorithm's client hooks read, and the client's own
state kept by the server) and the client's answer (its ClientResult). Vectors travel as fp32 arrays, bit-exact.
"""
from __future__ import annotations

from dataclasses import asdict, fields

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from federated.loop import ClientResult, ClientTask

GLOBAL, SERVER, CLIENT, UPLOAD = "x", "server/", "client/", "upload/"


def _array(tensor: torch.Tensor) -> Array:
    return Array(tensor.detach().to("cpu", torch.float32).contiguous())


def _tensor(array: Array, device) -> torch.Tensor:
    return torch.from_numpy(array.numpy().copy()).to(device)


def payload_bytes(content: RecordDict) -> int:
    """The bytes of the arrays in a message: what a transfer really moves (record framing and metrics aside)."""
    return sum(len(array.data) for record in content.array_records.values() for array in record.values())


def task_content(task: ClientTask, num_clients: int, x: torch.Tensor, server_state: dict, client_state: dict,
                 shared_keys: tuple[str, ...]) -> RecordDict:
    arrays = {GLOBAL: _array(x)}
    arrays.update({SERVER + key: _array(server_state[key]) for key in shared_keys})
    arrays.update({CLIENT + key: _array(value) for key, value in client_state.items()})
    config = {k: v for k, v in asdict(task).items() if v is not None}
    config["num_clients"] = num_clients
    return RecordDict({"arrays": ArrayRecord(arrays), "task": ConfigRecord(config)})


def read_task(content: RecordDict, device) -> tuple[ClientTask, int, torch.Tensor, dict, dict]:
    """-> (task, num_clients, x, server state for the hooks, this client's kept state)."""
    config = dict(content["task"])
    names = {f.name for f in fields(ClientTask)}
    task = ClientTask(**{name: config.get(name) for name in names})
    arrays = content["arrays"]
    x = _tensor(arrays[GLOBAL], device)
    server_state = {k[len(SERVER):]: _tensor(v, device) for k, v in arrays.items() if k.startswith(SERVER)}
    client_state = {k[len(CLIENT):]: _tensor(v, "cpu") for k, v in arrays.items() if k.startswith(CLIENT)}
    return task, int(config["num_clients"]), x, server_state, client_state


def result_content(result: ClientResult) -> RecordDict:
    arrays = {}
    if result.vector is not None:
        arrays[GLOBAL] = _array(result.vector)
        arrays.update({UPLOAD + key: _array(value) for key, value in result.uploads.items()})
        arrays.update({CLIENT + key: _array(value) for key, value in result.state.items()})
    metrics = {"client": result.client, "loss": float(result.loss), "steps": result.steps,
               "train_time": result.train_time, "diverged": int(result.vector is None)}
    return RecordDict({"arrays": ArrayRecord(arrays), "result": MetricRecord(metrics)})


def read_result(content: RecordDict, device) -> ClientResult:
    metrics = content["result"]
    arrays = content["arrays"]
    vector = None if metrics["diverged"] else _tensor(arrays[GLOBAL], device)
    uploads = {k[len(UPLOAD):]: _tensor(v, device) for k, v in arrays.items() if k.startswith(UPLOAD)}
    state = {k[len(CLIENT):]: _tensor(v, "cpu") for k, v in arrays.items() if k.startswith(CLIENT)}
    return ClientResult(int(metrics["client"]), vector, uploads, state, float(metrics["loss"]), int(metrics["steps"]),
                        float(metrics["train_time"]))
