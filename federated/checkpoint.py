"""Run state: everything the round loop needs to continue exactly where it stopped (nanoGPT's lesson).

checkpoint-<r>/ holds the PEFT adapter (loadable with PeftModel.from_pretrained) and the run state:
run_state.safetensors (global vector, server state, torch RNG) and run_state.json (round, Python and NumPy RNG
states, the sampled clients' losses per round, and the client-state store's manifest), and checksums.json: the
SHA-256 of every other file, written last. The clients' own state (SCAFFOLD's c_i, personal B's) is not copied
into a checkpoint: it lives in <output_dir>/client_state/ (federated/client_store.py), and the checkpoint refers to
it, so a checkpoint's size does not grow with the number of clients. A checkpoint is written to a temporary folder,
fsync'd and renamed, so a crash or a power loss never leaves a half-written one under its final name; a resume
verifies the checksums and falls back to the previous good checkpoint when one fails.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from federated.client_store import ClientStore
from utils.files import fsync_file, fsync_folder

logger = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
REQUIRED = ("run_state.json", "run_state.safetensors", "adapter_model.safetensors")


@dataclass
class RunState:
    x: torch.Tensor  # global vector (fp32, on the server device: federated/flat.py)
    server_state: dict[str, torch.Tensor]
    # client -> its kept state (SCAFFOLD c_i), on disk; a plain dict only as loaded from a pre-store checkpoint
    client_store: ClientStore | dict = field(default_factory=dict)
    round: int = 0  # rounds completed
    round_losses: list[dict[int, float]] = field(default_factory=list)  # per round: sampled client -> loss (-1 dropped)
    extra: dict = field(default_factory=dict)  # JSON-able state of optional parts (e.g. a privacy accountant)


def _tensors(run: RunState) -> dict[str, torch.Tensor]:
    tensors = {"x": run.x, "torch_rng": torch.get_rng_state()}
    tensors.update({f"server/{k}": v for k, v in run.server_state.items()})
    return {k: v.contiguous() for k, v in tensors.items()}


def save_checkpoint(output_dir: str | Path, run: RunState, model) -> Path:
    final = Path(output_dir) / f"checkpoint-{run.round}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    save_file(_tensors(run), tmp / "run_state.safetensors")
    py_state = random.getstate()
    np_state = np.random.get_state()
    meta = {"round": run.round, "round_losses": [sorted(losses.items()) for losses in run.round_losses],
            "extra": run.extra, "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if isinstance(run.client_store, ClientStore):
        run.client_store.sync()
        meta["client_store"] = run.client_store.manifest()
    (tmp / "run_state.json").write_text(json.dumps(meta))
    write_checksums(tmp)
    for path in [*tmp.rglob("*"), tmp]:  # durable before it is renamed into place
        if path.is_dir():
            fsync_folder(path)
        else:
            fsync_file(path)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_folder(final.parent)
    if isinstance(run.client_store, ClientStore):
        rounds = [checkpoint_round(p) for p in checkpoints(output_dir)]
        run.client_store.prune([r for r in rounds if r <= run.round])
    return final


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {str(p.relative_to(folder)): sha256(p) for p in files}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from (a missing file, a checksum mismatch), or None when it is whole.
    Checkpoints from before checksums were recorded are accepted with a warning."""
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    if not (folder / CHECKSUMS).is_file():
        logger.warning("%s has no %s (written by an older version): loading it unverified", folder, CHECKSUMS)
        return None
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{CHECKSUMS} is unreadable"
    for name, digest in sums.items():
        if not (folder / name).is_file():
            return f"{name} missing"
        if sha256(folder / name) != digest:
            return f"{name} does not match its checksum"
    return None


def checkpoint_round(path: Path) -> int:
    return int(path.name.split("-")[-1])


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The folder's checkpoint-<r> folders, latest first (temporary .tmp folders excluded)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=checkpoint_round, reverse=True)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The latest checkpoint folder, unverified (cheap: for messages)."""
    return next(iter(checkpoints(output_dir)), None)


def latest_good_checkpoint(output_dir: str | Path) -> tuple[Path, RunState] | tuple[None, None]:
    """The latest checkpoint that verifies and loads, with its state; corrupt ones are reported and skipped."""
    for path in checkpoints(output_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            try:
                return path, load_checkpoint(path)
            except Exception as err:  # a checkpoint without checksums can still be torn
                problem = f"it does not load ({type(err).__name__}: {err})"
        logger.warning("Skipping %s: %s; falling back to the previous checkpoint", path, problem)
    return None, None


def load_checkpoint(path: Path) -> RunState:
    tensors = load_file(path / "run_state.safetensors")
    meta = json.loads((path / "run_state.json").read_text())
    torch.set_rng_state(tensors.pop("torch_rng"))
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    np_state = meta["numpy_rng"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    run = RunState(x=tensors.pop("x"), server_state={}, round=meta["round"], extra=meta.get("extra", {}))
    run.round_losses = [{int(k): v for k, v in losses} for losses in meta["round_losses"]] \
        if "round_losses" in meta else _sparse(meta["loss_history"])
    old_states: dict[int, dict] = {}
    for key, value in tensors.items():
        scope, *rest = key.split("/")
        if scope == "server":
            run.server_state[rest[0]] = value
        else:
            old_states.setdefault(int(rest[0]), {})[rest[1]] = value
    if "client_store" in meta:
        run.client_store = ClientStore.restore(path.parent / "client_state", meta["client_store"])
    else:  # written before the store existed: the clients' states, inside run_state.safetensors; the round loop
        run.client_store = old_states  # moves them into the store through the algorithm (federated/loop.py)
    return run


def _sparse(loss_history: list[list[float]]) -> list[dict[int, float]]:
    """The [num_clients][rounds] loss table of older checkpoints as per-round {client: loss} of sampled clients."""
    rounds = len(loss_history[0]) if loss_history else 0
    return [{k: row[t] for k, row in enumerate(loss_history) if row[t] != -1.0} for t in range(rounds)]
