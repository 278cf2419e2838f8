"""Local training of one client with a library trainer (trl SFTTrainer or DPOTrainer), built once per run.

The trainer is reused for every client and round: we swap in the client's data for the round, its step count
and learning rate, and a fresh optimizer, instead of building a new trainer and re-tokenising every time as the
reference code does. The algorithm's client hooks (FedProx term, SCAFFOLD correction) enter through one mixin
and one callback that work for any trainer class.
"""
from __future__ import annotations

import math
import random

import torch
from transformers import PrinterCallback, TrainerCallback, set_seed

from federated.algorithms import ClientHooks
from federated.flat import FlatParams


class ClientHooksMixin:
    """Adds ClientHooks.loss_term to the trainer's loss; mixed into SFTTrainer/DPOTrainer by `with_client_hooks`."""
    client_hooks: ClientHooks = ClientHooks()
    flat: FlatParams | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        term = self.client_hooks.loss_term(self.flat)
        if term is None:
            return out
        # The term must count once per optimizer step. Trainer divides each micro-batch loss by the accumulation
        # steps unless the loss was already normalised over the whole accumulated batch.
        if self._loss_already_scaled(num_items_in_batch):
            term = term / self.args.gradient_accumulation_steps
        if return_outputs:
            loss, outputs = out
            return loss + term, outputs
        return out + term

    def _loss_already_scaled(self, num_items_in_batch) -> bool:
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return self.loss_is_scaled_for_ga
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)


def with_client_hooks(trainer_class: type) -> type:
    """`trainer_class` with the client hooks mixed in (one mixin for SFT and DPO, no copied subclasses)."""
    return type(f"Federated{trainer_class.__name__}", (ClientHooksMixin, trainer_class), {})


class _AfterStepCallback(TrainerCallback):
    def __init__(self, local: "LocalTrainer"):
        self.local = local

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.local.trainer.client_hooks.after_optimizer_step(self.local.flat, args.learning_rate)


class LocalTrainer:
    """Runs one client's local training on a trainer that was built once for the whole run."""

    def __init__(self, trainer, flat: FlatParams):
        self.trainer, self.flat = trainer, flat
        trainer.flat = flat
        trainer.add_callback(_AfterStepCallback(self))
        trainer.remove_callback(PrinterCallback)  # the round bar and metrics.jsonl report progress instead

    def train(self, dataset, steps: int, lr: float, hooks: ClientHooks, seed: int) -> tuple[float, int]:
        """Train `steps` optimizer steps at constant `lr`; returns (mean train loss, steps done)."""
        trainer = self.trainer
        trainer.client_hooks = hooks
        trainer.train_dataset = dataset
        trainer.args.max_steps = steps
        trainer.args.learning_rate = lr
        trainer.optimizer, trainer.lr_scheduler = None, None  # a fresh AdamW per client, as the reference
        set_seed(seed)  # shuffling and dropout depend on (seed, round, client) only: exact resume
        output = trainer.train()
        return float(output.training_loss), int(output.global_step)


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
