"""The round loop's wiring, with a stub local trainer (each client's update is chosen by the test) and, where the
trainer's own behaviour is the point, the real SFTTrainer on a tiny model: which clients are aggregated with which
weights, what SCAFFOLD stores, which learning rate, seed and data window each client gets, outlier updates, the
clients' own costs summed into the round's row, and FedProx under gradient accumulation."""
import json
import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from federated.algorithms import Algorithm, ClientHooks, ScaffoldHooks
from federated.client import client_seed
from federated.config import FedArguments, ScriptArguments
from federated.flat import FlatParams
from federated.loop import ClientResult, outlier_clients, round_learning_rate, run_federated, summed_client_metrics
from test_run_dir import AdapterStub

N = 4  # parameters of the stub model
LR_MIN = 1e-3


class StubTrainer:
    """LocalTrainer's interface: moves the parameters to x + delta(client, round) and records what it was given."""

    def __init__(self, model, delta, loss=lambda k, t: 1.0):
        self.flat, self.delta, self.loss = FlatParams(model), delta, loss
        self.calls = []  # (round, client, lr, seed, steps, sample ids, hooks, x)
        self.round = 0

    def train(self, data, steps, lr, hooks, seed):
        k = data[0]["client"]
        x = self.flat.get()
        t = self.round_of(seed, k)
        self.calls.append({"round": t, "client": k, "lr": lr, "seed": seed, "steps": steps,
                           "ids": [row["id"] for row in data], "hooks": hooks, "x": x})
        self.flat.set(x + self.delta(k, t))
        return self.loss(k, t), steps

    def round_of(self, seed, k):
        return next(t for t in range(100) if client_seed(SEED, t, k) == seed)


SEED = 7


def client_data(sizes):
    return [Dataset.from_list([{"client": k, "id": i} for i in range(n)]) for k, n in enumerate(sizes)]


def run(tmp_path, trainer, sizes, algorithm=None, **flags):
    script = {"output_dir": str(tmp_path), "learning_rate": 0.1, "seed": SEED, "max_steps": 2, "batch_size": 2,
              "checkpoint_step": 100}
    script.update({k: flags.pop(k) for k in list(flags) if hasattr(ScriptArguments, k)})
    fed_args = FedArguments(**{"num_rounds": 2, "sample_clients": len(sizes), **flags})
    fed_args.num_clients = len(sizes)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return run_federated(ScriptArguments(**script), fed_args, trainer.model, trainer, client_data(sizes),
                         lr_min=LR_MIN, algorithm=algorithm)


def make(delta, loss=lambda k, t: 1.0):
    model = AdapterStub()
    trainer = StubTrainer(model, delta, loss)
    trainer.model = model
    return trainer


def rows(tmp_path):
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_a_failed_client_is_dropped_and_the_weights_renormalise_over_the_survivors(tmp_path):
    deltas = {0: 1.0, 1: 100.0, 2: 4.0}
    trainer = make(lambda k, t: torch.full((N,), deltas[k]), loss=lambda k, t: math.nan if k == 1 else 0.5)
    state = run(tmp_path, trainer, sizes=[10, 30, 30], num_rounds=1)
    # FedAvg over clients 0 and 2 only, weights 10/40 and 30/40: x = x0 + 0.25 * 1 + 0.75 * 4.
    x0 = torch.arange(4.0)
    assert torch.allclose(state.x, x0 + 3.25)
    assert rows(tmp_path)[0]["dropped_clients"] == [1]
    assert np.load(tmp_path / "training_loss.npy").tolist() == [[0.5], [-1.0], [0.5]]


def test_scaffold_stores_the_control_of_the_learning_rate_it_trained_with(tmp_path):
    trainer = make(lambda k, t: torch.full((N,), 0.1 * (k + 1) * (t + 1)))
    state = run(tmp_path, trainer, sizes=[4, 4], fed_alg="scaffold", num_rounds=3)
    last = [c for c in trainer.calls if c["round"] == 2]
    lr = round_learning_rate(0.1, LR_MIN, 2, 3)
    assert all(c["lr"] == lr for c in last) and lr < 0.05  # the schedule, far from the peak 0.1
    for call in last:
        hooks = call["hooks"]
        assert isinstance(hooks, ScaffoldHooks)
        y = call["x"] + 0.1 * (call["client"] + 1) * 3
        expected = (hooks.x - y) / (call["steps"] * lr) - hooks.correction  # option II with this round's lr
        assert torch.allclose(state.client_store[call["client"]]["c"], expected)


class CostHooks(ClientHooks):
    """Hooks that report costs of their own, as FedCOG's do: client k worked k + 1 half-seconds and kept k
    generations whose KL summed to 0.25 k."""

    def __init__(self, client):
        self.client = client

    def metrics(self):
        k = self.client
        return {"work_s": 0.5 * (k + 1), "kept_kl_sum": 0.25 * k, "kept_kl_count": k}


class CostReporting(Algorithm):
    def client_hooks(self, client, x, state, client_store):
        return CostHooks(client)


def test_the_clients_costs_are_summed_into_the_rounds_row(tmp_path):
    trainer = make(lambda k, t: torch.ones(N), loss=lambda k, t: math.nan if k == 2 else 0.5)
    run(tmp_path, trainer, sizes=[4, 4, 4], algorithm=CostReporting(FedArguments()), num_rounds=1)
    row = rows(tmp_path)[0]
    assert row["dropped_clients"] == [2]  # diverged, but its costs were spent: counted
    assert row["work_s"] == 0.5 + 1.0 + 1.5
    assert (row["kept_kl_sum"], row["kept_kl_count"]) == (0.25 + 0.5, 0 + 1 + 2)
    assert row["kept_kl_mean"] == pytest.approx(0.75 / 3)
    nothing_kept = ClientResult(0, None, {}, {}, 1.0, 1, metrics={"kept_kl_sum": 0.0, "kept_kl_count": 0})
    assert summed_client_metrics([nothing_kept])["kept_kl_mean"] is None
    assert summed_client_metrics([ClientResult(0, None, {}, {}, 1.0, 1)]) == {}


def test_each_client_and_round_gets_its_own_seed_and_the_rounds_learning_rate(tmp_path):
    trainer = make(lambda k, t: torch.zeros(N))
    run(tmp_path, trainer, sizes=[4, 4, 4], num_rounds=3)
    seeds = [c["seed"] for c in trainer.calls]
    assert len(seeds) == 9 and len(set(seeds)) == 9
    assert all(c["seed"] == client_seed(SEED, c["round"], c["client"]) for c in trainer.calls)
    assert [c["lr"] for c in trainer.calls[::3]] == [round_learning_rate(0.1, LR_MIN, t, 3) for t in range(3)]


def test_quality_order_moves_a_window_through_the_ordered_data(tmp_path):
    # 10 samples, 4 per round (2 steps x batch 2), 5 rounds: round t starts at int(t / 5 * 10) = 2t, wrapping.
    trainer = make(lambda k, t: torch.zeros(N))
    run(tmp_path, trainer, sizes=[10], num_rounds=5, quality_order=True)
    assert [c["ids"] for c in trainer.calls] == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9],
                                                 [8, 9, 0, 1]]


def test_an_absurd_update_is_logged_and_optionally_dropped(tmp_path, caplog):
    deltas = {0: 0.01, 1: 0.02, 2: 1e5}
    trainer = make(lambda k, t: torch.full((N,), deltas[k]))
    run(tmp_path / "logged", trainer, sizes=[5, 5, 5], num_rounds=1)
    row = rows(tmp_path / "logged")[0]
    assert row["outlier_clients"] == [2] and row["dropped_clients"] == []
    assert "Round 1: client 2's update norm" in caplog.text
    trainer = make(lambda k, t: torch.full((N,), deltas[k]))
    state = run(tmp_path / "dropped", trainer, sizes=[5, 5, 5], num_rounds=1, drop_outliers=True)
    assert rows(tmp_path / "dropped")[0]["dropped_clients"] == [2]
    assert torch.allclose(state.x, torch.arange(4.0) + 0.015)


def test_a_resumed_run_with_no_round_left_holds_the_checkpointed_model(tmp_path):
    """Resuming a finished run (to evaluate it again) trains nothing: the model must still be the trained one,
    not the initial one it was loaded with."""
    trained = run(tmp_path, make(lambda k, t: torch.full((N,), 1.0 + k)), sizes=[4, 4], checkpoint_step=1)
    again = make(lambda k, t: torch.full((N,), 1.0 + k))
    run(tmp_path, again, sizes=[4, 4], resume=True)
    assert again.calls == [] and torch.equal(again.flat.get(), trained.x) and not torch.equal(trained.x,
                                                                                             torch.arange(4.0))


def test_outlier_rule_compares_each_update_with_the_median_of_the_others():
    x = torch.zeros(3)
    updates = [torch.full((3,), v) for v in (1.0, 2.0, 1500.0)]
    assert outlier_clients(x, updates, [4, 5, 6], ratio=1e3, round_number=1) == [6]
    assert outlier_clients(x, updates[:2], [4, 5], ratio=1.5, round_number=1) == [5]  # two clients: each other
    assert outlier_clients(x, updates[:1], [4], ratio=1.5, round_number=1) == []


# --- the real trainer: hooks see each optimizer step once, with the round's learning rate ------------------

@pytest.fixture(scope="module")
def sft_trainer(tiny_model_dir, smol_tokenizer, tmp_path_factory):
    from federated.client import LocalTrainer
    from main_sft import build_sft_trainer, tokenize_clients
    from utils.model import load_base_model, wrap_with_lora

    torch.manual_seed(0)
    model = wrap_with_lora(load_base_model(tiny_model_dir))
    model.base_model.model.config.use_cache = False
    samples = [{"instruction": f"Add {i} and {i}", "response": str(2 * i)} for i in range(8)]
    data = tokenize_clients([samples], smol_tokenizer, "alpaca", 64)[0]
    args = ScriptArguments(output_dir=str(tmp_path_factory.mktemp("sft")), batch_size=2, max_steps=1,
                           gradient_accumulation_steps=2, seq_length=64)
    trainer = build_sft_trainer(model, smol_tokenizer, args, data)
    return LocalTrainer(trainer, FlatParams(model)), data


class Recorder(ScaffoldHooks):
    def __init__(self):
        self.lrs = []

    def after_optimizer_step(self, flat, lr):
        self.lrs.append(lr)


def test_after_step_hook_runs_once_per_optimizer_step_with_the_rounds_lr(sft_trainer, one_thread):
    local, data = sft_trainer
    hooks = Recorder()
    _, steps = local.train(data, 3, 0.0123, hooks, seed=1)
    assert steps == 3 and hooks.lrs == [0.0123] * 3  # 3 optimizer steps of 2 accumulated micro-batches each


def test_fedprox_term_counts_once_per_optimizer_step_with_accumulation(sft_trainer, one_thread):
    """With plain SGD one step moves the parameters by -lr (g_data + mu (y - x)): the prox part, the difference
    between mu > 0 and mu = 0 from the same start, is -lr mu (y - x) exactly once, not once per micro-batch."""
    from transformers.training_args import OptimizerNames

    from federated.algorithms import ProxHooks
    from federated.client import LocalTrainer

    local, data = sft_trainer
    args = local.trainer.args
    assert args.gradient_accumulation_steps == 2
    args.optim, args.max_grad_norm = OptimizerNames.SGD, 0.0  # no clipping: the step is exactly -lr * gradient
    local.trainer.optimizer = None  # LocalTrainer builds its optimizer once, from the trainer's arguments
    sgd = LocalTrainer(local.trainer, local.flat)
    start = sgd.flat.get()
    anchor = start + 0.5  # y - x = -0.5 everywhere at the first step
    lr, mu = 0.01, 2.0
    moved = {}
    for m in (0.0, mu):
        sgd.flat.set(start)
        sgd.train(data, 1, lr, ProxHooks(anchor.clone(), m), seed=3)
        moved[m] = sgd.flat.get() - start
    args.optim, args.max_grad_norm = OptimizerNames.ADAMW_TORCH, 1.0
    local.trainer.optimizer = local.optimizer
    prox_part = moved[mu] - moved[0.0]
    torch.testing.assert_close(prox_part, torch.full_like(prox_part, -lr * mu * -0.5), rtol=1e-3, atol=1e-7)


def test_an_optimizer_step_takes_batch_size_times_accumulation_samples(sft_trainer, one_thread):
    """batch 2 x accumulation 2: one step over 4 samples trains on all four (their real tokens), and one step
    over 8 on four of them, not two or eight."""
    local, data = sft_trainer
    lengths = [len(sample["input_ids"]) for sample in data]
    local.train(data.select(range(4)), 1, 1e-6, Recorder(), seed=1)
    assert local.tokens["useful"] == sum(lengths[:4])
    local.train(data, 1, 1e-6, Recorder(), seed=1)
    assert min(lengths) * 4 <= local.tokens["useful"] <= max(lengths) * 4 < sum(lengths)
