"""Triton kernels of the server step, with the signatures of their PyTorch twins in kernels/reference.py.

The server step is memory-bound: every kernel streams the K client rows (and x, m, v where needed) once, block by
block, accumulates in fp32 registers and writes each output once.

Interpreter (TRITON_INTERPRET=1, CPU tensors): triton.jit picks compiled or interpreted code when a function is
decorated, and Triton's own library (tl.zeros, tl.sum, tl.randn) is decorated when triton is first imported, so
the variable must be set before the first `import triton` in the process. The tests therefore run these kernels
in a child process (tests/test_kernels_triton.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kernels import reference
from kernels.reference import AGGREGATE_NOISE_CLIENT, SERVER_RULES

GPU_BLOCK, GPU_WARPS = 2048, 8
# The interpreter runs one program at a time in numpy: few large blocks are much faster than many small ones.
INTERPRETER_BLOCK = 1 << 17

_RULE_FEDAVG = tl.constexpr(0)
_RULE_FEDAVGM = tl.constexpr(1)
_RULE_FEDADAGRAD = tl.constexpr(2)
_RULE_FEDYOGI = tl.constexpr(3)
_RULE_FEDADAM = tl.constexpr(4)
_AGGREGATE_CLIENT = tl.constexpr(AGGREGATE_NOISE_CLIENT)
assert SERVER_RULES == ("fedavg", "fedavgm", "fedadagrad", "fedyogi", "fedadam")  # the ids above follow it


@triton.jit
def _accumulate_kernel(BASE, Y, W, OUT, N, K, stride_k, divisor,
                       HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    """OUT = [BASE +] (sum_k W[k] Y[k]) / divisor, fp32 accumulation."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    y_ptrs = Y + offs  # advanced row by row, so row offsets never overflow int32
    for k in range(K):
        acc += tl.load(W + k) * tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        y_ptrs += stride_k
    acc = tl.div_rn(acc, divisor)
    if HAS_BASE:
        acc = tl.load(BASE + offs, mask=mask, other=0.0).to(tl.float32) + acc
    tl.store(OUT + offs, acc, mask=mask)


@triton.jit
def _server_update_kernel(X, Y, W, M, V, OUT, N, K, stride_k,
                          beta1, one_minus_beta1, beta2, one_minus_beta2, eta, tau, m_denom, v_denom,
                          RULE: tl.constexpr, COPY_M: tl.constexpr, SQUARE_DELTA: tl.constexpr,
                          BLOCK: tl.constexpr):
    """One pass of reference.server_update: reads x, the K rows, m and v; writes the new x, m and v."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    y_ptrs = Y + offs
    if RULE == _RULE_FEDAVG:
        for k in range(K):
            acc += tl.load(W + k) * tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
            y_ptrs += stride_k
        tl.store(OUT + offs, acc, mask=mask)
    else:
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        for k in range(K):  # D = sum_k w_k (y_k - x): the small differences first, as the twin does
            acc += tl.load(W + k) * (tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) - x)
            y_ptrs += stride_k
        delta = acc
        if COPY_M:
            m = delta
        else:
            m = tl.load(M + offs, mask=mask, other=0.0) * beta1 + one_minus_beta1 * delta
        tl.store(M + offs, m, mask=mask)
        if RULE == _RULE_FEDAVGM:
            tl.store(OUT + offs, x + tl.div_rn(m, m_denom), mask=mask)
        else:
            v = tl.load(V + offs, mask=mask, other=1.0)
            if SQUARE_DELTA:  # Reddi et al.'s Algorithm 2
                m2 = delta * delta
            else:
                m2 = m * m
            if RULE == _RULE_FEDADAGRAD:
                v = v + m2
            elif RULE == _RULE_FEDYOGI:
                diff = v - m2
                sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
                v = v - one_minus_beta2 * m2 * sign
            else:
                v = v * beta2 + one_minus_beta2 * m2
            tl.store(V + offs, v, mask=mask)
            step = tl.div_rn(eta * tl.div_rn(m, m_denom), tl.sqrt_rn(tl.div_rn(v, v_denom)) + tau)
            tl.store(OUT + offs, x + step, mask=mask)


@triton.jit
def _delta_sq_partials_kernel(X, Y, PARTIALS, N, stride_k, BLOCK: tl.constexpr):
    """PARTIALS[k, b] = sum over block b of (y_k - x)^2: one program per (block, client)."""
    block, k = tl.program_id(0), tl.program_id(1)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + k.to(tl.int64) * stride_k + offs, mask=mask, other=0.0).to(tl.float32)
    delta = y - x
    tl.store(PARTIALS + k * tl.num_programs(0) + block, tl.sum(delta * delta, axis=0))


@triton.jit
def _dp_aggregate_kernel(X, Y, W, NORMS, CLIENT_IDS, OUT, N, K, stride_k, clip_norm, noise_std, noise_key,
                         CLIP: tl.constexpr, NOISE_PER_CLIENT: tl.constexpr, NOISE_ON_MEAN: tl.constexpr,
                         BLOCK: tl.constexpr):
    """OUT = x + sum_k w_k (f_k (y_k - x) [+ sigma n_k]) [+ sigma n], with f_k = min(1, C / norm_k).

    Noise is Philox (tl.randn) keyed by noise_key = seed << 32 | round, with the 64-bit counter
    client << 32 | element: no two (seed, round, client, element) share a counter.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    y_ptrs = Y + offs
    for k in range(K):
        delta = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) - x
        if CLIP:
            delta = delta * tl.minimum(1.0, clip_norm / tl.load(NORMS + k))
        if NOISE_PER_CLIENT:
            counter = (tl.load(CLIENT_IDS + k) << 32) | offs.to(tl.int64)
            delta += noise_std * tl.randn(noise_key, counter)
        acc += tl.load(W + k) * delta
        y_ptrs += stride_k
    if NOISE_ON_MEAN:
        counter = (tl.full((BLOCK,), _AGGREGATE_CLIENT, tl.int64) << 32) | offs.to(tl.int64)
        acc += noise_std * tl.randn(noise_key, counter)
    tl.store(OUT + offs, x + acc, mask=mask)


def interpreting() -> bool:
    """Whether these kernels and Triton's library run in the interpreter (CPU tensors, numpy)."""
    return isinstance(_accumulate_kernel, InterpretedFunction) and isinstance(tl.zeros, InterpretedFunction)


def _block_size(n: int) -> int:
    if interpreting():
        return min(INTERPRETER_BLOCK, triton.next_power_of_2(max(n, 1)))
    return GPU_BLOCK


def _launch(kernel, n: int, *args, clients: int = 1, **constexprs) -> None:
    """Launch kernel over (ceil(n / BLOCK), clients) programs."""
    block = _block_size(n)
    options = {} if interpreting() else {"num_warps": GPU_WARPS}
    kernel[(triton.cdiv(n, block), clients)](*args, BLOCK=block, **constexprs, **options)


def _rows(client_vectors: torch.Tensor) -> torch.Tensor:
    """The [K, N] stack with unit stride along N, as the kernels index it."""
    if client_vectors.dim() != 2:
        raise ValueError(f"client_vectors must be [K, N]; got shape {tuple(client_vectors.shape)}")
    return client_vectors if client_vectors.stride(1) == 1 else client_vectors.contiguous()


def _fp32(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32).contiguous()


def _output(out: torch.Tensor | None, n: int, device) -> torch.Tensor:
    """The caller's fp32 [N] output buffer, or a new one."""
    if out is None:
        return torch.empty(n, dtype=torch.float32, device=device)
    _check_state("out", out, n)
    return out


def _check_state(name: str, state: torch.Tensor | None, n: int) -> None:
    """m, v (updated in place) and out buffers must already be contiguous fp32 [N] tensors."""
    if state is None or state.dtype != torch.float32 or not state.is_contiguous() or state.numel() != n:
        raise ValueError(f"{name} must be a contiguous fp32 tensor of {n} elements")


def weighted_sum(client_vectors: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of reference.weighted_sum."""
    rows = _rows(client_vectors)
    k, n = rows.shape
    out = _output(out, n, rows.device)
    _launch(_accumulate_kernel, n, out, rows, _fp32(weights, rows.device), out, n, k, rows.stride(0), 1.0,
            HAS_BASE=False)
    return out


def scaffold_control_update(c: torch.Tensor, control_deltas: torch.Tensor, num_clients: int,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of reference.scaffold_control_update (out may be c itself: each element is read, then written)."""
    rows = _rows(control_deltas)
    k, n = rows.shape
    out = _output(out, n, rows.device)
    ones = torch.ones(k, dtype=torch.float32, device=rows.device)
    _launch(_accumulate_kernel, n, _fp32(c, rows.device), rows, ones, out, n, k, rows.stride(0),
            float(num_clients), HAS_BASE=True)
    return out


def server_update(rule: str, x: torch.Tensor, client_vectors: torch.Tensor, weights: torch.Tensor,
                  m: torch.Tensor | None, v: torch.Tensor | None, t: int, eta: float = 1e-3, tau: float = 1e-3,
                  beta1: float = 0.5, beta2: float = 0.99, bias_correction: bool = False, reddi: bool = False,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of reference.server_update: one fused pass; returns the new x, updates m and v in place."""
    reference.check_rule(rule)
    rows = _rows(client_vectors)
    k, n = rows.shape
    x32 = _fp32(x, rows.device)
    if rule != "fedavg":
        _check_state("m", m, n)
    if rule not in ("fedavg", "fedavgm"):
        _check_state("v", v, n)
    m_denom, v_denom = reference.bias_denominators(rule, t, beta1, beta2, bias_correction)
    out = _output(out, n, rows.device)
    _launch(_server_update_kernel, n, x32, rows, _fp32(weights, rows.device), x32 if m is None else m,
            x32 if v is None else v, out, n, k, rows.stride(0), beta1, 1 - beta1, beta2, 1 - beta2, eta, tau,
            m_denom, v_denom, RULE=SERVER_RULES.index(rule),
            COPY_M=reference.copies_delta_into_m(rule, t, bias_correction, reddi), SQUARE_DELTA=reddi)
    return out


def client_delta_norms(x: torch.Tensor, client_vectors: torch.Tensor) -> torch.Tensor:
    """Triton twin of reference.client_delta_norms: per-block partial sums of squares, then a small sum."""
    rows = _rows(client_vectors)
    k, n = rows.shape
    partials = torch.empty(k, triton.cdiv(n, _block_size(n)), dtype=torch.float32, device=rows.device)
    _launch(_delta_sq_partials_kernel, n, _fp32(x, rows.device), rows, partials, n, rows.stride(0), clients=k)
    return partials.sum(dim=1).sqrt()


def clip_factors(norms: torch.Tensor, clip_norm: float | None) -> torch.Tensor:
    """K scalars: no kernel needed (dp_aggregate computes them inside its kernel)."""
    return reference.clip_factors(norms, clip_norm)


def dp_aggregate(x: torch.Tensor, client_vectors: torch.Tensor, weights: torch.Tensor, clip_norm: float | None,
                 noise_std: float, seed: int, round_idx: int, noise_per_client: bool = False,
                 client_ids: list[int] | torch.Tensor | None = None, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of reference.dp_aggregate: a norm pass (when clipping), then one fused aggregation pass."""
    rows = _rows(client_vectors)
    k, n = rows.shape
    ids = reference.noise_client_ids(client_ids, k, seed, round_idx)
    x32 = _fp32(x, rows.device)
    clip = clip_norm is not None
    if not clip:
        norms = torch.ones(k, dtype=torch.float32, device=rows.device)
    elif norms is None:
        norms = client_delta_norms(x32, rows)
    else:
        norms = _fp32(norms, rows.device)
    out = torch.empty(n, dtype=torch.float32, device=rows.device)
    _launch(_dp_aggregate_kernel, n, x32, rows, _fp32(weights, rows.device), norms,
            torch.tensor(ids, dtype=torch.int64, device=rows.device), out, n, k, rows.stride(0),
            float(clip_norm) if clip else 1.0, float(noise_std), seed << 32 | round_idx,
            CLIP=clip, NOISE_PER_CLIENT=bool(noise_per_client and noise_std),
            NOISE_ON_MEAN=bool(not noise_per_client and noise_std))
    return out
