"""A node's warm worker for a Flower deployment: one process per SuperNode that keeps the tokenizer, the node's
tokenised data, the model and the trainer across messages, so that a round does not pay them again.

Flower 1.42's SuperNode starts a new ClientApp process for every message (docs/FLOWER.md, "What each costs"):
Python, torch/transformers/peft/trl imports, the model and the data load, before a few seconds of training. The
ClientApp process (flower_app/client_app.py) only forwards a query or plain train message through
flower_app/worker_link.py to this process, which answers with the same functions the ClientApp runs in process
(client_app.answer_query, client_app.train_content). Secure-aggregation stages stay in the ClientApp process
(secaggplus_mod keeps their state in Flower's context).

    python -m flower_app.node_worker <socket> <SuperNode pid>     (started by worker_link, not by hand)
"""
from __future__ import annotations

import sys
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from flower_app import client_app
from flower_app.worker_link import serve


def answer(kind: str, content_bytes: bytes, run_id: int, node_id: int, node_config: dict,
           run_config: dict) -> bytes:
    """One forwarded message's answer, as the ClientApp would give it in process, in protobuf bytes."""
    context = Context(run_id, node_id, node_config, RecordDict(), run_config)
    if kind == "query":
        reply = client_app.answer_query(context)
    else:
        reply = client_app.train_content(recorddict_from_proto(ProtoRecordDict.FromString(content_bytes)), context)
    return recorddict_to_proto(reply).SerializeToString()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]), answer)
