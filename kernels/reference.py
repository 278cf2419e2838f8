"""Plain PyTorch twins of the server-step kernels: the reference semantics (docs/ALGORITHMS.md).

All operate on one flat fp32 vector of the trainable parameters. `client_vectors` is [K, N] (fp32, bf16 or
fp16); accumulation is always fp32. `weights` is [K] fp32 and sums to 1 (sample-count or uniform weights).
State tensors (`m`, `v`) are [N] fp32 and are updated in place.

Every function here has a Triton twin in kernels/triton_kernels.py with the same signature; kernels/__init__.py
chooses between them. These twins define the semantics and are what the tests compare the kernels against.
"""
from __future__ import annotations

import torch

SERVER_RULES = ("fedavg", "fedavgm", "fedadagrad", "fedyogi", "fedadam")

# Noise streams are keyed by (seed, round, client). The noise added to the aggregate (not to one client) uses
# this reserved client id; real client ids must be smaller.
AGGREGATE_NOISE_CLIENT = 2**32 - 1


# The twins work slice by slice: one slice of every input and temporary stays in cache, so a step reads each input
# from memory once instead of once per elementwise op, and every op runs on all cores (torch.mv would not).
# 512K elements measured fastest on a 2-core VM (docs/BENCHMARKS.md).
SLICE = 1 << 19


def _slices(n: int):
    return (slice(start, start + SLICE) for start in range(0, n, SLICE))


def _new_out(like: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(like.shape[-1], dtype=torch.float32, device=like.device) if out is None else out


def _accumulate(out: torch.Tensor, rows: torch.Tensor, weights: list[float], base: torch.Tensor | None = None):
    """out = [base +] sum_k weights[k] rows[k] on one slice, in fp32, adding the rows in order k = 0, 1, ..."""
    if base is None:
        torch.mul(rows[0].to(torch.float32), weights[0], out=out)  # cast first: a bf16 product would round
    else:
        torch.add(base, rows[0], alpha=weights[0], out=out)
    for row, weight in zip(rows[1:], weights[1:]):
        out.add_(row, alpha=weight)  # computed in out's fp32
    return out


def _accumulate_deltas(out: torch.Tensor, rows: torch.Tensor, weights: list[float], x: torch.Tensor,
                       scratch: torch.Tensor) -> torch.Tensor:
    """out = sum_k weights[k] (rows[k] - x) on one slice, in fp32. Each y_k - x is exact or nearly (y_k is close
    to x), so D keeps its own precision instead of the ulp of x that sum_k w_k y_k - x would leave it."""
    torch.sub(rows[0], x, out=out).mul_(weights[0])
    for row, weight in zip(rows[1:], weights[1:]):
        out.add_(torch.sub(row, x, out=scratch), alpha=weight)
    return out


def weighted_sum(client_vectors: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k weights[k] * client_vectors[k], accumulated in fp32 (into `out`, an fp32 [N] tensor, if given).

    Reusing `out` across rounds matters on the CPU: a fresh [N] result costs page faults comparable to the sum.
    """
    out = _new_out(client_vectors, out)
    weights = weights.to(torch.float32).tolist()
    for part in _slices(out.numel()):
        _accumulate(out[part], client_vectors[:, part], weights)
    return out


def server_update(rule: str, x: torch.Tensor, client_vectors: torch.Tensor, weights: torch.Tensor,
                  m: torch.Tensor | None, v: torch.Tensor | None, t: int, eta: float = 1e-3, tau: float = 1e-3,
                  beta1: float = 0.5, beta2: float = 0.99, bias_correction: bool = False, reddi: bool = False,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """One server step; returns the new global vector (in `out` if given, fp32 [N], not x) and updates m and v in
    place.

    fedavg:   x <- sum_k w_k y_k
    fedavgm:  D = sum_k w_k (y_k - x); m <- D (t=0) else beta1 m + (1-beta1) D; x <- x + m
    fedadagrad/fedyogi/fedadam: D as above with the caller's weights (uniform in the paper);
              m <- D (t=0, and always for fedadagrad) else beta1 m + (1-beta1) D;
              v <- v + m^2 | v - (1-beta2) m^2 sign(v - m^2) | beta2 v + (1-beta2) m^2;
              x <- x + eta m / (sqrt(v) + tau)
    bias_correction (an option, Reddi et al. style): m is an EMA from zero at every round, and the update uses
    m / (1 - beta1^(t+1)) (fedavgm, fedyogi, fedadam) and, for fedadam, v / (1 - beta2^(t+1)).
    reddi (Reddi et al. 2021, Algorithm 2; fedadagrad/fedyogi/fedadam): m <- beta1 m + (1-beta1) D in every round
    and for every rule (m starts at 0), and v is updated from D^2 instead of m^2.
    """
    check_rule(rule)
    if rule == "fedavg":
        return weighted_sum(client_vectors, weights, out=out)
    out = _new_out(x, out)
    weights = weights.to(torch.float32).tolist()
    copy_m = copies_delta_into_m(rule, t, bias_correction, reddi)
    m_denom, v_denom = bias_denominators(rule, t, beta1, beta2, bias_correction)
    scratch = torch.empty((3, min(SLICE, x.numel())), dtype=torch.float32, device=x.device)
    for part in _slices(x.numel()):
        x_part, m_part, out_part = x[part].to(torch.float32), m[part], out[part]
        delta, tmp = scratch[0, :out_part.numel()], scratch[1, :out_part.numel()]
        _accumulate_deltas(delta, client_vectors[:, part], weights, x_part, tmp)  # D = sum_k w_k (y_k - x)
        if copy_m:
            m_part.copy_(delta)
        else:
            m_part.mul_(beta1).add_(delta, alpha=1 - beta1)
        if rule == "fedavgm":
            torch.add(x_part, m_part, alpha=1 / m_denom, out=out_part)
            continue
        if reddi:  # v from D^2; D is still needed, so the third buffer is the scratch
            _second_moment(rule, v[part], delta, beta2, tmp, scratch[2, :out_part.numel()])
        else:
            _second_moment(rule, v[part], m_part, beta2, tmp, delta)
        v_hat = v[part] if v_denom == 1.0 else torch.div(v[part], v_denom, out=tmp)
        torch.sqrt(v_hat, out=tmp).add_(tau)  # sqrt(v^) + tau
        torch.addcdiv(x_part, m_part, tmp, value=eta / m_denom, out=out_part)  # x + eta m^ / (sqrt(v^) + tau)
    return out


def _second_moment(rule, v, m, beta2, m2, scratch) -> None:
    """v <- v + m^2 (fedadagrad) | v - (1-beta2) m^2 sign(v - m^2) (fedyogi) | beta2 v + (1-beta2) m^2 (fedadam),
    in place; m2 and scratch are work buffers of v's size."""
    if rule == "fedadagrad":
        v.addcmul_(m, m)
    elif rule == "fedyogi":
        torch.mul(m, m, out=m2)
        torch.sub(v, m2, out=scratch).sign_()
        v.addcmul_(m2, scratch, value=-(1 - beta2))
    else:
        v.mul_(beta2).addcmul_(m, m, value=1 - beta2)


def check_rule(rule: str) -> None:
    if rule not in SERVER_RULES:
        raise ValueError(f"unknown server rule {rule!r}; expected one of {SERVER_RULES}")


def copies_delta_into_m(rule: str, t: int, bias_correction: bool, reddi: bool = False) -> bool:
    """Whether m <- D this round (FedAdagrad always; the others at t=0 unless m is a bias-corrected EMA); never
    in Reddi et al.'s Algorithm 2, where m is an EMA from 0 for every rule."""
    if reddi:
        return False
    return rule == "fedadagrad" or (t == 0 and not bias_correction)


def bias_denominators(rule: str, t: int, beta1: float, beta2: float, bias_correction: bool) -> tuple[float, float]:
    """(m divisor, v divisor) of the update: 1 and 1 unless bias correction applies to the rule."""
    if not bias_correction or rule in ("fedavg", "fedadagrad"):
        return 1.0, 1.0
    return 1 - beta1 ** (t + 1), (1 - beta2 ** (t + 1)) if rule == "fedadam" else 1.0


def scaffold_control_update(c: torch.Tensor, control_deltas: torch.Tensor, num_clients: int,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """SCAFFOLD server control: c <- c + sum_k dc_k / num_clients (num_clients = all clients, not |S|).

    The result goes to `out` if given (fp32 [N]; it may be c itself, which updates the control in place).
    """
    out = _new_out(c, out)
    weights = [1.0 / num_clients] * control_deltas.shape[0]
    for part in _slices(out.numel()):
        _accumulate(out[part], control_deltas[:, part], weights, base=c[part].to(torch.float32))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Differential privacy: clipping of client deltas and Gaussian noise, fused into the aggregation.
# ----------------------------------------------------------------------------------------------------------------

def client_delta_norms(x: torch.Tensor, client_vectors: torch.Tensor) -> torch.Tensor:
    """[K] fp32: ||y_k - x||_2 for every client, the input of per-client clipping.

    One client row at a time, so the twin never materialises a [K, N] fp32 copy of the stack.
    """
    x = x.to(torch.float32)
    return torch.stack([torch.linalg.vector_norm(row.to(torch.float32) - x) for row in client_vectors])


def clip_factors(norms: torch.Tensor, clip_norm: float | None) -> torch.Tensor:
    """[K] fp32: min(1, C / norm_k), the factor that scales delta_k to L2 norm at most C (1 when C is None)."""
    if clip_norm is None:
        return torch.ones_like(norms, dtype=torch.float32)
    return torch.clamp(clip_norm / norms.to(torch.float32), max=1.0)  # a zero norm gives inf, clamped to 1


def dp_aggregate(x: torch.Tensor, client_vectors: torch.Tensor, weights: torch.Tensor, clip_norm: float | None,
                 noise_std: float, seed: int, round_idx: int, noise_per_client: bool = False,
                 client_ids: list[int] | torch.Tensor | None = None, norms: torch.Tensor | None = None) -> torch.Tensor:
    """The new aggregate x + sum_k w_k (f_k (y_k - x) [+ n_k]) [+ n], fp32 [N].

    x: [N] global vector before the round; client_vectors: [K, N] (fp32/bf16/fp16); weights: [K], summing to 1.
    clip_norm: C, each delta is scaled by f_k = min(1, C / ||y_k - x||) (None: no clipping, the paper's mode).
    noise_std: sigma of the Gaussian noise per coordinate (0: none). With noise_per_client=False one draw n is
    added to the weighted mean delta; with noise_per_client=True (the paper's Appendix D) every client's vector
    gets its own draw n_k before the weighted average.
    seed, round_idx, client_ids: the noise is a deterministic function of (seed, round_idx, client id) and differs
    for any other triple. client_ids default to 0..K-1; pass the real client indices so that a client's noise
    does not depend on its position in the stack. Ranges: 0 <= seed < 2^31, 0 <= round_idx < 2^32,
    0 <= client id < 2^32 - 1.
    For a server optimizer on top (FedAvgM, FedAdam...), pass the result as a one-row stack with weight 1 to
    server_update.
    norms: client_delta_norms(x, client_vectors) if the caller has them already (used only when clipping).

    The twin's noise comes from torch's generator (mt19937 on the CPU, seeded with 32 bits mixed from the triple);
    it is statistically equivalent to, not bit-identical with, the Triton kernel's Philox noise.
    """
    ids = noise_client_ids(client_ids, client_vectors.shape[0], seed, round_idx)
    x32 = x.to(torch.float32)
    if clip_norm is not None and norms is None:
        norms = client_delta_norms(x32, client_vectors)
    factors = torch.ones(len(ids)) if clip_norm is None else clip_factors(norms, clip_norm)
    weights = weights.to(x32.device, torch.float32)
    mean_delta = torch.zeros_like(x32)
    for k, row in enumerate(client_vectors):
        delta = (row.to(torch.float32) - x32) * factors[k]
        if noise_per_client and noise_std:
            delta += noise_std * gaussian_noise(x32.numel(), seed, round_idx, ids[k], x32.device)
        mean_delta += weights[k] * delta
    if not noise_per_client and noise_std:
        mean_delta += noise_std * gaussian_noise(x32.numel(), seed, round_idx, AGGREGATE_NOISE_CLIENT, x32.device)
    return x32 + mean_delta


def noise_client_ids(client_ids, num_rows: int, seed: int, round_idx: int) -> list[int]:
    """Validated client ids (default 0..K-1) and key ranges, so that no two triples share a noise stream."""
    ids = list(range(num_rows)) if client_ids is None else [int(i) for i in client_ids]
    if len(ids) != num_rows:
        raise ValueError(f"{len(ids)} client ids for {num_rows} client vectors")
    if not 0 <= seed < 2**31 or not 0 <= round_idx < 2**32:
        raise ValueError(f"noise seed must be in [0, 2^31) and round in [0, 2^32); got {seed}, {round_idx}")
    if any(not 0 <= i < AGGREGATE_NOISE_CLIENT for i in ids):
        raise ValueError(f"client ids must be in [0, 2^32 - 1); got {ids}")
    return ids


def gaussian_noise(n: int, seed: int, round_idx: int, client: int, device) -> torch.Tensor:
    """n draws of N(0, 1) from a torch generator seeded from (seed, round, client)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(_mix64((seed << 32 | round_idx) ^ _mix64(client)))
    return torch.randn(n, generator=generator, device=device, dtype=torch.float32)


def _mix64(z: int) -> int:
    """SplitMix64's finaliser: spreads every input bit over the 64 output bits (mt19937 keeps the low 32)."""
    z = (z + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)
