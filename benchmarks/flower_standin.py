"""A stand-in ClientApp for measuring the Flower engine at scale (benchmarks/bench_flower.py --modes standin):
the real query handler (flower_app.client_app.describe: the node's partition, its sample count, the worker's
dataset and tokenised-partition caches), and a train handler that does no forward pass: it answers the real task
message with x plus a seeded random delta of x's size, at once. So a round's time is the engine's and the
server's own: plan, messages out, replies in, aggregation, the metrics row.

bench_flower.py copies this file into a throw-away app folder next to the project's pyproject.toml with this
module as the clientapp; the project itself is found through PYTHONPATH.
"""
from __future__ import annotations

import time

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from federated.loop import ClientResult
from flower_app.client_app import describe
from flower_app.messages import read_task, result_content

app = ClientApp()
app.query()(describe)


@app.train()
def train(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    task, _, x, _, _ = read_task(msg.content, "cpu")
    generator = torch.Generator().manual_seed(task.seed * 1000 + task.client)
    y = x + 1e-3 * torch.randn(x.shape, generator=generator)
    result = ClientResult(task.client, y, {}, {}, 1.0, task.steps, time.perf_counter() - start)
    return Message(result_content(result), reply_to=msg)
