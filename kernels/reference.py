"""Plain PyTorch twins of the server-step kernels: the reference semantics (../docs/ALGORITHMS.md).

All operate on one flat fp32 vector of the trainable parameters. `client_vectors` is [K, N] (fp32, bf16 or
fp16); accumulation is always fp32. `weights` is [K] fp32 and sums to 1 (sample-count or uniform weights).
State tensors (`m`, `v`) are [N] fp32 and are updated in place.
"""
from __future__ import annotations

import torch

SERVER_RULES = ("fedavg", "fedavgm", "fedadagrad", "fedyogi", "fedadam")


def weighted_sum(client_vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[k] * client_vectors[k], accumulated in fp32."""
    return weights.to(torch.float32) @ client_vectors.to(torch.float32)


def server_update(rule: str, x: torch.Tensor, client_vectors: torch.Tensor, weights: torch.Tensor,
                  m: torch.Tensor | None, v: torch.Tensor | None, t: int, eta: float = 1e-3, tau: float = 1e-3,
                  beta1: float = 0.5, beta2: float = 0.99, bias_correction: bool = False) -> torch.Tensor:
    """One server step; returns the new global vector and updates m and v in place.

    fedavg:   x <- sum_k w_k y_k
    fedavgm:  D = sum_k w_k (y_k - x); m <- D (t=0) else beta1 m + (1-beta1) D; x <- x + m
    fedadagrad/fedyogi/fedadam: D as above with the caller's weights (uniform in the paper);
              m <- D (t=0, and always for fedadagrad) else beta1 m + (1-beta1) D;
              v <- v + m^2 | v - (1-beta2) m^2 sign(v - m^2) | beta2 v + (1-beta2) m^2;
              x <- x + eta m / (sqrt(v) + tau)
    bias_correction (an option, Reddi et al. style): m is an EMA from zero at every round, and the update uses
    m / (1 - beta1^(t+1)) and, for fedadam, v / (1 - beta2^(t+1)).
    """
    if rule not in SERVER_RULES:
        raise ValueError(f"unknown server rule {rule!r}; expected one of {SERVER_RULES}")
    new_mean = weighted_sum(client_vectors, weights)
    if rule == "fedavg":
        return new_mean
    delta = new_mean - x.to(torch.float32)  # sum_k w_k (y_k - x), as the weights sum to one
    if rule == "fedadagrad" or (t == 0 and not bias_correction):
        m.copy_(delta)
    else:
        m.mul_(beta1).add_(delta, alpha=1 - beta1)
    if rule == "fedavgm":
        return x + m
    m2 = m * m
    if rule == "fedadagrad":
        v.add_(m2)
    elif rule == "fedyogi":
        v.sub_((1 - beta2) * m2 * torch.sign(v - m2))
    else:
        v.mul_(beta2).add_(m2, alpha=1 - beta2)
    m_hat, v_hat = m, v
    if bias_correction and rule != "fedadagrad":
        m_hat = m / (1 - beta1 ** (t + 1))
        if rule == "fedadam":
            v_hat = v / (1 - beta2 ** (t + 1))
    return x + eta * m_hat / (torch.sqrt(v_hat) + tau)


def scaffold_control_update(c: torch.Tensor, control_deltas: torch.Tensor, num_clients: int) -> torch.Tensor:
    """SCAFFOLD server control: c <- c + sum_k dc_k / num_clients (num_clients = all clients, not |S|)."""
    return c + control_deltas.to(torch.float32).sum(dim=0) / num_clients
