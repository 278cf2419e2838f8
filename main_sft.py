"""Federated instruction tuning (SFT) of an LLM with LoRA, FedLLM-Bench style.

    python main_sft.py --fed_alg fedavg --dataset fed-synthetic --num_rounds 10 --sample_clients 4
    python main_sft.py --fed_alg fedavg --dataset fed-aya --model_name_or_path meta-llama/Llama-2-7b-hf --load_in_8bit
"""
from pathlib import Path

from datasets import Dataset
from transformers import HfArgumentParser

from federated.config import (DRY_RUN_DONE, EntryArguments, FedArguments, ScriptArguments, check_arguments,
                              parse_flags)
from federated.run_dir import RunGuard, prepare_run_dir, settings_of
from utils.console import configure_console
from utils.files import write_json_atomic
from utils.templates import tokenize_sft_sample

LR_MIN = 1e-6  # the floor of the per-round cosine schedule for SFT


def has_response_token(sample: dict) -> bool:
    return any(label != -100 for label in sample["labels"])


def tokenize_clients(clients, tokenizer, template, seq_length, client_ids=None):
    """Tokenise every client's samples once for the whole run (never per round); samples whose prompt fills
    seq_length (nothing left to learn) are dropped."""
    from federated.setup import drop_untrainable

    tokenized = [[tokenize_sft_sample(tokenizer, template, s, seq_length) for s in samples] for samples in clients]
    client_ids = client_ids or [str(k) for k in range(len(clients))]
    kept = drop_untrainable(tokenized, has_response_token, client_ids, seq_length)
    return [Dataset.from_list(samples) for samples in kept]


def build_sft_trainer(model, tokenizer, script_args, first_client_data):
    """One SFTTrainer for the whole run; the samples arrive tokenised with their labels masked."""
    from trl import SFTConfig, SFTTrainer

    from federated.setup import trainer_arguments

    config = SFTConfig(**trainer_arguments(script_args, script_args.output_dir),
                       dataset_kwargs={"skip_prepare_dataset": True})
    return SFTTrainer(model=model, args=config, train_dataset=first_client_data, processing_class=tokenizer)


def main():
    parser = HfArgumentParser((ScriptArguments, FedArguments, EntryArguments), allow_abbrev=False)
    script_args, fed_args, entry_args = parse_flags(parser, "main_sft.py")
    configure_console(script_args.log_level, quantizes=script_args.load_in_8bit or script_args.load_in_4bit)
    check_arguments(script_args, fed_args)
    if entry_args.dry_run:
        print(DRY_RUN_DONE)
        return
    with RunGuard(script_args.output_dir):
        train(script_args, fed_args)


def train(script_args, fed_args):
    from federated.setup import group_runs, load_dataset_for, select_clients

    dataset = load_dataset_for(script_args, kinds=("sft", "multiturn"), entry="main_sft.py")
    # The training stack imports transformers' trainer and peft (which imports bitsandbytes): after
    # configure_console, and after the data, so that a missing dataset or no network fails at once.
    from federated.fedcog import with_consensus_generation
    from federated.methods import make_algorithm
    from federated.loop import run_federated
    from federated.privacy import make_privacy
    from federated.setup import load_lora_model, local_trainer, write_data_methods
    from utils.model import load_tokenizer

    clients = select_clients(dataset, fed_args)
    # One federation, or one per language group; algorithm, DP and the output folders are settled before any
    # model loading, to fail fast.
    runs = [(name, members, run_args, run_fed, make_algorithm(run_fed, len(members)),
             make_privacy(run_fed, run_args, [len(clients[i]) for i in members]))
            for name, members, run_args, run_fed in group_runs(dataset, script_args, fed_args)]
    for _, _, run_args, run_fed, _, _ in runs:
        prepare_run_dir(run_args.output_dir, settings_of(run_args, run_fed), resume=script_args.resume,
                        overwrite=script_args.overwrite_output_dir)
        write_data_methods(dataset, run_args.output_dir)

    tokenizer = load_tokenizer(script_args.model_name_or_path, script_args.seq_length)
    client_data = tokenize_clients(clients, tokenizer, script_args.template, script_args.seq_length,
                                   dataset.client_ids[:len(clients)])
    model = load_lora_model(script_args, fed_args)
    trainer = build_sft_trainer(model, tokenizer, script_args, client_data[0])
    local = local_trainer(trainer, model, script_args)
    initial = local.flat.get()

    for name, members, run_args, run_fed, algorithm, privacy in runs:
        output_dir = Path(run_args.output_dir)
        algorithm = with_consensus_generation(algorithm, run_fed, tokenizer, script_args.template,
                                              dict(enumerate(clients[i] for i in members)), script_args.seq_length,
                                              dataset, script_args.seed)  # FedCOG with --fedcog, else itself
        local.flat.set(initial)  # every federation starts from the same LoRA initialisation
        run = run_federated(run_args, run_fed, model, local, [client_data[i] for i in members], lr_min=LR_MIN,
                            algorithm=algorithm, privacy=privacy)
        if script_args.eval_after and dataset.test:
            from data.synthetic import balanced_subset
            from evaluation.exact_match import score_exact_match
            test = balanced_subset(dataset.test, script_args.eval_per_task)
            scores = score_exact_match(model, tokenizer, script_args.template, test)
            write_json_atomic(output_dir / "eval_exact_match.json", scores, indent=2)
            print(f"[{name}] exact match on the {scores['n']} held-out samples: {scores['accuracy']:.3f}")
            evaluate_client_models(model, tokenizer, script_args, test, local.flat, algorithm, run, scores,
                                   [dataset.client_metadata[i] for i in members] if dataset.client_metadata else [],
                                   output_dir, name)


def evaluate_client_models(model, tokenizer, script_args, test, flat, algorithm, run, global_scores, metadata,
                           output_dir, name):
    """With a method that keeps a model per client (--lora_method personal): each one on its client's own test
    distribution (its task mixture, fed-synthetic), beside the global model on the same weighting."""
    client_models = algorithm.client_models(run)
    if not client_models or not all("task_mixture" in m for m in metadata):
        return
    from evaluation.exact_match import score_personal_models
    scores = score_personal_models(model, tokenizer, script_args.template, test, flat.set, client_models,
                                   [m["task_mixture"] for m in metadata], global_scores["per_task"])
    algorithm.load_global(flat, run)  # the model is the global one again
    write_json_atomic(output_dir / "eval_personal.json", scores, indent=2)
    print(f"[{name}] own test distribution of the {len(client_models)} clients with a personal model: personal "
          f"{scores['mean_personal']:.3f}, global {scores['mean_global']:.3f} (mean over clients)")


if __name__ == "__main__":
    main()
