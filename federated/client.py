"""Local training of one client: a short loop over the library trainer's loss (trl SFTTrainer or DPOTrainer),
with the trainer, its optimizer and the tokenised data built once per run.

Trainer.train() costs several times a small step in set-up per call (accelerate preparation, dataloader,
optimizer and scheduler creation, callbacks, metrics, a gc.collect()), and Fed-ChatbotPA's clients mostly run
1-3 steps. So the loop here does only what a step needs: draw the step's samples, collate them into micro-batches
(federated/batching.py: padded or padding-free, by count or by token budget), forward/backward through the
trainer's own compute_loss, clip the gradient norm, step a reset AdamW. The algorithm's client hooks (FedProx
term, SCAFFOLD correction) enter once per optimizer step.
"""
from __future__ import annotations

import logging
import math
import random
import time

import torch
from transformers import set_seed

from federated.algorithms import ClientHooks
from federated.batching import batch_kind, micro_batches, to_device
from federated.flat import FlatParams

logger = logging.getLogger(__name__)


class LocalTrainer:
    """Runs one client's local training on a trainer built once for the whole run.

    padding_free packs each micro-batch's samples into rows (exact: same loss and gradient as padding);
    token_budget fills micro-batches up to that many tokens instead of batch_size samples. An optimizer step
    takes batch_size x gradient_accumulation_steps samples either way."""

    def __init__(self, trainer, flat: FlatParams, padding_free: bool = True, token_budget: int | None = None):
        self.trainer, self.flat, self.token_budget = trainer, flat, token_budget
        self.kind = batch_kind(trainer)
        self.packed = padding_free and getattr(self.kind, "packable", True)
        if padding_free and not self.packed:
            logger.warning("padding-free training is exact only for the sigmoid DPO loss without reference-model "
                           "extras; training padded")
        args = trainer.args
        self.per_micro, self.per_step = args.per_device_train_batch_size, (
            args.per_device_train_batch_size * args.gradient_accumulation_steps)
        if args.activation_checkpointing:  # Trainer.train() would switch it on at every call
            trainer.model.activation_checkpointing_enable()
        self.optimizer = trainer.create_optimizer()  # one AdamW for the run, its state cleared per client
        self.params = [p for p in trainer.model.parameters() if p.requires_grad]
        self.step_seconds: list[float] = []  # forward, backward and optimizer step of each step of the last call
        self.tokens = {"useful": 0, "computed": 0}  # tokens of the last call: real ones, and with padding

    def _reset_optimizer(self, lr: float) -> None:
        self.optimizer.state.clear()  # a fresh AdamW per client, as the reference builds one
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)

    def _step_indices(self, n: int, steps: int, generator: torch.Generator):
        """Each step's sample indices: consecutive chunks of passes over the round's samples (shuffled, or in
        stored order with --quality_order), a pass's last chunk short when n is not a multiple, as a dataloader."""
        shuffle = self.trainer.args.train_sampling_strategy != "sequential"
        done = 0
        while n and done < steps:
            order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
            for start in range(0, n, self.per_step):
                if done == steps:
                    return
                yield order[start:start + self.per_step]
                done += 1

    def train(self, dataset, steps: int, lr: float, hooks: ClientHooks, seed: int) -> tuple[float, int]:
        """Train `steps` optimizer steps at constant `lr`; returns (mean train loss, steps done)."""
        trainer, model, kind = self.trainer, self.trainer.model, self.kind
        set_seed(seed)  # shuffling and dropout depend on (seed, round, client) only: exact resume
        generator = torch.Generator().manual_seed(seed)
        model.train()
        self._reset_optimizer(lr)
        self.step_seconds, self.tokens = [], {"useful": 0, "computed": 0}
        device, total = next(iter(self.params)).device, 0.0
        for indices in self._step_indices(len(dataset), steps, generator):
            samples = [dataset[i] for i in indices]
            start = time.perf_counter()
            total += self._step(trainer, model, kind, samples, hooks, lr, device)
            self.step_seconds.append(time.perf_counter() - start)
        for metrics in getattr(trainer, "_metrics", {}).values():
            metrics.clear()  # trl's per-call metrics are not read: do not let them grow over clients
        return total / max(steps, 1), steps

    def _step(self, trainer, model, kind, samples, hooks, lr, device) -> float:
        costs = [(kind.length if self.packed else kind.padded_cost)(s) for s in samples]
        normaliser = kind.normaliser(samples)
        step_loss = 0.0
        for group in micro_batches(costs, self.per_micro, self.token_budget, self.packed):
            micro = [samples[i] for i in group]
            inputs = to_device(kind.collate(micro, self.packed), device)
            self.tokens["useful"] += sum(kind.length(s) for s in micro)
            self.tokens["computed"] += inputs["input_ids"].numel()
            with trainer.accelerator.autocast():
                loss = kind.loss(trainer, model, inputs, micro, normaliser, self.packed)
            loss.backward()
            step_loss += loss.detach()
        term = hooks.loss_term(self.flat)  # once per optimizer step (FedProx)
        if term is not None:
            term.backward()
            step_loss += term.detach()
        if trainer.args.max_grad_norm and trainer.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, trainer.args.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        hooks.after_optimizer_step(self.flat, lr)
        return float(step_loss)


def round_subset(dataset, round_idx: int, num_samples: int, ordered_over_rounds: int | None = None):
    """This round's data of a client: a random subset of `num_samples` (all if it has fewer), seeded by round.

    With ordered_over_rounds=R (--quality_order) the data keeps its stored order (high to low quality): round t
    takes the window that starts t/R of the way through, so training moves from the best samples to the rest."""
    n = len(dataset)
    if ordered_over_rounds:
        start = int(round_idx / ordered_over_rounds * n)
        return dataset.select([(start + i) % n for i in range(min(n, num_samples))])
    return dataset.select(random.Random(round_idx).sample(range(n), min(n, num_samples)))


def local_steps(script_args, fed_args, num_samples: int, num_clients: int) -> int:
    """max_steps; with --local_epochs one epoch, ceil(n / (bs ga)); with --dynamic_local_step about three epochs
    over the run: ceil(3 n / p / (bs ga)), p = num_rounds * sample_clients / num_clients (the expected number of
    rounds a client is sampled)."""
    per_step = script_args.batch_size * script_args.gradient_accumulation_steps
    if fed_args.local_epochs:
        return math.ceil(num_samples / per_step)  # round_subset then takes all n samples, shuffled per round
    if not script_args.dynamic_local_step:
        return script_args.max_steps
    p = fed_args.num_rounds * fed_args.sample_clients / num_clients
    return max(1, math.ceil(num_samples * 3 / p / per_step))


def client_seed(seed: int, round_idx: int, client: int) -> int:
    return ((seed * 1_000_003 + round_idx) * 1_000_003 + client) % (2 ** 32)


def is_finite(vector: torch.Tensor) -> bool:
    return bool(torch.isfinite(vector).all())
