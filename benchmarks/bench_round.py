"""Round overhead and the fixed cost of one client's training call.

1. Fixed cost per client call (issue #14): a 1-step client call minus its one forward/backward/optimizer step,
   for (a) a reused trainer's Trainer.train(), what LocalTrainer did before, and (b) LocalTrainer's step loop,
   both padded, alternating over the same clients in one run.
2. Round overhead (issue #2): per round, wall time split into training (forward, backward, optimizer step) and
   everything else, for this project's loop and a reference-style loop written here as OpenFedLLM's does it: per
   client per round a deep copy of the global state dict, re-formatting and re-tokenising the client's data, a new
   trainer, a deep copy of the result, and per-key aggregation over the parameter dict.

    python benchmarks/bench_round.py                      # SmolLM2, 3 rounds, 2 clients, 2 steps, batch 4
    python benchmarks/bench_round.py --model /path/to/tiny --rounds 2
    python benchmarks/bench_round.py --fixed_cost_only --calls 4
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
from pathlib import Path

import torch
from transformers import PrinterCallback, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import load_federated_dataset  # noqa: E402
from federated.algorithms import server_step  # noqa: E402
from federated.methods import make_algorithm  # noqa: E402
from federated.algorithms import ClientHooks  # noqa: E402
from federated.client import LocalTrainer, client_seed, round_subset  # noqa: E402
from federated.config import FedArguments, ScriptArguments  # noqa: E402
from federated.flat import FlatParams  # noqa: E402
from federated.loop import sample_clients  # noqa: E402
from main_sft import build_sft_trainer, tokenize_clients  # noqa: E402
from utils.model import load_base_model, load_tokenizer, wrap_with_lora  # noqa: E402


class StepTimer(TrainerCallback):
    """Sums the time from each optimizer step's start to its end: forward, backward and optimizer step."""

    def __init__(self):
        self.total, self._start = 0.0, None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.total += time.perf_counter() - self._start


def project_round(t, ctx) -> None:
    """One round of this project's loop (federated/loop.py without logging and checkpoints)."""
    algorithm, local, x, state = ctx["algorithm"], ctx["local"], ctx["x"], ctx["state"]
    vectors, counts = [], []
    for k in sample_clients(ctx["fed_args"], len(ctx["client_data"]), t):
        local.flat.set(x)
        data = round_subset(ctx["client_data"][k], t, ctx["per_step"] * ctx["steps"])
        local.train(data, ctx["steps"], ctx["lr"], algorithm.client_hooks(k, x, state, {}), client_seed(0, t, k))
        ctx["timer"].total += sum(local.step_seconds)
        vectors.append(local.flat.get())
        counts.append(len(ctx["client_data"][k]))
    ctx["x"] = server_step(algorithm, x, torch.stack(vectors), counts, state, t)
    local.flat.set(ctx["x"])


def reference_round(t, ctx) -> None:
    """One round as the reference code does it."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model, timer = ctx["model"], ctx["timer"]
    global_dict = copy.deepcopy(get_peft_model_state_dict(model))
    local_dicts, counts = [], []
    for k in sample_clients(ctx["fed_args"], len(ctx["clients"]), t):
        set_peft_model_state_dict(model, global_dict)
        raw = ctx["clients"][k]
        tokenized = tokenize_clients([raw], ctx["tokenizer"], "alpaca", ctx["script_args"].seq_length)[0]
        data = round_subset(tokenized, t, ctx["per_step"] * ctx["steps"])
        trainer = build_sft_trainer(model, ctx["tokenizer"], ctx["script_args"], data)
        trainer.add_callback(timer)
        trainer.args.learning_rate = ctx["lr"]
        trainer.train()
        local_dicts.append(copy.deepcopy(get_peft_model_state_dict(model)))
        counts.append(len(raw))
    total = sum(counts)
    for key in global_dict:  # per-key FedAvg, one small op per tensor per client
        global_dict[key] = sum(d[key] * (n / total) for d, n in zip(local_dicts, counts))
    set_peft_model_state_dict(model, global_dict)


def trainer_train_call(trainer, timer: StepTimer, data, lr: float, seed: int) -> float:
    """What LocalTrainer.train did before issue #14: one reused trainer, Trainer.train() per client."""
    from transformers import set_seed
    trainer.train_dataset, trainer.args.max_steps, trainer.args.learning_rate = data, 1, lr
    trainer.optimizer, trainer.lr_scheduler = None, None
    set_seed(seed)
    timer.total = 0.0
    trainer.train()
    return timer.total


def task_setup(task: str, ctx) -> tuple:
    """(a function building a fresh trainer, the clients' tokenised data) for sft or dpo."""
    model, tokenizer, script_args = ctx["model"], ctx["tokenizer"], ctx["script_args"]
    if task == "sft":
        data = ctx["client_data"]
        return (lambda: build_sft_trainer(model, tokenizer, script_args, data[0])), data
    import main_dpo
    from utils.preference import pair_texts
    clients = load_federated_dataset("fed-synthetic-pref").clients
    data = main_dpo.tokenize_clients(clients, tokenizer, "alpaca", script_args.seq_length)
    first = pair_texts("alpaca", tokenizer, clients[0][0])
    return (lambda: main_dpo.build_dpo_trainer(model, tokenizer, script_args, main_dpo.DPOArguments(), first)), data


def fixed_cost(ctx, task: str, calls: int) -> None:
    """1-step client calls, Trainer.train() and LocalTrainer alternating on the same clients' data."""
    make_trainer, data = task_setup(task, ctx)
    old = make_trainer()
    old.remove_callback(PrinterCallback)
    timer = StepTimer()
    old.add_callback(timer)
    new = LocalTrainer(make_trainer(), FlatParams(ctx["model"]), padding_free=False)
    x0 = new.flat.get()
    gc.freeze()  # so that Trainer.train()'s full gc.collect() per call stays cheap, as in the measured rows
    names = ["Trainer.train() per client (before)", "LocalTrainer step loop (after)"]
    wall, cpu, step = ({name: 0.0 for name in names} for _ in range(3))
    for call in range(calls + 1):  # call 0 warms both up
        subset = round_subset(data[call % len(data)], call, ctx["per_step"])
        for name in names:
            new.flat.set(x0)
            gc.collect()
            start, start_cpu = time.perf_counter(), time.process_time()
            if name == names[0]:
                step_s = trainer_train_call(old, timer, subset, ctx["lr"], call)
            else:
                new.train(subset, 1, ctx["lr"], ClientHooks(), call)
                step_s = new.step_seconds[0]
            if call:
                wall[name] += (time.perf_counter() - start) / calls
                cpu[name] += (time.process_time() - start_cpu) / calls
                step[name] += step_s / calls
    print(f"\n{task}: fixed cost of a 1-step client call, mean of {calls} calls each (alternating, same data), "
          f"batch {ctx['per_step']}, padded:")
    print("| training call | call s | CPU s | forward/backward/step s | fixed cost s | call / step |\n"
          "|---|---|---|---|---|---|")
    for name in names:
        print(f"| {name} | {wall[name]:.3f} | {cpu[name]:.3f} | {step[name]:.3f} | {wall[name] - step[name]:.3f} | "
              f"{wall[name] / step[name]:.2f}x |")


def measure(round_fn, ctx, rounds: int, timer: StepTimer) -> dict:
    round_fn(0, ctx)  # warm-up: first-call allocations and lazy imports are not per-round costs
    timer.total = 0.0
    start = time.perf_counter()
    for t in range(1, rounds + 1):
        round_fn(t, ctx)
    wall = (time.perf_counter() - start) / rounds
    train = timer.total / rounds
    return {"round_s": wall, "train_s": train, "overhead_s": wall - train, "overhead_pct": 100 * (wall - train) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients_per_round", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_length", type=int, default=96)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--calls", type=int, default=4, help="1-step client calls per variant for the fixed cost")
    parser.add_argument("--tasks", default="sft,dpo", help="fixed cost for these: sft, dpo or both")
    parser.add_argument("--fixed_cost_only", action="store_true", help="skip the round-overhead comparison")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    script_args = ScriptArguments(model_name_or_path=args.model, batch_size=args.batch_size, max_steps=args.steps,
                                  seq_length=args.seq_length, output_dir="/tmp/bench_round", learning_rate=5e-4)
    fed_args = FedArguments(fed_alg="fedavg", sample_clients=args.clients_per_round, num_rounds=args.rounds + 1)
    clients = load_federated_dataset("fed-synthetic").clients
    tokenizer = load_tokenizer(args.model, args.seq_length)
    model = wrap_with_lora(load_base_model(args.model))
    timer = StepTimer()
    ctx = {"fed_args": fed_args, "script_args": script_args, "clients": clients, "tokenizer": tokenizer,
           "model": model, "timer": timer, "steps": args.steps, "per_step": args.batch_size, "lr": 5e-4}

    ctx["client_data"] = tokenize_clients(clients, tokenizer, "alpaca", args.seq_length)  # once per run
    print(f"model={args.model} rounds={args.rounds} clients/round={args.clients_per_round} steps={args.steps} "
          f"batch={args.batch_size} seq={args.seq_length} threads={torch.get_num_threads()}")
    for task in args.tasks.split(","):
        fixed_cost(ctx, task, args.calls)
    if args.fixed_cost_only:
        return
    results = {"reference-style": measure(reference_round, ctx, args.rounds, timer)}
    trainer = build_sft_trainer(model, tokenizer, script_args, ctx["client_data"][0])
    ctx["local"] = LocalTrainer(trainer, FlatParams(model))
    ctx["algorithm"] = make_algorithm(fed_args, len(clients))
    ctx["x"] = ctx["local"].flat.get()
    ctx["state"] = ctx["algorithm"].init_state(ctx["x"], len(clients))
    gc.freeze()  # the reference-style loop runs Trainer.train(), a full gc.collect() per client: keep it cheap
    results["this project"] = measure(project_round, ctx, args.rounds, timer)

    print("\nRound overhead:\n| loop | round s | training s | other s | other % of round |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['round_s']:.3f} | {r['train_s']:.3f} | {r['overhead_s']:.3f} | {r['overhead_pct']:.1f}% |")
    ref, ours = results["reference-style"], results["this project"]
    print(f"non-training time per round, reference-style / this project: {ref['overhead_s'] / ours['overhead_s']:.1f}x")


if __name__ == "__main__":
    main()
