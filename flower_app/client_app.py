"""The Flower ClientApp: one node = one client of the federation (its partition-id).

query: load and tokenise this node's data, answer with its partition and sample count. train: build the model
and trainer on first use, run the round's ClientTask through federated.loop.train_client, the same client part
as the in-process loop (the algorithm's client hooks and hooks.finish included), and answer with the vector, the
algorithm's uploads and the state the client keeps. Data, model and trainer are kept in the process for the run:
a simulation actor serves all its messages from them. A Flower 1.42 SuperNode starts a new ClientApp process for
every message, so there the process forwards the query and plain train messages to the node's warm worker
(flower_app/node_worker.py), which runs the same functions and keeps all of it across messages.

The client's kept state (SCAFFOLD's c_i, FedCOG's last local model) lives on the server and comes with each task
(docs/FLOWER.md: why); under SecAgg+ FedCOG's stays on the node instead, in its Flower Context.state.

With run-config secagg, train messages are SecAgg+ stages and go through Flower's secaggplus_mod in the ClientApp
process: in its masked-vector stage the node trains and answers in the legacy FitRes layout (its update y - x and
its weight), which the mod masks; nothing else of the node's training leaves it but its loss, steps and time. A
node of a secure run refuses a plain train message (it would send its own update in the clear).
"""
from __future__ import annotations

import logging

import logging
import os
import sys

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from flower_app.config import parse_node_config, parse_run_config

logger = logging.getLogger(__name__)

app = ClientApp()
_WORKER: dict = {}  # run id -> this process's Worker; one run at a time per process


def worker(context: Context):
    if context.run_id not in _WORKER:
        from flower_app.training import Worker
        from utils.console import configure_console

        settings = parse_run_config(context.run_config)
        configure_console(settings.script_args.log_level)
        _WORKER.clear()  # a new run: free the previous run's model
        _WORKER[context.run_id] = Worker(settings)
    return _WORKER[context.run_id]


def node_client(context: Context):
    return worker(context).client(context.node_id, parse_node_config(context.node_config))


def forwards() -> bool:
    """Whether this process hands its message to the node's warm worker: yes in a deployment's one-message
    ClientApp process; no in a simulation actor (Ray), which is warm itself, or with FEDLLM_WARM_WORKER=0."""
    return "ray" not in sys.modules and os.environ.get("FEDLLM_WARM_WORKER", "1") != "0"


def forward(kind: str, msg: Message, context: Context) -> Message:
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from flower_app.worker_link import call

    answer = call(kind, recorddict_to_proto(msg.content).SerializeToString(), context.run_id, context.node_id,
                  dict(context.node_config), dict(context.run_config))
    return Message(recorddict_from_proto(ProtoRecordDict.FromString(answer)), reply_to=msg)


@app.query()
def describe(msg: Message, context: Context) -> Message:
    if forwards():
        return forward("query", msg, context)
    return Message(answer_query(context), reply_to=msg)


def answer_query(context: Context) -> RecordDict:
    client = node_client(context)
    node = parse_node_config(context.node_config)
    answer = {"partition_id": node.partition_id, "num_samples": 0 if client is None else len(client.data)}
    if node.num_partitions is not None:
        answer["num_partitions"] = node.num_partitions
    return RecordDict({"node": ConfigRecord(answer)})


@app.train()
def train(msg: Message, context: Context) -> Message:
    if RECORD_KEY_CONFIGS in msg.content.config_records:  # a SecAgg+ stage
        if not worker(context).settings.flower.secagg:
            raise RuntimeError("a SecAgg+ message in a run without run-config secagg")
        from flwr.client.mod import secaggplus_mod
        return secaggplus_mod(msg, context, train_for_secure_sum)
    if forwards():
        return forward("train", msg, context)
    return Message(train_content(msg.content, context), reply_to=msg)


def train_content(content: RecordDict, context: Context) -> RecordDict:
    """A plain train message's answer: the round's task trained, the result as a record."""
    from flower_app.messages import read_task, result_content

    if worker(context).settings.flower.secagg:
        raise RuntimeError("this run has run-config secagg=true: a node never sends its update outside SecAgg+")
    client, trainer = node_trainer(context)
    task, num_clients, x, server_state, kept = read_task(content, trainer.flat.device)
    result = run_task(context, client, trainer, task, num_clients, x, server_state, kept)
    return result_content(result)


def train_for_secure_sum(msg: Message, context: Context) -> Message:
    """SecAgg+'s masked-vector stage: train, answer with the update and its weight for secaggplus_mod to mask.
    The client's kept state (FedCOG's last model and draw count) stays on the node, in its Flower Context.state:
    the server, which keeps it in plain runs, must not see a client's trained vector here."""
    from flower_app.messages import read_node_kept, read_secure_task, secure_reply, write_node_kept
    from flower_app.secure import secure_update

    client, trainer = node_trainer(context)
    task, num_clients, weight, x = read_secure_task(msg.content, trainer.flat.device)
    kept = read_node_kept(context.state, trainer.flat.device)
    result = run_task(context, client, trainer, task, num_clients, x, {}, kept)
    if result.vector is not None and result.state:  # a diverged client keeps its previous state, as in process
        write_node_kept(context.state, result.state)
    settings = worker(context).settings
    update, metrics = secure_update(result, x, settings.fed_args, settings.flower.secagg_clipping_range)
    weight = 0 if result.vector is None else weight  # a diverged client withdraws from the sum
    return Message(secure_reply(result, update, weight, metrics), reply_to=msg)


def node_trainer(context: Context):
    client = node_client(context)
    if client is None:
        raise RuntimeError(f"node {context.node_id} holds no client of this run but was sent a task")
    return client, worker(context).trainer_for(client)


def run_task(context: Context, client, trainer, task, num_clients: int, x, server_state: dict, kept: dict):
    from federated.fedcog import with_consensus_generation
    from federated.methods import make_algorithm
    from federated.loop import train_client

    if task.client != client.partition_id:
        raise RuntimeError(f"node {context.node_id} holds client {client.partition_id}, not {task.client}")
    node = worker(context)
    s, f = node.script_args, node.settings.fed_args
    # FedCOG with fedcog (its kept model and draw count come with the task, as SCAFFOLD's c_i), else the rule itself
    algorithm = with_consensus_generation(make_algorithm(f, num_clients), f, node.tokenizer, s.template,
                                          {client.partition_id: client.samples}, s.seq_length,
                                          node.fedcog_dataset(), s.seed)
    # Bound on the round's global vector, not on the model, which in a Ray actor holds the last client it trained
    # (personal adapters keep B's shared init from it).
    algorithm.bind(trainer.trainer.model, trainer.flat, x)
    return train_client(trainer, algorithm, task, client.data, x, server_state, {task.client: kept})
