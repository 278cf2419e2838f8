"""User-level differential privacy on top of any server algorithm (FedAvg, FedAvgM, FedAdam, ...).

The round loop hands the sampled clients' vectors to `privatize(x, Y, counts, t, clients)` before the server step;
both modes return one privatised vector (a stack of 1 with count 1), which the server algorithm then applies as
it would apply a plain average.

- paper (the FedLLM-Bench reference, Appendix D): every sampled client's vector gets Gaussian noise of the paper's
  sigma, then the algorithm's usual weighted average. Nothing is clipped, so the noise bounds nothing and the
  (epsilon, delta) it was computed from is the paper's claim, not a guarantee.
- clip (DP-FedAvg, McMahan et al. 2018): every sampled client's delta y_k - x is clipped to L2 norm C, the clipped
  deltas are averaged with fixed uniform weights 1/K (so one user moves the mean by at most C/K, whatever the
  sample counts), and Gaussian noise of std z C / K is added. The privacy spent is accounted with Opacus' RDP
  accountant for the subsampled Gaussian mechanism, one step per round at rate q = sample_clients / num_clients.

The clip/noise math runs through kernels/ (fused Triton on CUDA, PyTorch twins otherwise); the noise is a
deterministic function of (seed, round, row), so a resumed run draws exactly the noise of an uninterrupted one.
"""
from __future__ import annotations

import functools
import logging
import math

import numpy as np
import torch

import kernels
from federated.algorithms import ALGORITHMS, Algorithm, make_rule, parse_local

logger = logging.getLogger(__name__)

MODES = ("paper", "clip")
DEFAULT_CLIP = 1.0  # C when neither --dp_clip nor --dp_max_grad_norm is given
CALIBRATION_TOLERANCE = 0.01  # --dp_target_epsilon: the calibrated epsilon lies in [target - tol, target], with tol
                              # at most 1% of the target (a small target is met closely, not with 2x the noise)
MAX_NOISE_MULTIPLIER = 1e3  # a target epsilon that needs more noise than this is refused as impossible
# The RDP orders the accountant minimises over: Opacus' defaults (1.1 to 10.9 by 0.1, then 12 to 63) and the powers
# of two 64 to 16384. Opacus' defaults stop at 63, which caps how small an epsilon any noise can certify (about
# 0.1 at delta 1e-5); a small target's best order lies in the thousands.
RDP_ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64)) + [2 ** k for k in range(6, 15)]


def paper_sigma(epsilon: float, delta: float, lr: float, clip: float, total_samples: int, num_clients: int,
                sample_rate: float, num_rounds: int) -> float:
    """The paper's sigma = dl sqrt(2 q N ln(1/delta)) / eps with dl = 2 lr C / (|D| / n) (Appendix D)."""
    sensitivity = 2 * lr * clip / (total_samples / num_clients)
    return sensitivity * math.sqrt(2 * sample_rate * num_rounds * math.log(1 / delta)) / epsilon


def noise_seed(seed: int) -> int:
    """The kernels key noise streams with a seed in [0, 2^31)."""
    return seed % 2 ** 31


class PaperDP:
    """Appendix D as the reference runs it: N(0, sigma^2) on every sampled client's vector, no clipping."""

    mode = "paper"

    def __init__(self, sigma: float, algorithm: Algorithm, seed: int, claimed_epsilon: float | None,
                 delta: float):
        self.sigma, self.algorithm, self.seed = sigma, algorithm, noise_seed(seed)
        self.claimed_epsilon, self.delta = claimed_epsilon, delta
        claim = (f"the (epsilon={claimed_epsilon:g}, delta={delta:g}) it was computed from is the paper's claim"
                 if claimed_epsilon is not None else "--dp_sigma was given directly")
        logger.info("DP paper mode: Gaussian noise with sigma=%.3g per coordinate on every sampled client's "
                    "vector. No clipping is applied, so this is not an accounted guarantee: %s.", sigma, claim)

    def privatize(self, x, client_vectors, counts, round_idx, clients):
        # Noising each row then taking the algorithm's weighted average is one fused kernel call. Streams are
        # keyed by (seed, round, row): the loop drops diverged clients from the stack, so rows and sampled ids
        # need not line up, and row keys are unique within a round, which is all independence needs.
        weights = self.algorithm.weights(counts)
        y = kernels.dp_aggregate(x, client_vectors, weights, None, self.sigma, self.seed, round_idx,
                                 noise_per_client=True)
        return y.unsqueeze(0), [1]

    def metrics(self, run) -> dict:
        return {"dp_mode": self.mode, "dp_sigma": self.sigma, "dp_epsilon_claimed": self.claimed_epsilon,
                "dp_delta": self.delta}

    def state_dict(self) -> dict:
        return {"mode": self.mode, "sigma": self.sigma}

    def load_state_dict(self, state: dict) -> None:
        check_same_mode(self.mode, state)


class ClippedDP:
    """DP-FedAvg: clip every delta to C, uniform mean, noise z C / K, RDP-accounted."""

    mode = "clip"

    def __init__(self, clip: float, noise_multiplier: float, sample_rate: float, delta: float, seed: int):
        from opacus.accountants import RDPAccountant  # imported on use: Opacus takes seconds to import

        self.clip, self.noise_multiplier, self.sample_rate = clip, noise_multiplier, sample_rate
        self.delta, self.seed = delta, noise_seed(seed)
        self.accountant = RDPAccountant()
        self.last_round: dict = {}
        logger.info("DP clip mode: client deltas clipped to L2 norm C=%g, uniform mean over the K sampled clients, "
                    "Gaussian noise std %g * C / K; privacy accounted with Opacus' RDP accountant (subsampled "
                    "Gaussian, q=%.4g, one step per round), epsilon at delta=%g in metrics.jsonl.",
                    clip, noise_multiplier, sample_rate, delta)
        logger.info("DP clip mode: client sampling in this simulation is seeded by the round index, not secret, "
                    "and draws exactly K clients where the accountant assumes Poisson sampling at rate q; the "
                    "amplification by subsampling holds only for a server whose sampling is hidden and random.")

    def privatize(self, x, client_vectors, counts, round_idx, clients):
        k = client_vectors.shape[0]
        norms = kernels.client_delta_norms(x, client_vectors)  # for clipping, and as (non-private) diagnostics
        weights = torch.full((k,), 1.0 / k)
        noise_std = self.noise_multiplier * self.clip / k
        y = kernels.dp_aggregate(x, client_vectors, weights, self.clip, noise_std, self.seed, round_idx, norms=norms)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.last_round = {"dp_noise_std": noise_std, "dp_clipped_clients": int((norms > self.clip).sum()),
                           "dp_delta_norm_mean": float(norms.mean()), "dp_delta_norm_max": float(norms.max())}
        return y.unsqueeze(0), [1]

    def noise_mean(self, x, mean, k, round_idx):
        """The same mechanism when the clients clipped their own deltas (clip_delta) and only their uniform mean
        x + sum_k f_k (y_k - x) / k reached the server (secure aggregation): the same noise, the same accounting.
        The per-client norms stay unknown, so the row has no norm diagnostics."""
        noise_std = self.noise_multiplier * self.clip / k
        y = kernels.dp_aggregate(x, mean.unsqueeze(0), torch.ones(1), None, noise_std, self.seed, round_idx)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.last_round = {"dp_noise_std": noise_std}
        return y

    def epsilon(self) -> float:
        return rdp_epsilon(self.accountant.history, self.delta)

    def metrics(self, run) -> dict:
        return {"dp_mode": self.mode, "dp_epsilon": self.epsilon(), "dp_delta": self.delta, "dp_clip": self.clip,
                "dp_noise_multiplier": self.noise_multiplier, "dp_sample_rate": self.sample_rate, **self.last_round}

    def state_dict(self) -> dict:
        return {"mode": self.mode, "history": [list(entry) for entry in self.accountant.history]}

    def load_state_dict(self, state: dict) -> None:
        check_same_mode(self.mode, state)
        # JSON turns the accountant's (noise_multiplier, sample_rate, steps) tuples into lists; restore them.
        self.accountant.history = [tuple(entry) for entry in state["history"]]


@functools.lru_cache(maxsize=64)
def rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """The subsampled Gaussian mechanism's RDP at every order of RDP_ORDERS, for one step (computed once: the
    large orders take a while, and every round's metrics row asks again)."""
    from opacus.accountants.analysis import rdp
    return tuple(rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS))


def rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at `delta` of an Opacus RDPAccountant history [(noise multiplier, sample rate, steps)], as its
    get_epsilon computes it, over RDP_ORDERS."""
    from opacus.accountants.analysis import rdp
    total = sum(np.array(rdp_of_one_step(z, q)) * steps for z, q, steps in history)
    return float(rdp.get_privacy_spent(orders=RDP_ORDERS, rdp=total, delta=delta)[0])


def clip_delta(x: torch.Tensor, y: torch.Tensor, clip: float) -> torch.Tensor:
    """A client's own clip-mode step: its delta y - x scaled to L2 norm at most C, exactly as the server clips it
    in process (kernels.clip_factors), for a server that sees only the sum (secure aggregation)."""
    norm = kernels.client_delta_norms(x, y.unsqueeze(0))
    return (y.to(torch.float32) - x.to(torch.float32)) * kernels.clip_factors(norm, clip)[0]


def check_same_mode(mode: str, state: dict) -> None:
    if state.get("mode") != mode:
        raise SystemExit(f"--resume: the checkpoint was trained with DP mode {state.get('mode')!r}, this run asks "
                         f"for {mode!r}; resume with the same DP flags.")


def resolve_mode(fed_args) -> str | None:
    """The DP mode asked for: --dp_mode; else the one the algorithm's name implies (feddp: paper); else paper when
    --dp_sigma is given, clip when any other DP flag is; None when DP is not asked for."""
    if fed_args.dp_mode is not None:
        if fed_args.dp_mode not in MODES:
            raise SystemExit(f"--dp_mode {fed_args.dp_mode!r}: choose one of {', '.join(MODES)}.")
        return fed_args.dp_mode
    implied = ALGORITHMS.get(fed_args.fed_alg, Algorithm).dp_mode
    if implied is not None:
        return implied
    if fed_args.dp_sigma is not None:
        return "paper"
    clip_flags = (fed_args.dp_epsilon, fed_args.dp_target_epsilon, fed_args.dp_noise_multiplier,
                  fed_args.dp_clip, fed_args.dp_max_grad_norm)
    return "clip" if any(v is not None for v in clip_flags) else None


def clip_norm(fed_args) -> float:
    """C: --dp_clip, or its alias --dp_max_grad_norm (the paper's name)."""
    if fed_args.dp_clip is not None and fed_args.dp_max_grad_norm is not None \
            and fed_args.dp_clip != fed_args.dp_max_grad_norm:
        raise SystemExit("--dp_clip and --dp_max_grad_norm are the same C: give one of them.")
    for value in (fed_args.dp_clip, fed_args.dp_max_grad_norm):
        if value is not None:
            if value <= 0:
                raise SystemExit(f"--dp_clip must be > 0, got {value}.")
            return value
    return DEFAULT_CLIP


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, num_rounds: int) -> float:
    """The smallest noise multiplier (to Opacus' binary-search tolerance) whose RDP epsilon after num_rounds
    subsampled Gaussian steps is at most target_epsilon."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    # Opacus searches up to a noise multiplier of 1e6 before it gives up, which takes minutes; no useful run has
    # z above 1000, so the budget is checked there first, in one accountant call.
    floor = RDPAccountant()
    floor.history = [(MAX_NOISE_MULTIPLIER, sample_rate, num_rounds)]
    lowest = floor.get_epsilon(delta=delta, alphas=RDP_ORDERS)
    if lowest > target_epsilon:
        raise SystemExit(f"--dp_target_epsilon {target_epsilon:g} cannot be met at delta={delta:g} over {num_rounds} "
                         f"rounds at sampling rate {sample_rate:.4g}: even noise multiplier {MAX_NOISE_MULTIPLIER:g} "
                         f"gives epsilon {lowest:.3g}; raise the epsilon or delta, or lower --num_rounds or "
                         f"--sample_clients.")
    return get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                steps=num_rounds, accountant="rdp", alphas=RDP_ORDERS,
                                epsilon_tolerance=min(CALIBRATION_TOLERANCE, target_epsilon / 100))


def make_paper(fed_args, script_args, sample_counts: list[int], sample_rate: float) -> PaperDP:
    if fed_args.dp_noise_multiplier is not None or fed_args.dp_target_epsilon is not None:
        raise SystemExit("--dp_noise_multiplier and --dp_target_epsilon belong to --dp_mode clip; paper mode takes "
                         "--dp_epsilon (the sigma formula) or --dp_sigma.")
    sigma = fed_args.dp_sigma
    if sigma is None:
        if fed_args.dp_epsilon is None:
            raise SystemExit("DP paper mode needs --dp_epsilon (for the paper's sigma formula) or --dp_sigma.")
        sigma = paper_sigma(fed_args.dp_epsilon, fed_args.dp_delta, script_args.learning_rate, clip_norm(fed_args),
                            sum(sample_counts), len(sample_counts), sample_rate, fed_args.num_rounds)
    claimed = fed_args.dp_epsilon if fed_args.dp_sigma is None else None
    rule = make_rule(fed_args, len(sample_counts))  # its weights: what the noised vectors are averaged with
    return PaperDP(sigma, rule, script_args.seed, claimed, fed_args.dp_delta)


def make_clip(fed_args, script_args, sample_counts: list[int], sample_rate: float) -> ClippedDP:
    if fed_args.dp_sigma is not None:
        raise SystemExit("--dp_sigma is the paper mode's noise; clip mode takes --dp_noise_multiplier or "
                         "--dp_target_epsilon.")
    # --dp_epsilon is the budget in both modes: in clip mode it is the calibration target.
    targets = {v for v in (fed_args.dp_target_epsilon, fed_args.dp_epsilon) if v is not None}
    if len(targets) > 1:
        raise SystemExit("--dp_epsilon and --dp_target_epsilon differ: in clip mode they are the same target.")
    target = targets.pop() if targets else None
    if (target is None) == (fed_args.dp_noise_multiplier is None):
        raise SystemExit("DP clip mode needs exactly one of --dp_noise_multiplier or --dp_target_epsilon "
                         "(--dp_epsilon).")
    noise_multiplier = fed_args.dp_noise_multiplier
    if noise_multiplier is None:
        noise_multiplier = calibrate_noise_multiplier(target, fed_args.dp_delta, sample_rate, fed_args.num_rounds)
        logger.info("DP clip mode: noise multiplier %.4g calibrated for epsilon <= %g at delta=%g after %d rounds.",
                    noise_multiplier, target, fed_args.dp_delta, fed_args.num_rounds)
    if noise_multiplier < 0:
        raise SystemExit(f"--dp_noise_multiplier must be >= 0, got {noise_multiplier}.")
    return ClippedDP(clip_norm(fed_args), noise_multiplier, sample_rate, fed_args.dp_delta, script_args.seed)


MAKERS = {"paper": make_paper, "clip": make_clip}


def check_privacy_arguments(fed_args) -> None:
    """The DP flags' values, checked before any loading (the mode's consistency is checked by make_privacy)."""
    resolve_mode(fed_args)
    positive = [("--dp_epsilon", fed_args.dp_epsilon), ("--dp_target_epsilon", fed_args.dp_target_epsilon),
                ("--dp_clip", fed_args.dp_clip), ("--dp_max_grad_norm", fed_args.dp_max_grad_norm)]
    non_negative = [("--dp_sigma", fed_args.dp_sigma), ("--dp_noise_multiplier", fed_args.dp_noise_multiplier)]
    for flag, value in positive + non_negative:
        if value is None:
            continue
        strict = (flag, value) in positive
        if not math.isfinite(value) or value < 0 or (strict and value == 0):
            raise SystemExit(f"{flag} {value!r} is invalid: it must be a finite number {'> 0' if strict else '>= 0'};"
                             f" pass such a value or omit {flag}.")
    if not 0 < fed_args.dp_delta < 1:
        raise SystemExit(f"--dp_delta must be in (0, 1), got {fed_args.dp_delta}.")


def make_privacy(fed_args, script_args, sample_counts: list[int]) -> PaperDP | ClippedDP | None:
    """The privacy object for run_federated(privacy=...), or None when no DP flag is given. Call it after the
    clients are selected: sample_counts[k] is client k's sample count, and --sample_clients is already clamped."""
    mode = resolve_mode(fed_args)
    if mode is None:
        return None
    if parse_local(fed_args.fed_alg) is not None:
        raise SystemExit(f"--fed_alg {fed_args.fed_alg} trains one client alone: user-level DP needs a federated "
                         f"algorithm.")
    if not 0 < fed_args.dp_delta < 1:
        raise SystemExit(f"--dp_delta must be in (0, 1), got {fed_args.dp_delta}.")
    sample_rate = min(1.0, fed_args.sample_clients / len(sample_counts))
    return MAKERS[mode](fed_args, script_args, sample_counts, sample_rate)
