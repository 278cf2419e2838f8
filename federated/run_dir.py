"""The rules of an output folder, for any entry point that runs federated rounds (main_sft.py, main_dpo.py, a
future Flower ServerApp): one run owns the folder, a new run never mixes with another run's checkpoints, a
resume continues only the run that args.json describes, and an interrupted run says how to continue.

    with RunGuard(output_dir):                       # lock + SIGINT/SIGTERM -> one line with the --resume command
        prepare_run_dir(output_dir, settings, resume=..., overwrite=...)   # refuse / overwrite / check args.json
        ... run_federated(...)                        # checkpoints: federated/checkpoint.py
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from utils.files import write_json_atomic

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
ARGS_FILE = "args.json"
# Settings a resumed run may change: they do not change what the finished rounds computed. Every other setting
# (method and hyperparameters, learning rate, data and seeds, client counts, DP, model, LoRA, template, sequence
# length, local steps and batch) defines the run and must equal the checkpoint's args.json. docs/RUNS.md lists them.
RESUMABLE_CHANGES = {
    "num_rounds": "extend (or shorten) the run; the cosine learning-rate schedule is recomputed over the new total",
    "checkpoint_step": "checkpoint frequency", "save_model_freq": "checkpoint frequency (alias)",
    "output_dir": "the folder may have been moved", "resume": "this flag itself",
    "overwrite_output_dir": "refused together with --resume anyway", "log_level": "logging",
    "eval_after": "evaluation after training", "eval_per_task": "evaluation after training",
    "hf_token": "credentials", "gradient_checkpointing": "memory only: the same gradients",
    "dataset_name": "an alias: its value is compared as `dataset`",
}
# Files a run writes into its folder; --overwrite_output_dir removes exactly these (and checkpoint-* folders).
RUN_FILES = ("args.json", "metrics.jsonl", "training_loss.npy", "eval_exact_match.json", "eval_personal.json",
             "eval_preference.json")


class OutputDirLock:
    """An exclusive flock on <dir>/.run.lock holding the owner's pid. The kernel releases it when the process dies,
    however it dies, so a lock file left by a dead process is stale by construction and is simply taken over."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.handle = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise SystemExit(f"--output_dir {self.path.parent} is in use by another run (pid {holder}); wait for "
                             f"it to finish, stop it, or choose another --output_dir.") from None
        handle.seek(0)
        previous = handle.read().strip()
        if previous and previous != str(os.getpid()):
            logger.info("Taking over the stale lock of pid %s in %s (that process is gone).", previous,
                        self.path.parent)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.seek(0)
            self.handle.truncate()  # an empty file: nobody holds it
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


class RunInterrupted(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM; a BaseException so that `except Exception` cannot swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that continues this run: the same flags, --overwrite_output_dir removed (it would wipe
    the run), --resume true added."""
    argv = list(sys.argv if argv is None else argv)
    kept, skip_value = [], False
    for arg in argv[1:]:
        if skip_value:
            skip_value = False
            if arg.lower() in ("true", "false", "1", "0", "yes", "no"):
                continue
        name = arg.split("=", 1)[0]
        if name in ("--resume", "--overwrite_output_dir"):
            skip_value = "=" not in arg
            continue
        kept.append(arg)
    return shlex.join(["python", argv[0], *kept, "--resume", "true"])


def last_checkpoint_line(output_dir: Path) -> str:
    """Which rounds are safe on disk, for the folder and its --client_groups subfolders."""
    from federated.checkpoint import checkpoint_round, latest_checkpoint
    folders = [output_dir, *sorted(output_dir.glob("group-*"))]
    found = [(folder, latest_checkpoint(folder)) for folder in folders]
    found = [(folder, ckpt) for folder, ckpt in found if ckpt is not None]
    if not found:
        return "no round was checkpointed yet"
    return "; ".join(f"{folder}: round {checkpoint_round(ckpt)} checkpointed" for folder, ckpt in found)


class RunGuard:
    """Holds the output folder's lock for the whole run and turns SIGINT/SIGTERM into one line that names the last
    checkpointed round and the exact --resume command (exit status 128 + signal number)."""

    def __init__(self, output_dir: str | Path, argv: list[str] | None = None, command: str | None = None):
        self.output_dir = Path(output_dir)
        self.lock = OutputDirLock(output_dir)
        self.argv = argv
        self.command = command  # how to continue, for entry points that are not a script's command line
        self.previous_handlers: dict[int, object] = {}

    def _on_signal(self, signum, frame):
        self._restore_handlers()  # a second signal acts as usual
        raise RunInterrupted(signum)

    def _restore_handlers(self):
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}

    def __enter__(self):
        self.lock.acquire()
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous_handlers[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, exc_type, exc, tb):
        self._restore_handlers()
        self.lock.release()
        if isinstance(exc, RunInterrupted):
            print(f"Stopped by {exc}: {last_checkpoint_line(self.output_dir)}. Continue with: "
                  f"{self.command or resume_command(self.argv)}", file=sys.stderr, flush=True)
            raise SystemExit(128 + exc.signum) from None
        if exc is not None and disk_full(exc):
            free = shutil.disk_usage(self.output_dir).free
            raise SystemExit(f"No space left on the disk of {self.output_dir} ({free / 2 ** 20:.0f} MiB free) while "
                             f"writing {getattr(exc, 'filename', None) or 'a file'}: "
                             f"{last_checkpoint_line(self.output_dir)}. Free some space and continue with: "
                             f"{self.command or resume_command(self.argv)}") from None
        return False


def disk_full(exc: BaseException) -> bool:
    """A write failed for lack of space: OSError ENOSPC or EDQUOT, or a library's own error that says so (the
    safetensors writer raises its SafetensorError, not an OSError)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left on device" in str(exc)


def settings_of(*configs) -> dict:
    """The run's settings as args.json records them: the entry script's dataclasses merged."""
    merged = {}
    for config in configs:
        merged.update(asdict(config))
    return json.loads(json.dumps(merged, default=str))


def clean_leftovers(output_dir: Path) -> None:
    """Remove *.tmp files and folders a killed run left behind (half-written checkpoints, args, metrics)."""
    for leftover in output_dir.glob("*.tmp"):
        logger.info("Removing %s, left over by an interrupted run", leftover)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def settings_differences(saved: dict, current: dict) -> list[str]:
    """'name: saved -> current' for every run-defining setting that differs (settings one side lacks, from an
    older or newer version of the code, are not compared)."""
    return [f"{key}: {json.dumps(saved[key], default=str)} -> {json.dumps(current[key], default=str)}"
            for key in sorted(saved.keys() & current.keys())
            if key not in RESUMABLE_CHANGES and json.loads(json.dumps(saved[key], default=str))
            != json.loads(json.dumps(current[key], default=str))]


def _has_checkpoints(output_dir: Path) -> bool:
    return any(p.is_dir() for p in output_dir.glob("checkpoint-*"))


def _remove_run(output_dir: Path) -> None:
    for ckpt in output_dir.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)
    for name in RUN_FILES:
        (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(output_dir / "trainer", ignore_errors=True)
    shutil.rmtree(output_dir / "client_state", ignore_errors=True)  # federated/client_store.py


def prepare_run_dir(output_dir: str | Path, settings: dict, resume: bool, overwrite: bool) -> None:
    """Make `output_dir` this run's, or refuse with what to do; then record `settings` in args.json.

    A new run refuses a folder holding another run's checkpoints unless `overwrite` (which removes that run's
    files). A resume refuses when a run-defining setting differs from the saved args.json."""
    output_dir = Path(output_dir)
    if resume and overwrite:
        raise SystemExit("--resume and --overwrite_output_dir contradict each other: pass one of them.")
    output_dir.mkdir(parents=True, exist_ok=True)
    clean_leftovers(output_dir)
    args_file = output_dir / ARGS_FILE
    if resume:
        if args_file.exists():
            differences = settings_differences(json.loads(args_file.read_text()), settings)
            if differences:
                raise SystemExit(f"--resume: {output_dir} holds a run with other settings ({'; '.join(differences)}); "
                                 f"resume with the saved settings (args.json), or start a new run elsewhere.")
        elif _has_checkpoints(output_dir):
            logger.warning("--resume: %s has checkpoints but no args.json; the settings cannot be checked",
                           output_dir)
    elif _has_checkpoints(output_dir):
        if not overwrite:
            raise SystemExit(f"{output_dir} holds checkpoints of an earlier run: pass --resume true to continue "
                             f"it, or --overwrite_output_dir true to delete it and start anew.")
        logger.warning("--overwrite_output_dir: removing the earlier run's checkpoints and files in %s", output_dir)
        _remove_run(output_dir)
    write_json_atomic(args_file, settings, indent=2, default=str)
