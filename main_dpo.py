"""Federated preference alignment (DPO) of an LLM with LoRA, FedLLM-Bench style.

    python main_dpo.py --fed_alg fedavg --dataset fed-synthetic-pref --num_rounds 10 --sample_clients 4
    python main_dpo.py --fed_alg fedavg --local_data_dir fed_chatbotpa.json --sample_clients 10 --dynamic_local_step

The reference model of DPO is the base model: the LoRA adapter disabled, so no second model copy is kept.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset
from transformers import HfArgumentParser

from federated.config import (DRY_RUN_DONE, EntryArguments, FedArguments, ScriptArguments, check_arguments,
                              parse_flags)
from federated.run_dir import RunGuard, prepare_run_dir, settings_of
from utils.console import configure_console
from utils.files import write_json_atomic
from utils.preference import pair_texts, tokenize_pair

LR_MIN = 1e-5  # the floor of the per-round cosine schedule for DPO
DEFAULT_DATASET = "fed-synthetic-pref"


@dataclass
class DPOArguments:
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO beta: how strongly the policy is held to the "
                                                          "reference (the base model)"})


def tokenize_clients(clients, tokenizer, template, seq_length, client_ids=None):
    """Tokenise every client's pairs once for the whole run (never per round); pairs whose prompt fills
    seq_length (the collator would cut every answer token) are dropped."""
    from federated.setup import drop_untrainable

    tokenized = [[tokenize_pair(tokenizer, template, s, seq_length) for s in samples] for samples in clients]
    client_ids = client_ids or [str(k) for k in range(len(clients))]
    kept = drop_untrainable(tokenized, lambda pair: len(pair["prompt_ids"]) < seq_length, client_ids, seq_length)
    return [Dataset.from_list(pairs) for pairs in kept]


def use_base_as_reference(model) -> None:
    """trl copies the adapter of an already wrapped model into a frozen "ref" adapter and scores the reference with
    it. Our adapter is freshly initialised (LoRA B = 0), so that copy only reproduces the base model at the cost of
    extra LoRA compute; without it trl disables the adapter for the reference forward, which gives the base model."""
    if "ref" in model.peft_config:
        model.delete_adapter("ref")


def build_dpo_trainer(model, tokenizer, script_args, dpo_args, first_pair: dict):
    from trl import DPOConfig, DPOTrainer

    from federated.setup import trainer_arguments

    config = DPOConfig(**trainer_arguments(script_args, script_args.output_dir), beta=dpo_args.dpo_beta)
    # DPOTrainer tokenises the dataset it is built with, so it gets one text pair: LocalTrainer swaps in each
    # client's pre-tokenised pairs (prompt_ids/chosen_ids/rejected_ids), which trl trains on as they are.
    trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=Dataset.from_list([first_pair]),
                         processing_class=tokenizer)
    use_base_as_reference(model)
    return trainer


def main():
    parser = HfArgumentParser((ScriptArguments, FedArguments, DPOArguments, EntryArguments), allow_abbrev=False)
    parser.set_defaults(dataset=DEFAULT_DATASET)
    script_args, fed_args, dpo_args, entry_args = parse_flags(parser, "main_dpo.py")
    configure_console(script_args.log_level, quantizes=script_args.load_in_8bit or script_args.load_in_4bit)
    check_arguments(script_args, fed_args)
    from federated.lora_methods import check_reference_model
    check_reference_model(fed_args)
    if not (math.isfinite(dpo_args.dpo_beta) and dpo_args.dpo_beta > 0):
        raise SystemExit(f"--dpo_beta {dpo_args.dpo_beta!r} is invalid: it must be a finite number > 0.")
    if entry_args.dry_run:
        print(DRY_RUN_DONE)
        return
    with RunGuard(script_args.output_dir):
        train(script_args, fed_args, dpo_args)


def train(script_args, fed_args, dpo_args):
    from federated.setup import load_dataset_for, select_clients

    output_dir = Path(script_args.output_dir)
    dataset = load_dataset_for(script_args, kinds=("preference",), entry="main_dpo.py")
    # The training stack imports transformers' trainer and peft (which imports bitsandbytes): after
    # configure_console, and after the data, so that a missing dataset or no network fails at once.
    from federated.fedcog import with_consensus_generation
    from federated.methods import make_algorithm
    from federated.loop import run_federated
    from federated.privacy import make_privacy
    from federated.setup import load_lora_model, local_trainer, write_data_methods
    from utils.model import load_tokenizer

    clients = select_clients(dataset, fed_args)
    algorithm = make_algorithm(fed_args, len(clients))  # fails fast on a bad --fed_alg, before any loading
    privacy = make_privacy(fed_args, script_args, [len(c) for c in clients])  # None unless DP flags are given
    prepare_run_dir(output_dir, settings_of(script_args, fed_args, dpo_args), resume=script_args.resume,
                    overwrite=script_args.overwrite_output_dir)
    write_data_methods(dataset, output_dir)

    tokenizer = load_tokenizer(script_args.model_name_or_path, script_args.seq_length)
    # FedCOG with --fedcog (its distillation term beside the DPO loss; prompts: the pairs'), else the rule itself
    algorithm = with_consensus_generation(algorithm, fed_args, tokenizer, script_args.template,
                                          dict(enumerate(clients)), script_args.seq_length, dataset, script_args.seed)
    client_data = tokenize_clients(clients, tokenizer, script_args.template, script_args.seq_length,
                                   dataset.client_ids[:len(clients)])
    model = load_lora_model(script_args, fed_args)

    first_pair = pair_texts(script_args.template, tokenizer, clients[0][0])
    trainer = build_dpo_trainer(model, tokenizer, script_args, dpo_args, first_pair)
    run_federated(script_args, fed_args, model, local_trainer(trainer, model, script_args), client_data,
                  lr_min=LR_MIN, algorithm=algorithm, privacy=privacy)

    if script_args.eval_after and dataset.test:
        from data.synthetic import balanced_subset
        from evaluation.preference import score_preferences
        test = balanced_subset(dataset.test, script_args.eval_per_task)
        scores = score_preferences(model, tokenizer, script_args.template, test, beta=dpo_args.dpo_beta,
                                   max_length=script_args.seq_length)
        write_json_atomic(output_dir / "eval_preference.json", scores, indent=2)
        print(f"On the {scores['n']} held-out pairs: preference accuracy {scores['preference_accuracy']:.3f}, "
              f"mean reward margin {scores['mean_margin']:.4f} (base model log-prob accuracy "
              f"{scores['base_logprob_accuracy']:.3f})")


if __name__ == "__main__":
    main()
