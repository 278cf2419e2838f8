"""Federated instruction tuning (SFT) of an LLM with LoRA, FedLLM-Bench style.

    python main_sft.py --fed_alg fedavg --dataset fed-synthetic --num_rounds 10 --sample_clients 4
    python main_sft.py --fed_alg fedavg --dataset fed-aya --model_name_or_path meta-llama/Llama-2-7b-hf ...
"""
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from datasets import Dataset
from transformers import HfArgumentParser, set_seed
from trl import SFTConfig, SFTTrainer

from data import load_federated_dataset
from federated.algorithms import make_algorithm
from federated.client import LocalTrainer, with_client_hooks
from federated.config import FedArguments, ScriptArguments, dataset_options
from federated.flat import FlatParams
from federated.loop import run_federated, write_args
from federated.privacy import make_privacy
from utils.model import load_base_model, load_tokenizer, wrap_with_lora
from utils.templates import check_template, tokenize_sft_sample

LR_MIN = 1e-6  # the floor of the per-round cosine schedule for SFT


def select_clients(dataset, fed_args):
    """--num_clients defaults to all clients; fewer takes the first N; --sample_clients is clamped to it."""
    available = dataset.num_clients
    if fed_args.num_clients is None:
        fed_args.num_clients = available
    if fed_args.num_clients > available:
        raise SystemExit(f"--num_clients {fed_args.num_clients} exceeds the {available} clients of {dataset.name}; "
                         f"pass --num_clients {available} or fewer.")
    if fed_args.sample_clients > fed_args.num_clients:
        warnings.warn(f"--sample_clients {fed_args.sample_clients} > --num_clients {fed_args.num_clients}: "
                      f"sampling all {fed_args.num_clients} clients each round.")
        fed_args.sample_clients = fed_args.num_clients
    return dataset.clients[:fed_args.num_clients]


def tokenize_clients(clients, tokenizer, template, seq_length):
    """Tokenise every client's samples once for the whole run (never per round)."""
    return [Dataset.from_list([tokenize_sft_sample(tokenizer, template, s, seq_length) for s in samples])
            for samples in clients]


def build_sft_trainer(model, tokenizer, script_args, first_client_data):
    config = SFTConfig(
        output_dir=os.path.join(script_args.output_dir, "trainer"), per_device_train_batch_size=script_args.batch_size,
        gradient_accumulation_steps=script_args.gradient_accumulation_steps, max_steps=script_args.max_steps,
        learning_rate=script_args.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        max_length=script_args.seq_length, dataset_kwargs={"skip_prepare_dataset": True},
        gradient_checkpointing=script_args.gradient_checkpointing, use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=script_args.seed)
    trainer_class = with_client_hooks(SFTTrainer)
    return trainer_class(model=model, args=config, train_dataset=first_client_data, processing_class=tokenizer)


def main():
    script_args, fed_args = HfArgumentParser((ScriptArguments, FedArguments)).parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_template(script_args.template)
    output_dir = Path(script_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    dataset = load_federated_dataset(script_args.dataset, local_data_dir=script_args.local_data_dir,
                                     **dataset_options(script_args))
    if dataset.kind == "preference":
        raise SystemExit(f"Dataset {dataset.name} holds preference pairs: train it with main_dpo.py.")
    clients = select_clients(dataset, fed_args)
    algorithm = make_algorithm(fed_args, len(clients))  # fails fast on a bad --fed_alg, before any loading
    privacy = make_privacy(fed_args, script_args, [len(c) for c in clients])  # None unless DP flags are given
    write_args(output_dir, script_args, fed_args)

    set_seed(script_args.seed)  # LoRA's initial A matrices come from the global RNG
    tokenizer = load_tokenizer(script_args.model_name_or_path, script_args.seq_length)
    model = load_base_model(script_args.model_name_or_path, script_args.load_in_8bit, script_args.load_in_4bit)
    model = wrap_with_lora(model, r=script_args.peft_lora_r, alpha=script_args.peft_lora_alpha)
    client_data = tokenize_clients(clients, tokenizer, script_args.template, script_args.seq_length)

    trainer = build_sft_trainer(model, tokenizer, script_args, client_data[0])
    local_trainer = LocalTrainer(trainer, FlatParams(model))
    run_federated(script_args, fed_args, model, local_trainer, client_data, lr_min=LR_MIN, algorithm=algorithm,
                  privacy=privacy)

    if script_args.eval_after and dataset.test:
        from evaluation.exact_match import score_exact_match
        scores = score_exact_match(model, tokenizer, script_args.template, dataset.test)
        (output_dir / "eval_exact_match.json").write_text(json.dumps(scores, indent=2))
        print(f"Exact match on the {scores['n']} held-out samples: {scores['accuracy']:.3f}")


if __name__ == "__main__":
    main()
