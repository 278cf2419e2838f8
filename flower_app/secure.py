"""Flower's secure aggregation (SecAgg+) for the FedAvg-family rules: the server learns only the weighted mean of
the sampled clients' updates, never one client's.

Flower 1.42 runs SecAgg+ as SecAggPlusWorkflow (server, four message rounds: keys, key shares, masked vectors,
unmasking) and secaggplus_mod (client), and the workflow drives a legacy Strategy (configure_fit /
aggregate_fit) from a LegacyContext. Here a round's Strategy is a thin adapter around Federation: its
configure_fit hands out the tasks Federation.plan made, its aggregate_fit keeps the securely summed mean, which
Federation.finish_round turns into the next global vector with the same server_step (no FL maths here). Each
client uploads its delta y - x times its weight (the rule's sample count, or 1 for uniform rules and clip-mode
DP), so the sum divided by the total weight is the weighted mean delta the rule needs.

What it serves and refuses (check_secure_aggregation) and why, the quantization error and the costs:
docs/FLOWER.md, "Secure aggregation".
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

logger = logging.getLogger(__name__)

MODULUS_RANGE = 2 ** 32  # the masks' range (Flower's default and maximum)


def refusal(fed_args) -> str | None:
    """Why this run cannot be served by secure aggregation (the fix included), or None when it can."""
    from federated.algorithms import parse_local
    from federated.privacy import resolve_mode

    if parse_local(fed_args.fed_alg) is not None:
        return f"fed-alg {fed_args.fed_alg} trains one client alone: there is no sum to hide it in"
    if fed_args.fed_alg == "scaffold":
        return ("SCAFFOLD's c_i is kept by the server (docs/FLOWER.md, 'Client state'), and from c_i+ = (x - y) / "
                "(K lr) - (c - c_i) the server would rebuild each client's y: use fedavg, fedprox, fedavgm, "
                "fedadam, fedyogi or fedadagrad")
    if resolve_mode(fed_args) == "paper":  # --dp_mode paper, --dp_sigma, or fed-alg feddp
        return ("DP paper mode noises every client's vector on the server, which needs each vector: use DP clip "
                "mode (the clients clip, the server noises the mean) or drop the DP flags")
    if fed_args.drop_outliers:
        return ("drop-outliers compares each client's update norm with the others', which the server no longer "
                "sees: drop it (NaN/inf updates are still left out: a diverged client withdraws itself)")
    if fed_args.lora_method in ("hetero_rank", "personal"):
        what = ("the SVD of the mean of every client's B_i A_i" if fed_args.lora_method == "hetero_rank"
                else "every client's own B, kept by the server with its state")
        return f"lora-method {fed_args.lora_method} needs {what}: use lora-method standard or ffa"
    if fed_args.sample_clients < 2:
        return f"sample-clients {fed_args.sample_clients}: the sum of one client's update is that update; sample >= 2"
    return None


def check_secure_aggregation(script_args, fed_args, flower) -> None:
    """Refuse, before any training, what secure aggregation cannot serve, and bad SecAgg+ parameters."""
    reason = refusal(fed_args)
    if reason is not None:
        raise SystemExit(f"Run-config secagg=true cannot serve this run: {reason}.")
    c, q = flower.secagg_clipping_range, flower.secagg_quantization_range
    if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
        raise SystemExit(f"Run-config secagg-clipping-range {c!r} is invalid: it must be a finite number > 0.")
    if not (isinstance(q, int) and 0 < q < 2 ** 31 and q * fed_args.sample_clients < MODULUS_RANGE):
        raise SystemExit(f"Run-config secagg-quantization-range {q!r} is invalid: it must be an integer in "
                         f"[1, 2^31) with quantization-range x sample-clients ({fed_args.sample_clients}) < 2^32, "
                         f"or the masked sum overflows.")
    workflow(flower, max_weight=1.0)  # Flower's own checks of num-shares and reconstruction-threshold


def share_count(value: float, key: str) -> int | float:
    """SecAgg+'s count-or-fraction convention, stated plainly: a value <= 1 is a fraction, > 1 an integer count."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SystemExit(f"Run-config {key} {value!r} is invalid: it must be a fraction in (0, 1] or an integer > 1.")
    if value <= 1:
        return float(value)
    if value != int(value):
        raise SystemExit(f"Run-config {key} {value!r} is invalid: above 1 it is a count and must be an integer.")
    return int(value)


def workflow(flower, max_weight: float, timeout: float | None = None):
    from flwr.server.workflow import SecAggPlusWorkflow

    try:
        return SecAggPlusWorkflow(share_count(flower.secagg_num_shares, "secagg-num-shares"),
                                  share_count(flower.secagg_reconstruction_threshold,
                                              "secagg-reconstruction-threshold"),
                                  max_weight=max_weight, clipping_range=float(flower.secagg_clipping_range),
                                  quantization_range=flower.secagg_quantization_range, modulus_range=MODULUS_RANGE,
                                  timeout=timeout)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"Run-config secagg-num-shares / secagg-reconstruction-threshold: {err}") from None


def client_weights(federation) -> list[int]:
    """Each client's weight in the secure sum: its sample count for sample-weighted rules, 1 for the uniform ones
    (FedOpt's default) and under clip-mode DP (a uniform mean, so that one user moves it by at most C / K)."""
    uniform = federation.privacy is not None or federation.algorithm.weighting == "uniform"
    return [1 if uniform else n for n in federation.sample_counts]


def error_bound(weights: list[int], max_weight: float, clipping_range: float, quantization_range: int) -> float:
    """The largest error per coordinate of the secure mean delta: each of the K clients' stochastic rounding is
    below one level 2C/Q of its weighted update (w_k / max_weight) d_k, and the sum is divided by the total
    quantized weight sum_k round(Q w_k / max_weight) / Q."""
    quantized = sum(round(w / max_weight * quantization_range) for w in weights)
    if not quantized:
        return 0.0
    return len(weights) * 2 * clipping_range / quantized


# --- client ------------------------------------------------------------------------------------------------------

def secure_update(result, x: torch.Tensor, fed_args, clipping_range: float) -> tuple[np.ndarray, dict]:
    """What a client puts into the masked sum: its delta y - x (clipped to L2 norm C first under clip-mode DP,
    as the server would clip it in process), or zeros for a client that diverged (with weight 0 it withdraws
    without breaking the protocol). Also reports how many coordinates SecAgg+ will clip to
    [-clipping-range, clipping-range] (then raise the range)."""
    from federated.privacy import clip_delta, clip_norm, resolve_mode

    if result.vector is None:
        return np.zeros(x.numel(), dtype=np.float64), {"out_of_range": 0}
    y = result.vector.to(torch.float32)
    x = x.to(y.device, torch.float32)
    delta = clip_delta(x, y, clip_norm(fed_args)) if resolve_mode(fed_args) == "clip" else y - x
    out_of_range = int((delta.abs() > clipping_range).sum())
    return delta.to("cpu", torch.float64).numpy(), {"out_of_range": out_of_range}


# --- server ------------------------------------------------------------------------------------------------------

def _strategy_class():
    from flwr.server.strategy import Strategy

    class RoundStrategy(Strategy):
        """One round of Federation as the legacy Strategy SecAggPlusWorkflow drives: the planned tasks out, the
        securely summed mean and the clients' metrics back. Evaluation is the run's own (not Flower's)."""

        def __init__(self, instructions: list):
            self.instructions = instructions  # [(ClientProxy, FitIns)]
            self.outcome = None  # (results, failures) once the sum is unmasked

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return self.instructions

        def aggregate_fit(self, server_round, results, failures):
            self.outcome = (results, failures)
            return None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return RoundStrategy


class CountingGrid:
    """The Grid as SecAggPlusWorkflow uses it (send_and_receive), counting the bytes that really cross: arrays
    and byte strings (keys, key shares, masked vectors) of every message and reply."""

    def __init__(self, grid):
        self.grid, self.uploaded, self.downloaded = grid, 0, 0

    def send_and_receive(self, messages, *, timeout=None):
        from flower_app.messages import payload_bytes

        messages = list(messages)
        self.downloaded += sum(payload_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.uploaded += sum(payload_bytes(r.content) for r in replies if not r.has_error())
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def secure_exchange(grid, context, federation, tasks: list, node_of: dict, settings, max_weight: float):
    """One SecAgg+ round of `tasks` through SecAggPlusWorkflow: an Exchange whose results carry the clients'
    losses and steps (no vectors) and whose `summed` is the weighted mean delta of the clients that did not
    diverge; a client whose node is gone, failed or timed out in any stage is failed (SecAgg+ unmasks the sum
    without it). A round the protocol could not finish (too few nodes left for the reconstruction threshold)
    has every client failed: nothing partial is ever unmasked."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD

    from federated.loop import SummedUpdate
    from flower_app.messages import Exchange, read_secure_result, secure_task

    run, flower = federation.run, settings.flower
    weights = client_weights(federation)
    exchange, connected, instructions = Exchange(), set(grid.get_node_ids()), []
    counting = CountingGrid(grid)
    for task in tasks:
        node = node_of[task.client]
        if node not in connected:
            exchange.failed[task.client] = f"node {node} is disconnected"
            continue
        instructions.append((GridClientProxy(node, counting, context.run_id),
                             secure_task(task, federation.num_clients, run.x, weights[task.client])))
    strategy = _strategy_class()(instructions)
    legacy = LegacyContext(context, strategy=strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({"current_round": tasks[0].round_idx + 1})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # the tasks carry x; the workflow's copy unused
    if len(instructions) >= 2:  # SecAgg+ needs two nodes at least (one node's sum is its update)
        workflow(flower, max_weight, timeout=flower.round_timeout)(counting, legacy)
    exchange.uploaded, exchange.downloaded = counting.uploaded, counting.downloaded
    if strategy.outcome is None:
        for task in tasks:
            exchange.failed.setdefault(task.client, "secure aggregation halted: too few nodes answered for its "
                                                    "reconstruction threshold")
        return exchange
    replies, _ = strategy.outcome
    diverged = []
    for _, fitres in replies:
        result = read_secure_result(fitres)
        exchange.results[result.client] = result
        if fitres.metrics["diverged"]:
            diverged.append(result.client)
    for task in tasks:
        if task.client not in exchange.results:
            exchange.failed.setdefault(task.client, "no masked vector in the secure round (left, failed or timed "
                                                    "out)")
    summed = sorted(k for k in exchange.results if k not in diverged)
    mean = torch.zeros_like(run.x)
    if summed:
        from flwr.common import parameters_to_ndarrays
        mean = torch.from_numpy(parameters_to_ndarrays(replies[0][1].parameters)[0]).to(run.x.device, torch.float32)
    out_of_range = sum(int(fitres.metrics["out_of_range"]) for _, fitres in replies)
    if out_of_range:
        logger.warning("Round %d: %d update coordinates exceeded secagg-clipping-range %g and were clipped by "
                       "SecAgg+: raise it", tasks[0].round_idx + 1, out_of_range, flower.secagg_clipping_range)
    bound = error_bound([weights[k] for k in summed], max_weight, flower.secagg_clipping_range,
                        flower.secagg_quantization_range)
    exchange.summed = SummedUpdate(mean, summed, {"secure_aggregation": "secagg+", "secagg_error_bound": bound,
                                                  "secagg_out_of_range": out_of_range})
    return exchange
