"""How one optimizer step's samples become micro-batches, and the loss of each micro-batch.

An optimizer step always takes batch_size x gradient_accumulation_steps samples. They are split into micro-batches
of batch_size samples (the trainer's way) or, with --token_budget, filled up to a number of tokens; each
micro-batch is collated padded (the library's collator) or padding-free. Each micro-batch's loss is scaled so that
the step's loss is exactly the padded trainer's: SFT averages over the step's response tokens, DPO over its pairs.

Padding-free: a micro-batch's sequences are concatenated into one row whose position ids restart at 0 at every
sequence, with no attention mask. transformers then keeps attention within each sequence (masking_utils detects
the packed rows from position_ids: a block-diagonal causal mask for sdpa and eager attention, varlen kernels for
flash attention). The first token of every sequence gets no label, so no sequence is trained to predict the next
one's first token; the padded path never predicts a first token either, so both paths score the same tokens.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def micro_batches(costs: list[int], per_micro: int, token_budget: int | None, packed: bool) -> list[list[int]]:
    """Consecutive groups of sample indices: `per_micro` samples each, or, with a token budget, as many as fit in
    `token_budget` tokens (a micro-batch costs the sum of its lengths packed, count x longest padded); a sample
    longer than the budget forms a micro-batch on its own."""
    if not token_budget:
        return [list(range(i, min(i + per_micro, len(costs)))) for i in range(0, len(costs), per_micro)]
    groups, current = [], []
    for i, cost in enumerate(costs):
        trial = [*current, i]
        size = sum(costs[j] for j in trial) if packed else len(trial) * max(costs[j] for j in trial)
        if current and size > token_budget:
            groups.append(current)
            trial = [i]
        current = trial
    return groups + [current] if current else groups


def to_device(inputs: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _packed_positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


class SFTBatches:
    """Samples with input_ids and labels (-100 off the responses), already cut to --seq_length. The step's loss is
    the sum of the response tokens' negative log-likelihoods over their count in the whole step, as transformers'
    Trainer does with num_items_in_batch."""

    def __init__(self, pad_token_id: int):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
        self.padded = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)
        self.packed = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)

    def length(self, sample: dict) -> int:
        return len(sample["input_ids"])

    def padded_cost(self, sample: dict) -> int:
        return len(sample["input_ids"])

    def normaliser(self, samples: list[dict]) -> int:
        """The step's number of predicted response tokens (a causal LM never predicts a sequence's first token)."""
        return sum(sum(label != -100 for label in s["labels"][1:]) for s in samples)

    def collate(self, samples: list[dict], packed: bool) -> dict:
        return (self.packed if packed else self.padded)(samples)

    def loss(self, trainer, model, inputs: dict, samples: list[dict], normaliser: int, packed: bool) -> torch.Tensor:
        return trainer.compute_loss(model, inputs, num_items_in_batch=max(normaliser, 1))


class PreferenceBatches:
    """Pairs with prompt_ids, chosen_ids and rejected_ids; each sequence prompt + answer is cut to the trainer's
    max_length (keep_start), as trl's collator does. The step's loss is the mean DPO loss over its pairs.

    trl 1.16 has switched its own padding-free DPO off, so the padding-free loss is computed here from the model's
    fused per-token log-probabilities: the sigmoid DPO loss, the paper's, which is what packs exactly. Other trl
    loss settings make `packable` False and train padded."""

    def __init__(self, trainer):
        self.max_length = trainer.args.max_length
        self.padded = trainer.data_collator
        self.packable = (list(trainer.loss_types) == ["sigmoid"] and trainer.ld_alpha is None
                         and trainer.f_divergence_type == "reverse_kl" and not trainer.use_weighting
                         and not trainer.precompute_ref_logps and not trainer.aux_loss_enabled
                         and trainer.ref_model is None)

    def _sequences(self, sample: dict) -> list[tuple[list[int], list[int]]]:
        """(ids, answer mask) of prompt + chosen and prompt + rejected, cut to max_length."""
        prompt, cut = sample["prompt_ids"], slice(None, self.max_length)
        return [((prompt + sample[key])[cut], ([0] * len(prompt) + [1] * len(sample[key]))[cut])
                for key in ("chosen_ids", "rejected_ids")]

    def length(self, sample: dict) -> int:
        return sum(len(ids) for ids, _ in self._sequences(sample))

    def padded_cost(self, sample: dict) -> int:
        return 2 * max(len(ids) for ids, _ in self._sequences(sample))

    def normaliser(self, samples: list[dict]) -> int:
        return len(samples)

    def collate(self, samples: list[dict], packed: bool) -> dict:
        if not packed:
            return self.padded(samples)
        pairs = [self._sequences(s) for s in samples]
        sequences = [pair[0] for pair in pairs] + [pair[1] for pair in pairs]  # all chosen, then all rejected, as trl
        ids = torch.tensor([t for seq, _ in sequences for t in seq])[None]
        labels = torch.tensor([t if keep and j else -100 for seq, mask in sequences
                               for j, (t, keep) in enumerate(zip(seq, mask))])[None]
        lengths = [len(seq) for seq, _ in sequences]
        owner = torch.repeat_interleave(torch.arange(len(sequences)), torch.tensor(lengths))[None]
        return {"input_ids": ids, "labels": labels, "position_ids": _packed_positions(lengths), "sequence_index": owner}

    def loss(self, trainer, model, inputs: dict, samples: list[dict], normaliser: int, packed: bool) -> torch.Tensor:
        share = len(samples) / normaliser
        if not packed:
            return trainer.compute_loss(model, inputs) * share
        return self._packed_dpo_loss(trainer, model, inputs, 2 * len(samples)) * share

    def _packed_dpo_loss(self, trainer, model, inputs: dict, num_sequences: int) -> torch.Tensor:
        """-log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))) averaged over pairs, as trl's sigmoid loss; the
        reference is the base model (adapter disabled), as trl runs it for a PEFT model without a ref adapter."""
        from trl.trainer.utils import use_adapter
        forward = {"input_ids": inputs["input_ids"], "position_ids": inputs["position_ids"],
                   "labels": inputs["labels"], "use_cache": False, "fused_lm_head": True}
        owner = inputs["sequence_index"][0, 1:]  # the sequence of each predicted token

        def sequence_logps(outputs):
            per_token = outputs.log_probs[0]
            return per_token.new_zeros(num_sequences).index_add(0, owner, per_token)

        policy = sequence_logps(model(**forward))
        unwrapped = trainer.accelerator.unwrap_model(model)
        with torch.no_grad(), use_adapter(unwrapped, "ref" if "ref" in unwrapped.peft_config else None):
            reference = sequence_logps(model(**forward))
        chosen, rejected = (policy - reference).chunk(2)
        return -F.logsigmoid(trainer.beta * (chosen - rejected)).mean()


def batch_kind(trainer):
    """SFTBatches or PreferenceBatches for a trl SFTTrainer or DPOTrainer."""
    from trl import DPOTrainer
    if isinstance(trainer, DPOTrainer):
        return PreferenceBatches(trainer)
    return SFTBatches(trainer.processing_class.pad_token_id)

