"""Server-step operations on one flat parameter buffer.

federated/ calls these functions only. They dispatch to Triton kernels (kernels/triton_kernels.py) when the tensors
are on CUDA, or when FEDLLM_FORCE_TRITON=1 (which the tests use with TRITON_INTERPRET=1 on the CPU), and to the
PyTorch twins in kernels/reference.py otherwise. Triton is imported only on first use, so importing this package
stays cheap and works where Triton is not installed (then the twins are always used, except when forced).
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

from kernels import reference
from kernels.reference import AGGREGATE_NOISE_CLIENT, SERVER_RULES  # noqa: F401

FORCE_TRITON_ENV = "FEDLLM_FORCE_TRITON"


@lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _backend(tensor: torch.Tensor):
    """The module whose implementation runs for tensors like this one: triton_kernels or reference."""
    forced = os.environ.get(FORCE_TRITON_ENV) == "1"
    if not forced and not (tensor.is_cuda and triton_available()):
        return reference
    if not triton_available():
        raise RuntimeError(f"{FORCE_TRITON_ENV}=1 but triton is not installed")
    from kernels import triton_kernels
    if not tensor.is_cuda and not triton_kernels.interpreting():
        raise RuntimeError(f"{FORCE_TRITON_ENV}=1 on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                           "first imported in the process")
    return triton_kernels


def weighted_sum(client_vectors: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k weights[k] client_vectors[k] in fp32 (into out if given); see reference.weighted_sum."""
    return _backend(client_vectors).weighted_sum(client_vectors, weights, out=out)


def server_update(rule: str, x: torch.Tensor, client_vectors: torch.Tensor, weights: torch.Tensor,
                  m: torch.Tensor | None, v: torch.Tensor | None, t: int, eta: float = 1e-3, tau: float = 1e-3,
                  beta1: float = 0.5, beta2: float = 0.99, bias_correction: bool = False, reddi: bool = False,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """One server step (fedavg/fedavgm/fedadagrad/fedyogi/fedadam), new x into out if given (reusing a buffer
    saves page faults on the CPU); see reference.server_update."""
    return _backend(client_vectors).server_update(rule, x, client_vectors, weights, m, v, t, eta=eta, tau=tau,
                                                  beta1=beta1, beta2=beta2, bias_correction=bias_correction,
                                                  reddi=reddi, out=out)


def scaffold_control_update(c: torch.Tensor, control_deltas: torch.Tensor, num_clients: int,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """c + sum_k dc_k / num_clients (into out if given, which may be c); see reference.scaffold_control_update."""
    return _backend(control_deltas).scaffold_control_update(c, control_deltas, num_clients, out=out)


def client_delta_norms(x: torch.Tensor, client_vectors: torch.Tensor) -> torch.Tensor:
    """[K] fp32 ||y_k - x||_2; see reference.client_delta_norms."""
    return _backend(client_vectors).client_delta_norms(x, client_vectors)


def clip_factors(norms: torch.Tensor, clip_norm: float | None) -> torch.Tensor:
    """[K] fp32 min(1, C / norm_k); see reference.clip_factors."""
    return reference.clip_factors(norms, clip_norm)


def dp_aggregate(x: torch.Tensor, client_vectors: torch.Tensor, weights: torch.Tensor, clip_norm: float | None,
                 noise_std: float, seed: int, round_idx: int, noise_per_client: bool = False,
                 client_ids: list[int] | torch.Tensor | None = None, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Clipped, noised weighted aggregate x + mean delta (user-level DP); norms: the clients' delta norms if already
    computed; see reference.dp_aggregate."""
    return _backend(client_vectors).dp_aggregate(x, client_vectors, weights, clip_norm, noise_std, seed, round_idx,
                                                 noise_per_client=noise_per_client, client_ids=client_ids,
                                                 norms=norms)
