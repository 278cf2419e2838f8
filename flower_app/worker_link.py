"""The link between a deployment's one-message ClientApp processes and their node's warm worker
(flower_app/node_worker.py): a Unix socket per node, the worker started on first use, one message at a time.

The socket lives in a folder only this user can enter (0700) and takes connections only with the key in that
folder (multiprocessing's HMAC challenge). A worker ends when its SuperNode process is gone, or after IDLE_S
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


# --- the worker's side -------------------------------------------------------------------------------------------

def serve(socket: Path, supernode_pid: int, handle) -> None:
    """Answer messages on `socket` with `handle(kind, content_bytes, run_id, node_id, node_config, run_config) ->
    answer bytes`, one at a time, until the SuperNode is gone or IDLE_S pass without one. A failure of `handle`
    (SystemExit included: its message is the reason) goes back to the caller as the error."""
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
            request = connection.recv()
            try:
                connection.send(("ok", handle(*request)))
            except BaseException as err:  # noqa: BLE001
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
