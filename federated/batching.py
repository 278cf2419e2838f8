"""How one optimizer step's samples become micro-batches, and the loss of each micro-batch.

An optimizer step always takes batch_size x gradient_accumulation_steps samples. They are split into micro-batches
of batch_size samples (the trainer's way) or, with --token_budget, filled up to a number of tokens; each
micro-batch is collated padded (the library's collator) or padding-free. Each micro-batch's loss is scaled so that
the step's loss is exactly the padded trainer's: SFT averages over the step's response tokens, DPO over its pairs.

Padding-free: a micro-batch's sequences are concatenated into rows whose position ids restart at 0 at every
sequence, with no attention mask. transformers then keeps attention within each sequence (masking_utils detects
packed rows from position_ids: a block-diagonal causal mask for sdpa and eager attention; varlen kernels for flash
attention). The first token of every sequence gets no label, so no sequence is trained to predict the next one's
first token; the padded path never predicts a first token either, so both paths score the same tokens.

How many rows: with flash attention (varlen: attention costs sum L_i^2) all sequences go into one row. Mask-based
attention (sdpa, eager: the CPU, or a GPU without flash-attn) computes a whole T x T score block per row, so one
row of a 16-sample batch would cost more attention than the padded batch; there the sequences are packed
first-fit-decreasing into rows as long as the longest sequence, which leaves a little padding at row ends (each
pad a 1-token sequence of its own, without a label) and bounds attention by the padded batch's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def micro_batches(costs: list[int], per_micro: int, token_budget: int | None, packed: bool) -> list[list[int]]:
    """Consecutive groups of sample indices: `per_micro` samples each, or, with a token budget, as many as fit in
    `token_budget` tokens (a micro-batch costs the sum of its lengths packed, count x longest padded); a sample
    longer than the budget forms a micro-batch on its own."""
    if not token_budget:
        return [list(range(i, min(i + per_micro, len(costs)))) for i in range(0, len(costs), per_micro)]
    groups, current = [], []
    for i in range(len(costs)):
        trial = [*current, i]
        size = sum(costs[j] for j in trial) if packed else len(trial) * max(costs[j] for j in trial)
        if current and size > token_budget:
            groups.append(current)
            trial = [i]
        current = trial
    return groups + [current] if current else groups


def to_device(inputs: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def varlen_attention(model) -> bool:
    """Whether the model's attention takes packed rows as variable-length sequences (flash attention)."""
    return "flash" in str(getattr(model.config, "_attn_implementation", ""))


def pack_rows(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """Sequence indices per row: all in one row when capacity is None, else first-fit decreasing into rows of
    `capacity` tokens."""
    if capacity is None:
        return [list(range(len(lengths)))]
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, space in enumerate(free) if lengths[i] <= space), None)
        if row is None:
            row = len(rows)
            rows.append([])
            free.append(capacity)
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


def packed_batch(sequences: list[tuple[list[int], list[int]]], pad_token_id: int, one_row: bool) -> dict:
    """input_ids, labels, position_ids and sequence_index [rows, width] of (ids, labels) sequences packed into rows;
    each sequence's first label is dropped; padding has position 0, label -100 and sequence index -1."""
    lengths = [len(ids) for ids, _ in sequences]
    rows = pack_rows(lengths, None if one_row else max(lengths))
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    batch = {"input_ids": torch.full(shape, pad_token_id), "labels": torch.full(shape, -100),
             "position_ids": torch.zeros(shape, dtype=torch.long), "sequence_index": torch.full(shape, -1)}
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            (ids, labels), n = sequences[i], lengths[i]
            batch["input_ids"][r, offset:offset + n] = torch.tensor(ids)
            batch["labels"][r, offset + 1:offset + n] = torch.tensor(labels[1:], dtype=torch.long)
            batch["position_ids"][r, offset:offset + n] = torch.arange(n)
            batch["sequence_index"][r, offset:offset + n] = i
            offset += n
    return batch


class SFTBatches:
    """Samples with input_ids and labels (-100 off the responses), already cut to --seq_length. The step's loss is
    the sum of the response tokens' negative log-likelihoods over their count in the whole step, as transformers'
    Trainer does with num_items_in_batch."""

    def __init__(self, trainer):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
        self.model, self.pad_token_id = trainer.model, trainer.processing_class.pad_token_id
        self.padded = DataCollatorForLanguageModeling(pad_token_id=self.pad_token_id)

    def length(self, sample: dict) -> int:
        return len(sample["input_ids"])

    def padded_cost(self, sample: dict) -> int:
        return len(sample["input_ids"])

    def normaliser(self, samples: list[dict]) -> int:
        """The step's number of predicted response tokens (a causal LM never predicts a sequence's first token)."""
        return sum(sum(label != -100 for label in s["labels"][1:]) for s in samples)

    def collate(self, samples: list[dict], packed: bool) -> dict:
        if not packed:
            return self.padded(samples)
        return packed_batch([(s["input_ids"], s["labels"]) for s in samples], self.pad_token_id,
                            varlen_attention(self.model))

    def loss(self, trainer, model, inputs: dict, samples: list[dict], normaliser: int, packed: bool) -> torch.Tensor:
        inputs = {k: v for k, v in inputs.items() if k != "sequence_index"}  # not a model input
        return trainer.compute_loss(model, inputs, num_items_in_batch=max(normaliser, 1))


class PreferenceBatches:
    """Pairs with prompt_ids, chosen_ids and rejected_ids; each sequence prompt + answer is cut to the trainer's
    max_length (keep_start), as trl's collator does. The step's loss is the mean DPO loss over its pairs.

    trl 1.16 has switched its own padding-free DPO off, so the padding-free loss is computed here from the model's
    fused per-token log-probabilities: the sigmoid DPO loss, the paper's, which is what packs exactly. Other trl
    loss settings make `packable` False and train padded."""

    def __init__(self, trainer):
        self.model, self.max_length = trainer.model, trainer.args.max_length
        self.pad_token_id = trainer.processing_class.pad_token_id
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
        labelled = [(ids, [t if keep else -100 for t, keep in zip(ids, mask)]) for ids, mask in sequences]
        return packed_batch(labelled, self.pad_token_id, varlen_attention(self.model))

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
        owner = inputs["sequence_index"][:, 1:].reshape(-1)  # the sequence of each predicted token, -1 on padding
        owner = torch.where(owner < 0, num_sequences, owner)  # padding sums into one extra, dropped slot

        def sequence_logps(outputs):
            per_token = outputs.log_probs.reshape(-1)
            return per_token.new_zeros(num_sequences + 1).index_add(0, owner, per_token)[:num_sequences]

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
    return SFTBatches(trainer)

