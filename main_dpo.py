"""Federated preference alignment (DPO) of an LLM with LoRA, FedLLM-Bench style.

    python main_dpo.py --fed_alg fedavg --dataset fed-synthetic-pref --num_rounds 10 --sample_clients 4
    python main_dpo.py --fed_alg fedavg --local_data_dir fed_chatbotpa.json --sample_clients 10 --dynamic_local_step

The reference model of DPO is the base model: the LoRA adapter disabled, so no second model copy is kept.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset
from transformers import HfArgumentParser

from federated.config import FedArguments, ScriptArguments
from utils.console import configure_console
from utils.preference import pair_texts, tokenize_pairs
from utils.templates import check_template

LR_MIN = 1e-5  # the floor of the per-round cosine schedule for DPO
DEFAULT_DATASET = "fed-synthetic-pref"


@dataclass
class DPOArguments:
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO beta: how strongly the policy is held to the "
                                                          "reference (the base model)"})


def tokenize_clients(clients, tokenizer, template):
    """Tokenise every client's pairs once for the whole run (never per round)."""
    return [tokenize_pairs(tokenizer, template, samples) for samples in clients]


def use_base_as_reference(model) -> None:
    """trl copies the adapter of an already wrapped model into a frozen "ref" adapter and scores the reference with
    it. Our adapter is freshly initialised (LoRA B = 0), so that copy only reproduces the base model at the cost of
    extra LoRA compute; without it trl disables the adapter for the reference forward, which gives the base model."""
    if "ref" in model.peft_config:
        model.delete_adapter("ref")


def build_dpo_trainer(model, tokenizer, script_args, dpo_args, first_pair: dict):
    from trl import DPOConfig, DPOTrainer

    from federated.client import with_client_hooks
    from federated.setup import trainer_arguments

    config = DPOConfig(**trainer_arguments(script_args, script_args.output_dir), beta=dpo_args.dpo_beta)
    trainer_class = with_client_hooks(DPOTrainer)
    # DPOTrainer tokenises the dataset it is built with, so it gets one text pair: LocalTrainer swaps in each
    # client's pre-tokenised pairs (prompt_ids/chosen_ids/rejected_ids), which trl trains on as they are.
    trainer = trainer_class(model=model, ref_model=None, args=config, train_dataset=Dataset.from_list([first_pair]),
                            processing_class=tokenizer)
    use_base_as_reference(model)
    return trainer


def main():
    parser = HfArgumentParser((ScriptArguments, FedArguments, DPOArguments))
    parser.set_defaults(dataset=DEFAULT_DATASET)
    script_args, fed_args, dpo_args = parser.parse_args_into_dataclasses()
    configure_console(script_args.log_level, quantizes=script_args.load_in_8bit or script_args.load_in_4bit)
    check_template(script_args.template)
    from federated.setup import load_dataset_for, load_model_with_lora, select_clients

    output_dir = Path(script_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset_for(script_args, kinds=("preference",), entry="main_dpo.py")
    # The training stack imports transformers' trainer and peft (which imports bitsandbytes): after
    # configure_console, and after the data, so that a missing dataset or no network fails at once.
    from federated.algorithms import make_algorithm
    from federated.client import LocalTrainer
    from federated.flat import FlatParams
    from federated.loop import run_federated, write_args
    from federated.privacy import make_privacy

    clients = select_clients(dataset, fed_args)
    algorithm = make_algorithm(fed_args, len(clients))  # fails fast on a bad --fed_alg, before any loading
    privacy = make_privacy(fed_args, script_args, [len(c) for c in clients])  # None unless DP flags are given
    write_args(output_dir, script_args, fed_args, dpo_args)

    tokenizer, model = load_model_with_lora(script_args)
    client_data = tokenize_clients(clients, tokenizer, script_args.template)

    first_pair = pair_texts(script_args.template, tokenizer, clients[0][0])
    trainer = build_dpo_trainer(model, tokenizer, script_args, dpo_args, first_pair)
    local_trainer = LocalTrainer(trainer, FlatParams(model))
    run_federated(script_args, fed_args, model, local_trainer, client_data, lr_min=LR_MIN, algorithm=algorithm,
                  privacy=privacy)

    if script_args.eval_after and dataset.test:
        from data.synthetic import balanced_subset
        from evaluation.preference import score_preferences
        test = balanced_subset(dataset.test, script_args.eval_per_task)
        scores = score_preferences(model, tokenizer, script_args.template, test, beta=dpo_args.dpo_beta,
                                   max_length=script_args.seq_length)
        (output_dir / "eval_preference.json").write_text(json.dumps(scores, indent=2))
        print(f"On the {scores['n']} held-out pairs: preference accuracy {scores['preference_accuracy']:.3f}, "
              f"mean reward margin {scores['mean_margin']:.4f} (base model log-prob accuracy "
              f"{scores['base_logprob_accuracy']:.3f})")


if __name__ == "__main__":
    main()
