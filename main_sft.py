"""Federated instruction tuning (SFT) of an LLM with LoRA, FedLLM-Bench style.

    python main_sft.py --fed_alg fedavg --dataset fed-synthetic --num_rounds 10 --sample_clients 4
    python main_sft.py --fed_alg fedavg --dataset fed-aya --model_name_or_path meta-llama/Llama-2-7b-hf --load_in_8bit
"""
import json
from pathlib import Path

from datasets import Dataset
from transformers import HfArgumentParser

from federated.config import FedArguments, ScriptArguments
from utils.console import configure_console
from utils.templates import check_template, tokenize_sft_sample

LR_MIN = 1e-6  # the floor of the per-round cosine schedule for SFT


def tokenize_clients(clients, tokenizer, template, seq_length):
    """Tokenise every client's samples once for the whole run (never per round)."""
    return [Dataset.from_list([tokenize_sft_sample(tokenizer, template, s, seq_length) for s in samples])
            for samples in clients]


def build_sft_trainer(model, tokenizer, script_args, first_client_data):
    """One SFTTrainer for the whole run; the samples arrive tokenised with their labels masked."""
    from trl import SFTConfig, SFTTrainer

    from federated.client import with_client_hooks
    from federated.setup import trainer_arguments

    config = SFTConfig(**trainer_arguments(script_args, script_args.output_dir),
                       dataset_kwargs={"skip_prepare_dataset": True})
    trainer_class = with_client_hooks(SFTTrainer)
    return trainer_class(model=model, args=config, train_dataset=first_client_data, processing_class=tokenizer)


def main():
    script_args, fed_args = HfArgumentParser((ScriptArguments, FedArguments)).parse_args_into_dataclasses()
    configure_console(script_args.log_level, quantizes=script_args.load_in_8bit or script_args.load_in_4bit)
    check_template(script_args.template)
    from federated.setup import group_runs, load_dataset_for, load_model_with_lora, select_clients

    dataset = load_dataset_for(script_args, kinds=("sft", "multiturn"), entry="main_sft.py")
    # The training stack imports transformers' trainer and peft (which imports bitsandbytes): after
    # configure_console, and after the data, so that a missing dataset or no network fails at once.
    from federated.algorithms import make_algorithm
    from federated.client import LocalTrainer
    from federated.flat import FlatParams
    from federated.loop import run_federated, write_args
    from federated.privacy import make_privacy

    clients = select_clients(dataset, fed_args)
    # One federation, or one per language group; algorithm and DP are built before any loading, to fail fast.
    runs = [(name, members, run_args, run_fed, make_algorithm(run_fed, len(members)),
             make_privacy(run_fed, run_args, [len(clients[i]) for i in members]))
            for name, members, run_args, run_fed in group_runs(dataset, script_args, fed_args)]

    tokenizer, model = load_model_with_lora(script_args)
    client_data = tokenize_clients(clients, tokenizer, script_args.template, script_args.seq_length)
    trainer = build_sft_trainer(model, tokenizer, script_args, client_data[0])
    local_trainer = LocalTrainer(trainer, FlatParams(model))
    initial = local_trainer.flat.get()

    for name, members, run_args, run_fed, algorithm, privacy in runs:
        output_dir = Path(run_args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_args(output_dir, run_args, run_fed)
        local_trainer.flat.set(initial)  # every federation starts from the same LoRA initialisation
        run_federated(run_args, run_fed, model, local_trainer, [client_data[i] for i in members], lr_min=LR_MIN,
                      algorithm=algorithm, privacy=privacy)
        if script_args.eval_after and dataset.test:
            from data.synthetic import balanced_subset
            from evaluation.exact_match import score_exact_match
            test = balanced_subset(dataset.test, script_args.eval_per_task)
            scores = score_exact_match(model, tokenizer, script_args.template, test)
            (output_dir / "eval_exact_match.json").write_text(json.dumps(scores, indent=2))
            print(f"[{name}] exact match on the {scores['n']} held-out samples: {scores['accuracy']:.3f}")


if __name__ == "__main__":
    main()
