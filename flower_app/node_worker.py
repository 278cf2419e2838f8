"""A node's warm worker for a Flower deployment: one process per SuperNode that keeps the tokenizer, the node's
tokenised data, the model and the trainer across messages, so that a round does not pay them again.

Flower 1.42's SuperNode starts a new ClientApp process for every message (docs/FLOWER.md, "What each costs"):
Python, torch/transformers/peft/trl imports, the model and the data load, before a few seconds of training. The
ClientApp process (flower_app/client_app.py) now only forwards the message: on the first message it starts this
worker (detached, in its own session), and every message after goes over a Unix socket to the same worker, which
answers with the same code the ClientApp ran in process (client_app.answer_query, client_app.train_content).
Secure-aggregation stages stay in the ClientApp process (secaggplus_mod keeps its state in Flower's context).

The socket lives in a folder only this user can enter (0700) and takes connections only with the key in that
folder (multiprocessing's HMAC challenge). The worker ends when its SuperNode process is gone, or after IDLE_S
without a message.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Client, Listener
from pathlib import Path

IDLE_S = float(os.environ.get("FEDLLM_WORKER_IDLE_S", 1800))  # a worker without a message this long ends
START_S = 600.0  # the longest wait for a new worker to listen (imports on a busy machine)
APP_ROOT = Path(__file__).resolve().parents[1]  # the folder holding flower_app (the installed app)


def folder() -> Path:
    path = Path(tempfile.gettempdir()) / f"fedllm-nodes-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    if path.stat().st_mode & 0o077 or path.stat().st_uid != os.getuid():
        raise RuntimeError(f"{path} must belong to this user with mode 0700: remove it and retry")
    return path


def _key(base: Path) -> bytes:
    key_file = base / "key"
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return key_file.read_bytes()


def call(kind: str, content_bytes: bytes, run_id: int, node_id: int, node_config: dict, run_config: dict,
         supernode_pid: int | None = None) -> bytes:
    """Send one message's content to this node's worker (started when none listens) and return its answer's
    content, both as Flower's protobuf bytes. The worker's failure is raised here, with its reason. A new worker
    lives as long as `supernode_pid` (default: this process's parent, the SuperNode that started it)."""
    import fcntl

    base = folder()
    socket = base / f"node-{node_id}.sock"
    key = _key(base)
    with open(base / f"node-{node_id}.lock", "w") as lock:  # one message at a time starts or reaches the worker
        fcntl.flock(lock, fcntl.LOCK_EX)
        connection = _connect(socket, key) or _start(socket, key, node_id, supernode_pid or os.getppid())
        with connection:
            connection.send((kind, content_bytes, run_id, node_id, node_config, run_config))
            status, answer = connection.recv()
    if status != "ok":
        raise RuntimeError(answer)
    return answer


def _connect(socket: Path, key: bytes):
    try:
        return Client(str(socket), family="AF_UNIX", authkey=key)
    except (FileNotFoundError, ConnectionRefusedError):
        socket.unlink(missing_ok=True)  # a worker that ended leaves its socket file
        return None


def _start(socket: Path, key: bytes, node_id: int, supernode_pid: int):
    log = socket.with_suffix(".log")
    with open(log, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "flower_app.node_worker", str(socket), str(supernode_pid)],
                                   cwd=APP_ROOT, env={**os.environ, "PYTHONPATH": str(APP_ROOT)},
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"node {node_id}'s worker exited with {process.returncode}: "
                               f"{log.read_text(errors='replace')[-2000:]}")
        connection = _connect(socket, key) if socket.exists() else None
        if connection is not None:
            return connection
        time.sleep(0.1)
    raise RuntimeError(f"node {node_id}'s worker did not listen within {START_S:g} s: see {log}")


# --- the worker process ------------------------------------------------------------------------------------------

def serve(socket: Path, supernode_pid: int) -> None:
    from flwr.app import Context, RecordDict
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from flower_app import client_app  # the imports, once

    last = [time.monotonic()]
    busy = threading.Lock()
    threading.Thread(target=_watch, args=(socket, supernode_pid, last, busy), daemon=True).start()
    listener = Listener(str(socket), family="AF_UNIX", authkey=_key(socket.parent))
    print(f"node worker {os.getpid()} listening on {socket}", flush=True)
    while True:
        try:
            connection = listener.accept()
        except Exception:  # a connection without the key, or one that dropped during the handshake
            continue
        with busy, connection:
            kind, content_bytes, run_id, node_id, node_config, run_config = connection.recv()
            try:
                context = Context(run_id, node_id, node_config, RecordDict(), run_config)
                if kind == "query":
                    answer = client_app.answer_query(context)
                else:
                    content = recorddict_from_proto(ProtoRecordDict.FromString(content_bytes))
                    answer = client_app.train_content(content, context)
                connection.send(("ok", recorddict_to_proto(answer).SerializeToString()))
            except BaseException as err:  # noqa: BLE001 (SystemExit too: its message is the reason to send back)
                if isinstance(err, KeyboardInterrupt):
                    raise
                traceback.print_exc()
                connection.send(("error", f"{type(err).__name__}: {err}"))
            last[0] = time.monotonic()


def _watch(socket: Path, supernode_pid: int, last: list, busy: threading.Lock) -> None:
    """End the worker when its SuperNode is gone or it has been idle IDLE_S (never during a message)."""
    while True:
        time.sleep(2.0)
        gone = not _alive(supernode_pid)
        if (gone or time.monotonic() - last[0] > IDLE_S) and busy.acquire(blocking=False):
            print(f"node worker {os.getpid()} ends: {'its SuperNode is gone' if gone else 'idle'}", flush=True)
            socket.unlink(missing_ok=True)
            os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
