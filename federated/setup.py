"""Run set-up shared by main_sft.py and main_dpo.py: everything before the round loop that does not depend on
the local trainer (load and choose clients, quality filtering, language groups, the model with LoRA)."""
from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import Callable

import torch

from data import load_federated_dataset
from federated.config import dataset_options
from utils.model import load_base_model, load_tokenizer, wrap_with_lora

logger = logging.getLogger(__name__)


def load_dataset_for(script_args, kinds: tuple[str, ...], entry: str):
    """The run's dataset, checked to hold `kinds` of samples, after the optional IRA filter and ordering."""
    kind = "preference" if kinds == ("preference",) else None
    dataset = load_federated_dataset(script_args.dataset, local_data_dir=script_args.local_data_dir, kind=kind,
                                     **dataset_options(script_args))
    if dataset.kind not in kinds:
        raise SystemExit(f"{dataset.described} holds {dataset.kind} samples, which {entry} does not train: "
                         f"use {'main_dpo.py' if dataset.kind == 'preference' else 'main_sft.py'}.")
    return apply_quality(dataset, script_args)


def apply_quality(dataset, script_args):
    """FedDQC-style data quality control: drop low-IRA samples and/or train from high to low IRA."""
    if not (script_args.quality_filter or script_args.quality_order):
        return dataset
    if script_args.quality_filter not in (None, "ira"):
        raise SystemExit(f"Unknown --quality_filter {script_args.quality_filter!r}: the supported score is 'ira'.")
    from data.quality import filter_with_scores, order_by_quality, score_dataset
    scores = score_dataset(dataset, model_name_or_path=script_args.quality_model or script_args.model_name_or_path,
                           max_length=script_args.seq_length)
    if script_args.quality_filter:  # the kept samples' scores come along: no second scoring pass for the order
        dataset, scores = filter_with_scores(dataset, scores, script_args.quality_threshold)
    if script_args.quality_order:
        dataset = order_by_quality(dataset, scores)
    return dataset


def select_clients(dataset, fed_args) -> list[list[dict]]:
    """--num_clients defaults to all clients; fewer takes the first N; --sample_clients is clamped to it."""
    available = dataset.num_clients
    if fed_args.num_clients is None:
        fed_args.num_clients = available
    if fed_args.num_clients > available:
        raise SystemExit(f"--num_clients {fed_args.num_clients} exceeds the {available} clients of "
                         f"{dataset.described}; "
                         f"pass --num_clients {available} or fewer.")
    if fed_args.sample_clients > fed_args.num_clients:
        logger.warning("--sample_clients %d > --num_clients %d: sampling all %d clients each round.",
                       fed_args.sample_clients, fed_args.num_clients, fed_args.num_clients)
        fed_args.sample_clients = fed_args.num_clients
    return dataset.clients[:fed_args.num_clients]


def group_runs(dataset, script_args, fed_args) -> list[tuple[str, list[int], object, object]]:
    """(name, client indices, script_args, fed_args) per independent federation: one for the whole run, or with
    --client_groups one per language group, aggregating only within it, in its own output subfolder."""
    members = list(range(fed_args.num_clients))
    if not script_args.client_groups:
        return [("all", members, script_args, fed_args)]
    from data.groups import client_groups
    runs, folders = [], {}
    skip = tuple(name.strip() for name in (script_args.skip_groups or "").split(",") if name.strip())
    for name, indices in client_groups(dataset, script_args.client_groups, skip=skip).items():
        indices = [i for i in indices if i in members]
        folder = group_folder(name)
        if folder in folders:
            raise SystemExit(f"--client_groups: groups {folders[folder]!r} and {name!r} would share the folder "
                             f"{folder}; make the language names in the data distinct in letters and digits.")
        folders[folder] = name
        group_dir = f"{script_args.output_dir}/{folder}"
        runs.append((name, indices, replace(script_args, output_dir=group_dir),
                     replace(fed_args, num_clients=len(indices), sample_clients=min(fed_args.sample_clients,
                                                                                     len(indices)))))
    return runs


def group_folder(name: str) -> str:
    """A group's output subfolder: group-<name>, every run of characters other than letters, digits, '.', '_' and
    '-' replaced by '_' (the name is a language read from the data: it may hold '/', spaces or '..')."""
    return "group-" + re.sub(r"[^\w.-]+", "_", name)


def drop_untrainable(tokenized: list[list[dict]], trainable: Callable[[dict], bool], client_ids: list[str],
                     seq_length: int) -> list[list[dict]]:
    """Each client's tokenised samples without those whose prompt fills --seq_length (no response token is left
    to learn from: they would train on nothing and report a loss of 0). One warning with the count; a client left
    with no sample is refused."""
    kept = [[sample for sample in samples if trainable(sample)] for samples in tokenized]
    dropped = {cid: len(before) - len(after) for cid, before, after in zip(client_ids, tokenized, kept)
               if len(before) > len(after)}
    if dropped:
        logger.warning("%d samples of %d clients have a prompt that fills --seq_length %d and leave no response token "
                       "to learn from; they are dropped (a larger --seq_length keeps them). Per client: %s",
                       sum(dropped.values()), len(dropped), seq_length,
                       ", ".join(f"{cid}: {n}" for cid, n in list(dropped.items())[:20])
                       + (", ..." if len(dropped) > 20 else ""))
    empty = [cid for cid, samples in zip(client_ids, kept) if not samples]
    if empty:
        raise SystemExit(f"Client {empty[0]!r} (and {len(empty) - 1} more) has no sample whose response fits in "
                         f"--seq_length {seq_length}: raise --seq_length, or leave the client out (--num_clients).")
    return kept


def load_lora_model(script_args, fed_args=None):
    """The LoRA-wrapped base model, seeded so that LoRA's initial A matrices are reproducible, prepared for
    fed_args' --lora_method (ffa freezes every lora_A) before any optimizer or flat vector is built on it."""
    from transformers import set_seed  # transformers' trainer utilities import peft: not before the data is loaded

    set_seed(script_args.seed)
    model = load_base_model(script_args.model_name_or_path, script_args.load_in_8bit, script_args.load_in_4bit)
    model = wrap_with_lora(model, r=script_args.peft_lora_r, alpha=script_args.peft_lora_alpha,
                           dropout=script_args.peft_lora_dropout)
    if fed_args is not None:
        from federated.lora_methods import make_lora_method
        make_lora_method(fed_args).prepare_model(model)
    return model


def load_model_with_lora(script_args):
    """Tokenizer and LoRA-wrapped base model."""
    tokenizer = load_tokenizer(script_args.model_name_or_path, script_args.seq_length)
    return tokenizer, load_lora_model(script_args)


def local_trainer(trainer, model, script_args):
    """The run's LocalTrainer: the trainer's loss in a lean step loop, padded or padding-free, by count or tokens."""
    from federated.client import LocalTrainer
    from federated.flat import FlatParams
    return LocalTrainer(trainer, FlatParams(model), padding_free=script_args.padding_free,
                        token_budget=script_args.token_budget)


def trainer_arguments(script_args, output_dir: str) -> dict:
    """The local-training settings SFTConfig and DPOConfig share: the round's constant learning rate, no saving
    or logging by the trainer (the round loop does both), CPU or bf16 on GPU."""
    return dict(
        output_dir=f"{output_dir}/trainer", per_device_train_batch_size=script_args.batch_size,
        gradient_accumulation_steps=script_args.gradient_accumulation_steps, max_steps=script_args.max_steps,
        learning_rate=script_args.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        max_length=script_args.seq_length, activation_checkpointing=script_args.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=script_args.seed,
        # --quality_order: each round takes the next window of the client's high-to-low IRA data, in order.
        train_sampling_strategy="sequential" if script_args.quality_order else "random")
