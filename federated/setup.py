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
    """The run's dataset, checked to hold `kinds` of samples, after the optional quality filter and ordering and
    FedDCA's augmentation."""
    kind = "preference" if kinds == ("preference",) else None
    dataset = load_federated_dataset(script_args.dataset, local_data_dir=script_args.local_data_dir, kind=kind,
                                     **dataset_options(script_args))
    if dataset.kind not in kinds:
        raise SystemExit(f"{dataset.described} holds {dataset.kind} samples, which {entry} does not train: "
                         f"use {'main_dpo.py' if dataset.kind == 'preference' else 'main_sft.py'}.")
    from data.feddca import apply_feddca
    return apply_feddca(apply_quality(dataset, script_args), script_args)  # retrieved public samples: not filtered


def write_data_methods(dataset, output_dir) -> None:
    """The data methods' records (a quality filter's kept counts, recall and precision; FedDCA's retrieval,
    coverage and FedDCA*'s alignment) into the run folder as data_methods.json, beside metrics.jsonl."""
    from pathlib import Path

    from utils.files import write_json_atomic
    record = {key: dataset.info[key] for key in ("quality_filter", "feddca") if key in dataset.info}
    if record:
        write_json_atomic(Path(output_dir) / "data_methods.json", record, indent=2)


def apply_quality(dataset, script_args):
    """Data quality control: FedDQC's IRA filter and/or high-to-low IRA order, or the anchor-scored filter
    (CLUES: one global threshold, or the per-client rule) before the IRA order when both are asked."""
    if not (script_args.quality_filter or script_args.quality_order):
        return dataset
    if script_args.quality_filter not in (None, "ira", "anchor", "anchor_per_client"):
        raise SystemExit(f"Unknown --quality_filter {script_args.quality_filter!r}: choose ira, anchor or "
                         "anchor_per_client.")
    if script_args.quality_filter in ("anchor", "anchor_per_client"):
        dataset = filter_by_anchors(dataset, script_args)
        if not script_args.quality_order:
            return dataset
    from data.quality import filter_with_scores, order_by_quality, score_dataset
    scores = score_dataset(dataset, model_name_or_path=script_args.quality_model or script_args.model_name_or_path,
                           max_length=script_args.seq_length)
    if script_args.quality_filter == "ira":  # the kept samples' scores come along: no second scoring pass
        dataset, scores = filter_with_scores(dataset, scores, script_args.quality_threshold)
    if script_args.quality_order:
        dataset = order_by_quality(dataset, scores)
    return dataset


def filter_by_anchors(dataset, script_args):
    """--quality_filter anchor / anchor_per_client: TracIn scores against the anchor set on a fresh LoRA adapter of
    the scoring model (data/anchor_quality.py), then the filter; the outcome is logged and kept in dataset.info."""
    import numpy as np

    from data import anchor_quality as aq
    from data.quality import filter_with_scores
    s = script_args
    anchors = aq.load_anchors(dataset, s.quality_anchor_data, s.quality_anchor_size, s.seed)
    name = s.quality_model or s.model_name_or_path

    def compute():
        tokenizer = load_tokenizer(name, s.seq_length)
        base = load_base_model(name)
        torch.manual_seed(s.seed)  # the adapter's initial A: the warm-up's start
        model = wrap_with_lora(base, r=s.peft_lora_r, alpha=s.peft_lora_alpha, dropout=0.0)
        return aq.score_with_anchors(dataset, anchors, model, tokenizer, s.template, s.seq_length,
                                     s.quality_checkpoints, s.quality_warmup_lr)

    settings = {"model": name, "r": s.peft_lora_r, "alpha": s.peft_lora_alpha, "seed": s.seed, "template": s.template,
                "seq_length": s.seq_length, "checkpoints": s.quality_checkpoints, "lr": s.quality_warmup_lr}
    scores, anchor_scores = aq.cached_scores(dataset, anchors, settings, compute)
    q = s.quality_threshold_quantile
    threshold = (aq.global_threshold(anchor_scores, q) if s.quality_filter == "anchor"
                 else aq.per_client_thresholds(scores, q))
    dataset, _ = filter_with_scores(dataset, scores, threshold, metric=s.quality_filter)
    record = dataset.info["quality_filter"]
    record.update(anchors=len(anchors), anchor_score_quantile=q,
                  anchor_scores=[float(v) for v in np.quantile(anchor_scores, [0, 0.5, 1])])
    logger.info("quality filter %s: kept %d of %d samples%s", s.quality_filter, record["samples_after"],
                record["samples_before"], f" (corrupted: recall {record['recall']:.3f}, precision "
                f"{record['precision']:.3f})" if "recall" in record else "")
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
