"""The federated round loop, shared by main_sft.py, main_dpo.py and the Flower app (flower_app/).

A round has a server part (Federation.plan: sample clients, set the round's learning rate, one ClientTask per
client; Federation.finish_round: aggregate the results, log a metrics row (bytes as the algorithm reports them,
or as a transport really sent them), checkpoint every --checkpoint_step rounds and at the end) and a client part
(train_client: load its start vector (the global vector, or a LoRA method's view of it), train locally on this
round's subset with the algorithm's hooks, read back what it uploads). run_federated runs the client part in a plain loop in
this process; the Flower ServerApp sends each ClientTask to a node whose ClientApp calls train_client.
"""
from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from federated.algorithms import parse_local, server_step
from federated.methods import make_algorithm
from federated.checkpoint import RunState, checkpoints, latest_good_checkpoint, save_checkpoint
from federated.client_store import ClientStore
from federated.client import LocalTrainer, client_seed, is_finite, local_steps, round_subset
from utils.files import write_text_atomic

logger = logging.getLogger(__name__)


def sample_clients(fed_args, num_clients: int, round_idx: int) -> list[int]:
    """The reference's sampling: random.seed(t); sorted(random.sample(range(n), k)); all when n <= k."""
    local = parse_local(fed_args.fed_alg)
    if local is not None:
        return [local]
    if num_clients <= fed_args.sample_clients:
        return list(range(num_clients))
    return sorted(random.Random(round_idx).sample(range(num_clients), fed_args.sample_clients))


def round_learning_rate(lr: float, lr_min: float, round_idx: int, num_rounds: int) -> float:
    """Cosine decay over rounds, constant within a round."""
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * round_idx / num_rounds))


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rebuilt_row(run: RunState, fed_args, num_clients: int, round_number: int) -> dict:
    """A metrics row rebuilt from a checkpoint: the sampled clients (a function of the round) and their losses
    (the loss history; -1 marks a dropped client). Timings and memory were not checkpointed and stay absent."""
    t = round_number - 1
    clients = sample_clients(fed_args, num_clients, t)
    losses = {k: run.round_losses[t].get(k, -1.0) for k in clients}
    return {"round": round_number, "clients": clients,
            "client_loss": {str(k): v for k, v in losses.items() if v != -1.0},
            "dropped_clients": [k for k, v in losses.items() if v == -1.0], "rebuilt_from_checkpoint": True}


def restore_metrics(path: Path, run: RunState, rebuild) -> None:
    """metrics.jsonl as of the checkpoint: rows of later rounds dropped (they are redone), torn lines skipped, and
    rows that are missing rebuilt with `rebuild(round_number)`; written atomically."""
    rows, torn = {}, 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
    for line in filter(None, lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("round"), int) and 1 <= row["round"] <= run.round:
            rows[row["round"]] = row
    missing = [r for r in range(1, run.round + 1) if r not in rows]
    if missing or torn:
        logger.warning("%s: %d torn line(s) skipped; rounds %s rebuilt from the checkpoint", path, torn,
                       missing or "none")
    rows.update({r: rebuild(r) for r in missing})
    write_text_atomic(path, "".join(json.dumps(rows[r]) + "\n" for r in sorted(rows)))


def _start(output_dir: Path, resume: bool, x0: torch.Tensor, algorithm, num_clients: int, fed_args) -> RunState:
    checkpoint, run = latest_good_checkpoint(output_dir) if resume else (None, None)
    if resume and checkpoint is None and checkpoints(output_dir):  # damaged, not absent: starting over would
        # delete client_state/ (which a restored file might have repaired) and redo every round
        raise SystemExit(f"--resume: none of the checkpoints in {output_dir} can be used (the warnings above name "
                         f"each one's problem); repair or restore the files named there, or start anew with "
                         f"--overwrite_output_dir true.")
    if resume and checkpoint is None:
        logger.warning("--resume: no usable checkpoint in %s yet, starting from round 0", output_dir)
    if checkpoint is None:
        (output_dir / "metrics.jsonl").write_text("")
        return RunState(x=x0, server_state=algorithm.init_state(x0, num_clients),
                        client_store=ClientStore.fresh(output_dir / "client_state"))
    logger.info("Resuming from %s (round %d)", checkpoint, run.round)
    run.x = run.x.to(x0.device)  # the server's device (federated/flat.py); client state stays on the CPU
    run.server_state = {k: v.to(x0.device) for k, v in run.server_state.items()}
    if not isinstance(run.client_store, ClientStore):
        migrate_client_states(run, algorithm, x0, num_clients, output_dir / "client_state")
    restore_metrics(output_dir / "metrics.jsonl", run, lambda r: rebuilt_row(run, fed_args, num_clients, r))
    return run


def migrate_client_states(run: RunState, algorithm, x0: torch.Tensor, num_clients: int, folder: Path) -> None:
    """A checkpoint from before the client-state store held the clients' states itself: they move into a new store
    through the algorithm, which rebuilds what it derives from them (personal's running sum of B's, a server state
    such a checkpoint lacks: it starts at its initial value, as it was when those states were all stored)."""
    for key, value in algorithm.init_state(x0, num_clients).items():
        run.server_state.setdefault(key, value)
    old_states, run.client_store = run.client_store, ClientStore.fresh(folder)
    for client in sorted(old_states):
        algorithm.keep_client_state(run, client, old_states[client], run.round)


def write_loss_table(path: Path, round_losses: list[dict[int, float]], num_clients: int,
                     rows_per_chunk: int = 4096) -> None:
    """training_loss.npy in the reference's layout, [num_clients, rounds] float64 with -1 where a client was not
    sampled (or was dropped), written in chunks of clients so that memory stays bounded at any client count."""
    by_client = defaultdict(list)  # client -> [(round, loss)], only the sampled ones
    for t, losses in enumerate(round_losses):
        for k, loss in losses.items():
            by_client[k].append((t, loss))
    shape = (num_clients, len(round_losses))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float64)),
                                                 "fortran_order": False, "shape": shape})
        for start in range(0, num_clients, rows_per_chunk):
            chunk = np.full((min(rows_per_chunk, num_clients - start), shape[1]), -1.0)
            for k in range(start, start + len(chunk)):
                for t, loss in by_client.get(k, ()):
                    chunk[k - start, t] = loss
            f.write(chunk.tobytes())
    tmp.replace(path)


def outlier_clients(x: torch.Tensor, vectors: list[torch.Tensor], clients: list[int], ratio: float,
                    round_number: int) -> list[int]:
    """Clients whose update norm ||y_k - x|| exceeds `ratio` times the median norm of the round's other updates
    (finite but absurd: a near-divergence the NaN check misses). Needs at least two updates."""
    if len(vectors) < 2:
        return []
    norms = [float(torch.linalg.vector_norm(y - x)) for y in vectors]  # one [N] temporary at a time, no [K, N]
    flagged = []
    for i, k in enumerate(clients):
        others = norms[:i] + norms[i + 1:]
        median = float(np.median(others))
        if norms[i] > ratio * median and norms[i] > 0:
            logger.warning("Round %d: client %d's update norm %.4g is %.3g times the median %.4g of the round's "
                           "other updates", round_number, k, norms[i],
                           norms[i] / median if median > 0 else float("inf"), median)
            flagged.append(k)
    return flagged


def summed_client_metrics(results: list) -> dict:
    """The round's sum of its clients' own costs (ClientResult.metrics, every client that answered, a diverged
    one included: it spent them). Each pair K_sum, K_count also gives K_mean = K_sum / K_count (None when no
    client counted any)."""
    total: dict = {}
    for result in results:
        for key, value in result.metrics.items():
            total[key] = total.get(key, 0) + value
    for key in [k for k in total if k.endswith("_sum")]:
        name = key[:-len("_sum")]
        if name + "_count" in total:
            count = total[name + "_count"]
            total[name + "_mean"] = total[key] / count if count else None
    return total


@dataclass
class ClientTask:
    """What the server tells a sampled client to do this round (all it needs besides the global vector, the
    algorithm's hooks and its own data)."""
    client: int
    round_idx: int
    lr: float
    steps: int
    num_samples: int  # this round's subset of the client's data (round_subset)
    ordered_over_rounds: int | None  # --quality_order: the window moves over this many rounds
    seed: int


@dataclass
class ClientResult:
    """A client's answer: its vector (None when it diverged), the algorithm's extra uploads and the state it keeps
    for later rounds (hooks.finish), its mean loss, the steps it did, its training time and the algorithm's own
    costs on this client (hooks.metrics: numbers the round's row sums over its clients)."""
    client: int
    vector: torch.Tensor | None
    uploads: dict
    state: dict
    loss: float
    steps: int
    train_time: float = 0.0
    metrics: dict = field(default_factory=dict)


@dataclass
class SummedUpdate:
    """A round's update as secure aggregation delivers it: the weighted mean of the summed clients' deltas
    y_k - x (weights as the algorithm's, or uniform under clip-mode DP), without any client's own vector. The
    server never sees the individual updates, so it cannot check them (NaN and outliers: a client that diverged
    withdraws itself with weight 0). `metrics` go into the round's row."""
    mean_delta: torch.Tensor
    clients: list[int]  # the clients whose updates are in the sum
    metrics: dict


def train_client(local_trainer: LocalTrainer, algorithm, task: ClientTask, data, x: torch.Tensor,
                 server_state: dict, client_store: dict) -> ClientResult:
    """The client part of a round: start from the global vector, train locally with the algorithm's hooks on this
    round's subset, return the vector and what hooks.finish uploads and keeps. The in-process loop and the Flower
    ClientApp both call this."""
    flat = local_trainer.flat
    subset = round_subset(data, task.round_idx, task.num_samples, ordered_over_rounds=task.ordered_over_rounds)
    hooks = algorithm.client_hooks(task.client, x, server_state, client_store)
    flat.set(hooks.start_vector(x))  # the global vector, or the LoRA method's view of it
    start = time.perf_counter()
    loss, steps = local_trainer.train(subset, task.steps, task.lr, hooks, task.seed)
    train_time = time.perf_counter() - start
    y = flat.get()
    if not (is_finite(y) and math.isfinite(loss)):  # the server drops it; its costs were spent all the same
        return ClientResult(task.client, None, {}, {}, loss, steps, train_time, hooks.metrics())
    uploads, state = hooks.finish(y, steps, task.lr)
    return ClientResult(task.client, hooks.upload_vector(y), uploads, state, loss, steps, train_time,
                        hooks.metrics())


class Federation:
    """The server part of a run: plans each round (sampled clients, learning rate, one ClientTask each) and turns
    the clients' results into the next global vector (NaN and outlier checks, DP, server_step), a metrics row,
    training_loss.npy and checkpoints. run_federated feeds it from a plain loop over the clients; the Flower
    ServerApp (flower_app/) feeds it from the replies of Flower nodes."""

    def __init__(self, script_args, fed_args, model, flat, sample_counts: list[int], lr_min: float,
                 privacy=None, algorithm=None):
        self.script_args, self.fed_args, self.model, self.flat = script_args, fed_args, model, flat
        self.sample_counts, self.lr_min, self.privacy = sample_counts, lr_min, privacy
        self.num_clients = len(sample_counts)
        self.algorithm = algorithm or make_algorithm(fed_args, self.num_clients)
        initial = flat.get()
        self.algorithm.bind(model, flat, initial)  # the flat layout, for the LoRA methods (federated/lora_methods.py)
        self.output_dir = Path(script_args.output_dir)
        self.checkpoint_step = fed_args.save_model_freq or script_args.checkpoint_step
        self.run = _start(self.output_dir, script_args.resume, initial, self.algorithm, self.num_clients, fed_args)
        if privacy is not None and "privacy" in self.run.extra:
            privacy.load_state_dict(self.run.extra["privacy"])
        # The model holds the global model from the start: a resumed run with no round left is scored as saved.
        self.algorithm.load_global(flat, self.run)

    def plan(self, t: int) -> list[ClientTask]:
        """Round t's sampled clients, each with its learning rate, steps, data window and seed."""
        s, f = self.script_args, self.fed_args
        lr = round_learning_rate(s.learning_rate, self.lr_min, t, f.num_rounds)
        per_step = s.batch_size * s.gradient_accumulation_steps
        tasks = []
        for k in sample_clients(f, self.num_clients, t):
            steps = local_steps(s, f, self.sample_counts[k], self.num_clients)
            tasks.append(ClientTask(k, t, lr, steps, per_step * steps, f.num_rounds if s.quality_order else None,
                                    client_seed(s.seed, t, k)))
        return tasks

    def finish_round(self, tasks: list[ClientTask], results: list[ClientResult], round_time: float,
                     failed: list[int] = (), bytes_moved: tuple[int, int] | None = None,
                     summed: SummedUpdate | None = None) -> dict:
        """Aggregate round t's results (`failed`: clients that never answered), log, save; returns the row.
        bytes_moved: (uploaded, downloaded) as really sent by a transport; in process, the vectors' size.
        summed: the round's update from secure aggregation (the results then carry no vectors)."""
        run, t = self.run, tasks[0].round_idx
        clients, lr = [task.client for task in tasks], tasks[0].lr
        losses = {r.client: r.loss for r in results}
        steps_done = {r.client: r.steps for r in results}
        if summed is None:
            dropped, outliers = self._aggregate(t, clients, results)
        else:
            dropped, outliers = self._apply_sum(t, results, summed), []
        aggregated = [k for k in losses if k not in dropped]
        self.algorithm.load_global(self.flat, run)
        run.round = t + 1
        run.round_losses.append({k: -1.0 if k in dropped else loss for k, loss in losses.items()})

        if bytes_moved is None:  # in process: as the algorithm reports them
            bytes_moved = tuple(sum(sent) for sent in zip(*(self.algorithm.transfer_bytes(k, self.flat.numel)
                                                            for k in clients)))
        row = {"round": run.round, "clients": clients, "client_loss": {str(k): v for k, v in losses.items()},
               "local_steps": {str(k): v for k, v in steps_done.items()}, "learning_rate": lr,
               "round_time_s": round(round_time, 4),
               "train_time_s": round(sum(r.train_time for r in results), 4),
               "client_train_time_s": {str(r.client): round(r.train_time, 4) for r in results},
               "peak_memory_mb": round(peak_memory_mb(), 1), "bytes_uploaded": bytes_moved[0],
               "bytes_downloaded": bytes_moved[1], "dropped_clients": dropped, "outlier_clients": outliers,
               "failed_clients": list(failed)}
        if self.privacy is not None:
            row.update(self.privacy.metrics(run))
        row.update(summed.metrics if summed is not None else {})
        row.update(summed_client_metrics(results))  # a method's own costs (FedCOG's generation)
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        row["mean_loss"] = float(np.mean([losses[k] for k in aggregated])) if aggregated else float("nan")
        if run.round % self.checkpoint_step == 0 or run.round == self.fed_args.num_rounds:
            self.save()
        return row

    def _aggregate(self, t: int, clients: list[int], results: list[ClientResult]) -> tuple[list[int], list[int]]:
        """The next global vector from the clients' own vectors (NaN/inf and outlier checks, DP, server step);
        returns (dropped clients, outlier clients)."""
        run = self.run
        dropped = [r.client for r in results if r.vector is None]
        for k in dropped:  # a diverged client must not poison the global model
            logger.warning("Round %d: client %d produced NaN/inf; dropped from aggregation", t + 1, k)
        finished = [r for r in results if r.vector is not None]
        outliers = outlier_clients(run.x, [r.vector for r in finished], [r.client for r in finished],
                                   self.fed_args.outlier_ratio, t + 1)
        if self.fed_args.drop_outliers:
            dropped.extend(outliers)  # treated as a NaN update: not aggregated, its client state not kept
        vectors, counts, uploads = [], [], defaultdict(list)
        for r in finished:
            if r.client in dropped:
                continue
            vectors.append(r.vector)
            counts.append(self.sample_counts[r.client])
            for key, value in r.uploads.items():
                uploads[key].append(value)
        for r in sorted(finished, key=lambda r: r.client):  # in client order: a running sum is then order-free
            if r.state and r.client not in dropped:  # to disk now: RAM holds no state of a client outside a round
                self.algorithm.keep_client_state(run, r.client, r.state, t + 1)
        if vectors:
            stacked = torch.stack(vectors)
            if self.privacy is not None:
                stacked, counts = self.privacy.privatize(run.x, stacked, counts, t, clients)
            run.x = server_step(self.algorithm, run.x, stacked, counts, run.server_state, t,
                                {key: torch.stack(v) for key, v in uploads.items()})
        return dropped, outliers

    def _apply_sum(self, t: int, results: list[ClientResult], summed: SummedUpdate) -> list[int]:
        """The next global vector from a securely summed mean update: the server step on the one vector
        x + mean delta (weight 1), after clip-mode DP's noise (the clients clipped their own deltas). Returns
        the clients left out of the sum (diverged: they withdrew)."""
        run = self.run
        dropped = [r.client for r in results if r.client not in summed.clients]
        for k in dropped:
            logger.warning("Round %d: client %d produced NaN/inf and withdrew from the sum", t + 1, k)
        if summed.clients:
            mean = run.x + summed.mean_delta.to(run.x.device, torch.float32)
            if self.privacy is not None:
                mean = self.privacy.noise_mean(run.x, mean, len(summed.clients), t)
            run.x = server_step(self.algorithm, run.x, mean.unsqueeze(0), [1], run.server_state, t)
        return dropped

    def save(self) -> Path:
        """A checkpoint of the rounds done so far (also written before a run stops early: no finished round
        is lost)."""
        if self.privacy is not None:
            self.run.extra["privacy"] = self.privacy.state_dict()
        write_loss_table(self.output_dir / "training_loss.npy", self.run.round_losses, self.num_clients)
        path = save_checkpoint(self.output_dir, self.run, self.model)
        logger.info("Round %d: checkpoint written to %s", self.run.round, path)
        return path


def run_federated(script_args, fed_args, model, local_trainer: LocalTrainer, client_data: list, lr_min: float,
                  privacy=None, algorithm=None) -> RunState:
    """Train for fed_args.num_rounds rounds in this process; `client_data[k]` is client k's tokenised dataset."""
    federation = Federation(script_args, fed_args, model, local_trainer.flat, [len(d) for d in client_data],
                            lr_min, privacy=privacy, algorithm=algorithm)
    run = federation.run
    bar = tqdm(range(run.round, fed_args.num_rounds), initial=run.round, total=fed_args.num_rounds, desc="rounds")
    for t in bar:
        round_start = time.perf_counter()
        tasks = federation.plan(t)
        results = [train_client(local_trainer, federation.algorithm, task, client_data[task.client], run.x,
                                run.server_state, run.client_store) for task in tasks]
        row = federation.finish_round(tasks, results, time.perf_counter() - round_start)
        bar.set_postfix(loss=f"{row['mean_loss']:.4f}", s_per_round=f"{row['round_time_s']:.1f}")
    return run
