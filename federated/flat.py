"""One contiguous fp32 vector for all trainable (LoRA) parameters of a model, and back.

The mapping comes from the parameters themselves (order, shapes, offsets), not from peft's key names, so it
works for any adapter name and for modules_to_save. The server algorithms and kernels work on this vector.

The vector lives where the server step runs: on the GPU when the model trains on one, so that the global vector,
the client vectors and the server state never leave it and the Triton server kernels run inside the round loop;
on the CPU otherwise.
"""
from __future__ import annotations

import torch


class FlatParams:
    def __init__(self, model: torch.nn.Module):
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError("the model has no trainable parameters: wrap it with LoRA first")
        self.numel = sum(p.numel() for _, p in self.named)

    @property
    def device(self) -> torch.device:
        """The server's device: the trainable parameters' GPU, or the CPU."""
        device = self.named[0][1].device
        return device if device.type == "cuda" else torch.device("cpu")

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.named]

    def get(self) -> torch.Tensor:
        """The current trainable parameters as a new fp32 vector on `device`."""
        return torch.cat([p.detach().reshape(-1).to(self.device, torch.float32) for _, p in self.named])

    @torch.no_grad()
    def set(self, vector: torch.Tensor) -> None:
        """Copy `vector` into the trainable parameters (in place, no new parameter tensors)."""
        offset = 0
        for _, p in self.named:
            n = p.numel()
            p.copy_(vector[offset:offset + n].view_as(p))
            offset += n

    @torch.no_grad()
    def add_(self, vector: torch.Tensor, alpha: float = 1.0) -> None:
        """parameters += alpha * vector (used by the SCAFFOLD correction after each local step)."""
        offset = 0
        for _, p in self.named:
            n = p.numel()
            p.add_(vector[offset:offset + n].view_as(p).to(p.device, p.dtype), alpha=alpha)
            offset += n

    def squared_distance(self, vector: torch.Tensor) -> torch.Tensor:
        """||params - vector||^2 as a differentiable scalar (the FedProx term); `vector` is on the params' device."""
        offset, total = 0, 0.0
        for _, p in self.named:
            n = p.numel()
            total = total + ((p.float() - vector[offset:offset + n].view_as(p)) ** 2).sum()
            offset += n
        return total
