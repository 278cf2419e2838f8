"""The federated round loop, shared by main_sft.py and main_dpo.py.

for each round t: sample clients, set the round's learning rate; for each sampled client: load its start vector
(the global vector, or a LoRA method's view of it), train locally on this round's subset, read back what it
uploads; aggregate on the server; log a metrics row (bytes as the algorithm reports them); checkpoint every
--checkpoint_step rounds and at the end.
"""
from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from federated.algorithms import make_algorithm, parse_local, server_step
from federated.checkpoint import RunState, latest_good_checkpoint, save_checkpoint
from federated.client import LocalTrainer, client_seed, is_finite, local_steps, round_subset

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
    losses = {k: run.loss_history[k][t] for k in clients}
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(rows[r]) + "\n" for r in sorted(rows)))
    tmp.replace(path)


def _start(output_dir: Path, resume: bool, x0: torch.Tensor, algorithm, num_clients: int, fed_args) -> RunState:
    checkpoint, run = latest_good_checkpoint(output_dir) if resume else (None, None)
    if resume and checkpoint is None:
        logger.warning("--resume: no usable checkpoint in %s yet, starting from round 0", output_dir)
    if checkpoint is None:
        (output_dir / "metrics.jsonl").write_text("")
        return RunState(x=x0, server_state=algorithm.init_state(x0, num_clients),
                        loss_history=[[] for _ in range(num_clients)])
    logger.info("Resuming from %s (round %d)", checkpoint, run.round)
    run.x = run.x.to(x0.device)  # the server's device (federated/flat.py); client state stays on the CPU
    run.server_state = {k: v.to(x0.device) for k, v in run.server_state.items()}
    restore_metrics(output_dir / "metrics.jsonl", run, lambda r: rebuilt_row(run, fed_args, num_clients, r))
    return run


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


def run_federated(script_args, fed_args, model, local_trainer: LocalTrainer, client_data: list, lr_min: float,
                  privacy=None, algorithm=None) -> RunState:
    """Train for fed_args.num_rounds rounds; `client_data[k]` is client k's tokenised dataset."""
    output_dir = Path(script_args.output_dir)
    num_clients, flat = len(client_data), local_trainer.flat
    sample_counts = [len(d) for d in client_data]
    algorithm = algorithm or make_algorithm(fed_args, num_clients)
    algorithm.bind(model, flat)  # the flat layout, for the LoRA methods (federated/lora_methods.py)
    run = _start(output_dir, script_args.resume, flat.get(), algorithm, num_clients, fed_args)
    if privacy is not None and "privacy" in run.extra:
        privacy.load_state_dict(run.extra["privacy"])
    checkpoint_step = fed_args.save_model_freq or script_args.checkpoint_step
    bar = tqdm(range(run.round, fed_args.num_rounds), initial=run.round, total=fed_args.num_rounds, desc="rounds")
    for t in bar:
        round_start = time.perf_counter()
        clients = sample_clients(fed_args, num_clients, t)
        lr = round_learning_rate(script_args.learning_rate, lr_min, t, fed_args.num_rounds)
        vectors, counts, uploads, losses, dropped, steps_done = [], [], defaultdict(list), {}, [], {}
        finished = {}  # client -> (vector, uploads, client state), for the clients that did not diverge
        train_time = 0.0
        for k in clients:
            steps = local_steps(script_args, fed_args, sample_counts[k], num_clients)
            per_step = script_args.batch_size * script_args.gradient_accumulation_steps
            data = round_subset(client_data[k], t, per_step * steps,
                                ordered_over_rounds=fed_args.num_rounds if script_args.quality_order else None)
            hooks = algorithm.client_hooks(k, run.x, run.server_state, run.client_store)
            flat.set(hooks.start_vector(run.x))  # the global vector, or the LoRA method's view of it
            train_start = time.perf_counter()
            losses[k], steps_done[k] = local_trainer.train(data, steps, lr, hooks, client_seed(script_args.seed, t, k))
            train_time += time.perf_counter() - train_start
            y = flat.get()
            if not (is_finite(y) and math.isfinite(losses[k])):
                dropped.append(k)  # a diverged client must not poison the global model
                logger.warning("Round %d: client %d produced NaN/inf; dropped from aggregation", t + 1, k)
                continue
            finished[k] = (hooks.upload_vector(y), *hooks.finish(y, steps_done[k], lr))
        outliers = outlier_clients(run.x, [f[0] for f in finished.values()], list(finished), fed_args.outlier_ratio,
                                   t + 1)
        if fed_args.drop_outliers:
            dropped.extend(outliers)  # treated as a NaN update: not aggregated, its client state not kept
        for k, (y, client_uploads, client_state) in finished.items():
            if k in dropped:
                continue
            vectors.append(y)
            counts.append(sample_counts[k])
            for key, value in client_uploads.items():
                uploads[key].append(value)
            if client_state:
                run.client_store[k] = client_state
        if vectors:
            stacked = torch.stack(vectors)
            if privacy is not None:
                stacked, counts = privacy.privatize(run.x, stacked, counts, t, clients)
            run.x = server_step(algorithm, run.x, stacked, counts, run.server_state, t,
                                {key: torch.stack(v) for key, v in uploads.items()})
        algorithm.load_global(flat, run)
        run.round = t + 1
        for k in range(num_clients):
            run.loss_history[k].append(losses[k] if k in losses and k not in dropped else -1.0)

        round_time = time.perf_counter() - round_start
        up, down = (sum(sent) for sent in zip(*(algorithm.transfer_bytes(k, flat.numel) for k in clients)))
        row = {"round": run.round, "clients": clients, "client_loss": {str(k): v for k, v in losses.items()},
               "local_steps": {str(k): v for k, v in steps_done.items()}, "learning_rate": lr,
               "round_time_s": round(round_time, 4), "train_time_s": round(train_time, 4),
               "peak_memory_mb": round(peak_memory_mb(), 1), "bytes_uploaded": up,
               "bytes_downloaded": down, "dropped_clients": dropped, "outlier_clients": outliers}
        if privacy is not None:
            row.update(privacy.metrics(run))
        with open(output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        np.save(output_dir / "training_loss.npy", np.array(run.loss_history))
        mean_loss = float(np.mean([losses[k] for k in losses if k not in dropped])) if vectors else float("nan")
        bar.set_postfix(loss=f"{mean_loss:.4f}", s_per_round=f"{round_time:.1f}")
        if run.round % checkpoint_step == 0 or run.round == fed_args.num_rounds:
            if privacy is not None:
                run.extra["privacy"] = privacy.state_dict()
            path = save_checkpoint(output_dir, run, model)
            logger.info("Round %d: checkpoint written to %s", run.round, path)
    return run
