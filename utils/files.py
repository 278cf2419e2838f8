"""Files that are whole or absent: a result, a done marker or a run's settings is written to a temporary file
beside it, flushed to the disk, renamed over the old one, and the rename flushed too. A reader, a killed writer or
a power loss leaves the old content or the new, never part of one (a plain write can leave a torn file, and a
rename without fsync can expose an empty one after a power loss)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def fsync_folder(folder: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to the disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush a file already written (and closed) to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_bytes_atomic(path: str | Path, data: bytes, durable: bool = True) -> None:
    """`data` into `path`, whole or not at all. `durable=False` skips both fsyncs, for a caller that flushes the
    file and its folder itself before anything refers to it (federated/client_store.py flushes before a
    checkpoint)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_folder(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj, **dumps_options) -> None:
    write_text_atomic(path, json.dumps(obj, **dumps_options))


def reads_as_json(path: str | Path) -> bool:
    """The file exists and parses: not torn by a writer that was killed (or wrote it without the above)."""
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True
