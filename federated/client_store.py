"""What each client keeps between the rounds it is sampled in (SCAFFOLD's control c_i, a personal LoRA B), on disk.

At the paper's scale most clients are not in a given round (Fed-ChatbotPA: 747 clients, 10 sampled), and a state is
the size of the whole LoRA vector (33.6 MB for Llama-2-7B, r16 on q,v). So the server keeps no client's state in RAM:
a state is written to disk when its client finishes a round and read back when the client is next sampled. RAM and
work per round grow with the sampled clients, not with every client that ever took part.

Layout of `<output_dir>/client_state/`:
  <client>-r<version>.safetensors   one client's state as of round <version> (written atomically, fsync'd)
  index.jsonl                       one line per file written, in order: client, version, SHA-256, size

A checkpoint refers to the store by the index's length and the SHA-256 of that prefix (`manifest()`): it writes
nothing per client, and resuming from it reads exactly the states that were current at its round (later lines of
the index, from rounds that are redone, are cut off). Every state file is verified against its SHA-256 when it is
read, so a damaged or missing file is named, never silently used.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from utils.files import fsync_file, fsync_folder, write_bytes_atomic

INDEX = "index.jsonl"


class ClientStateError(RuntimeError):
    """A client-state file or the index does not match what was recorded (damaged, missing or cut)."""


def later_entry(line: bytes) -> dict | None:
    """An index line after a checkpoint's prefix, or None when it is torn (a kill or a full disk mid-append) or
    damaged: no checkpoint refers to it, so it is cut off with the rest, not a reason to refuse the checkpoint."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    whole = isinstance(entry, dict) and all(isinstance(entry.get(key), int) for key in ("client", "version"))
    return entry if whole else None


class ClientStore(Mapping):
    """client -> {name: tensor}, read from disk on access (CPU tensors). `put` writes a client's new state."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.current: dict[int, dict] = {}  # client -> its latest index entry (no tensors)
        self.versions: dict[int, list[int]] = {}  # client -> versions written, oldest first (for pruning)
        self.touched: set[int] = set()  # clients written since the last prune
        self.unsynced: list[Path] = []  # files written since the last sync()
        self.lines = 0
        self.digest = hashlib.sha256()

    @classmethod
    def fresh(cls, folder: str | Path) -> "ClientStore":
        """An empty store; what a run that never checkpointed left in `folder` is removed."""
        store = cls(folder)
        store.folder.mkdir(parents=True, exist_ok=True)
        for leftover in store.folder.iterdir():
            leftover.unlink()
        return store

    @classmethod
    def restore(cls, folder: str | Path, manifest: dict) -> "ClientStore":
        """The store as a checkpoint's `manifest` recorded it; index lines and files of later rounds are removed."""
        store = cls(folder)
        for leftover in store.folder.glob("*.tmp"):  # half-written by a killed run
            leftover.unlink()
        index = store.folder / INDEX
        kept = manifest["lines"]
        if kept and not index.is_file():
            raise ClientStateError(f"{index} is missing; the checkpoint refers to its first {kept} lines")
        lines = index.read_bytes().splitlines(keepends=True) if index.exists() else []
        if len(lines) < kept:
            raise ClientStateError(f"{index} has {len(lines)} lines, the checkpoint recorded {kept}: it was cut")
        for line in lines[:kept]:
            store._record(json.loads(line), line)
        if store.digest.hexdigest() != manifest["sha256"]:
            raise ClientStateError(f"{index} does not match the checkpoint's SHA-256 of its first {kept} lines")
        for client, entry in store.current.items():
            path = store.path(client, entry["version"])
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                raise ClientStateError(f"{path} (client {client}'s state) is missing or has the wrong size")
        for line in lines[kept:]:  # states from rounds after the checkpoint: they are redone
            entry = later_entry(line)
            if entry and entry["version"] not in store.versions.get(entry["client"], ()):
                store.path(entry["client"], entry["version"]).unlink(missing_ok=True)
        if len(lines) > kept:
            write_bytes_atomic(index, b"".join(lines[:kept]))
        store.folder.mkdir(parents=True, exist_ok=True)  # a run that kept no state may not have made it
        return store

    def _record(self, entry: dict, line: bytes) -> None:
        client = entry["client"]
        self.current[client] = entry
        self.versions.setdefault(client, []).append(entry["version"])
        self.lines += 1
        self.digest.update(line)

    def path(self, client: int, version: int) -> Path:
        return self.folder / f"{client}-r{version}.safetensors"

    def put(self, client: int, state: dict[str, torch.Tensor], version: int) -> None:
        """Store `client`'s state as of round `version` (1-based); it replaces the client's earlier state."""
        data = save_tensors({name: t.detach().cpu().contiguous() for name, t in state.items()})
        # Durable at the next sync(), before a checkpoint refers to it: a crash before that redoes the round anyway.
        write_bytes_atomic(self.path(client, version), data, durable=False)
        self.unsynced.append(self.path(client, version))
        entry = {"client": client, "version": version, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        line = (json.dumps(entry) + "\n").encode()
        with open(self.folder / INDEX, "ab") as f:
            f.write(line)
        self._record(entry, line)
        self.touched.add(client)

    def __getitem__(self, client: int) -> dict[str, torch.Tensor]:
        entry = self.current[client]
        path = self.path(client, entry["version"])
        what = f"{path} (client {client}'s state, round {entry['version']})"
        # The checkpoints before that round do not read it: a resume from one of them writes it anew.
        fix = (f"restore it from a backup, or remove the checkpoints of round {entry['version']} and later and "
               f"--resume from an earlier one")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ClientStateError(f"{what} is missing: {fix}") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ClientStateError(f"{what} does not match the SHA-256 recorded when it was written: the file is "
                                   f"damaged; {fix}")
        return load_tensors(data)

    def __iter__(self):
        return iter(sorted(self.current))

    def __len__(self) -> int:
        return len(self.current)

    def __contains__(self, client) -> bool:
        return client in self.current

    def manifest(self) -> dict:
        """What a checkpoint records of the store (after sync()): the index's length and the SHA-256 of its lines."""
        return {"lines": self.lines, "sha256": self.digest.hexdigest()}

    def sync(self) -> None:
        """Make every state and index line written so far durable, before a checkpoint refers to them."""
        for path in [*self.unsynced, self.folder / INDEX]:
            if path.exists():  # a state pruned since it was written needs no fsync
                fsync_file(path)
        fsync_folder(self.folder)
        self.unsynced.clear()

    def prune(self, checkpoint_rounds: list[int]) -> None:
        """Remove the states no checkpoint in `checkpoint_rounds` and no later round can read: for every client
        written since the last prune, all but its latest version and the latest one at or before each checkpoint."""
        for client in self.touched:
            versions = self.versions[client]
            needed = {versions[-1]} | {max((v for v in versions if v <= c), default=None) for c in checkpoint_rounds}
            for version in versions:
                if version not in needed:
                    self.path(client, version).unlink(missing_ok=True)
            self.versions[client] = [v for v in versions if v in needed]
        self.touched.clear()
