"""Server algorithms, client hooks, sampling, schedules and dynamic steps against the formulas of
docs/ALGORITHMS.md, checked by an independent NumPy oracle and literal hand-computed values."""
import math
import random

import numpy as np
import pytest
import torch

from federated.algorithms import ALGORITHMS, parse_local, server_step
from federated.methods import make_algorithm
from federated.client import local_steps, round_subset
from federated.config import FedArguments, ScriptArguments, check_arguments
from federated.flat import FlatParams
from federated.loop import round_learning_rate, sample_clients


def fed(**kw):
    return FedArguments(**kw)


def oracle(rule, rounds, x, n, beta1=0.5, beta2=0.99, eta=1e-3, tau=1e-3):
    """The paper's server math written out with NumPy, one round at a time."""
    x = np.array(x, dtype=np.float64)
    m, v = np.zeros_like(x), np.full_like(x, tau ** 2)
    for t, ys in enumerate(rounds):
        ys = np.array(ys, dtype=np.float64)
        w = np.array(n, dtype=np.float64) / sum(n)
        if rule in ("fedavg", "fedprox", "scaffold"):
            x = (w[:, None] * ys).sum(0)
            continue
        if rule == "fedavgm":
            d = (w[:, None] * (ys - x)).sum(0)
            m = d if t == 0 else beta1 * m + (1 - beta1) * d
            x = x + m
            continue
        d = (ys - x).mean(0)  # FedOpt: unweighted mean
        m = d if (t == 0 or rule == "fedadagrad") else beta1 * m + (1 - beta1) * d
        if rule == "fedadagrad":
            v = v + m ** 2
        elif rule == "fedyogi":
            v = v - (1 - beta2) * m ** 2 * np.sign(v - m ** 2)
        else:
            v = beta2 * v + (1 - beta2) * m ** 2
        x = x + eta * m / (np.sqrt(v) + tau)
    return x


ROUNDS = [
    [[1.0, 2.0, -1.0], [3.0, 4.0, 0.5]],
    [[0.5, 1.0, 2.0], [-1.0, 3.0, 1.0]],
    [[2.0, -2.0, 0.0], [1.0, 1.0, 1.0]],
]
COUNTS = [1, 3]


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "scaffold", "fedavgm", "fedadagrad", "fedyogi", "fedadam"])
def test_server_rules_match_oracle_over_rounds(name):
    algorithm = make_algorithm(fed(fed_alg=name), num_clients=2)
    x = torch.zeros(3)
    state = algorithm.init_state(x, 2)
    for t, ys in enumerate(ROUNDS):
        uploads = {"control_delta": torch.zeros(2, 3)} if name == "scaffold" else {}
        x = server_step(algorithm, x, torch.tensor(ys), COUNTS, state, t, uploads)
    np.testing.assert_allclose(x.numpy(), oracle(name, ROUNDS, [0, 0, 0], COUNTS), rtol=1e-5, atol=1e-7)


def test_hand_computed_first_round():
    x0, ys = torch.zeros(2), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # FedAvg with weights 1/4, 3/4.
    avg = make_algorithm(fed(fed_alg="fedavg"), 2)
    assert server_step(avg, x0, ys, [1, 3], {}, 0).tolist() == [2.5, 3.5]
    # FedAdam round 0: D = (2, 3) unweighted; m = D; v = 0.99 tau^2 + 0.01 m^2; x = eta m / (sqrt(v) + tau).
    adam = make_algorithm(fed(fed_alg="fedadam"), 2)
    state = adam.init_state(x0, 2)
    x1 = server_step(adam, x0, ys, [1, 3], state, 0)
    v0 = 0.99 * 1e-6 + 0.01 * 4.0
    assert x1[0].item() == pytest.approx(1e-3 * 2.0 / (math.sqrt(v0) + 1e-3), rel=1e-6)
    assert x1[0].item() == pytest.approx(0.00995013, rel=1e-5)  # 0.002 / (0.2000025 + 0.001)
    # FedAvgM round 0 is FedAvg; round 1 mixes the momentum: m = 0.5 (2.5, 3.5) + 0.5 D1.
    avgm = make_algorithm(fed(fed_alg="fedavgm"), 2)
    state = avgm.init_state(x0, 2)
    x1 = server_step(avgm, x0, ys, [1, 3], state, 0)
    assert x1.tolist() == [2.5, 3.5]
    x2 = server_step(avgm, x1, torch.tensor([[2.5, 3.5], [4.5, 3.5]]), [1, 1], state, 1)
    assert x2.tolist() == pytest.approx([2.5 + 0.5 * 2.5 + 0.5 * 1.0, 3.5 + 0.5 * 3.5])


def test_bias_correction_is_an_option_not_the_default():
    x0, ys = torch.zeros(2), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    plain = make_algorithm(fed(fed_alg="fedadam"), 2)
    corrected = make_algorithm(fed(fed_alg="fedadam", fedopt_bias_correction=True), 2)
    a = server_step(plain, x0, ys, [1, 3], plain.init_state(x0, 2), 0)
    b = server_step(corrected, x0, ys, [1, 3], corrected.init_state(x0, 2), 0)
    # Adam's (Kingma & Ba) correction: m = (1 - beta1) D = 0.5 D, corrected back to D; v = 0.01 m^2 + 0.99 tau^2,
    # corrected by 0.01.
    m, v = 0.5 * 2.0, 0.99 * 1e-6 + 0.01 * 1.0
    assert b[0].item() == pytest.approx(1e-3 * (m / 0.5) / (math.sqrt(v / 0.01) + 1e-3), rel=1e-6)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("rule,expected", [
    # Two rounds of Reddi et al. 2021, Algorithm 2, worked by hand with eta = tau = 1e-3, beta1 = 0.5, beta2 = 0.99,
    # v_-1 = tau^2, m_-1 = 0. Round 0: D = mean of (1, 2), (3, 4) = (2, 3) (unweighted: the counts 1, 3 do not
    # matter); m = 0.5 D = (1, 1.5). Round 1: D = (0, 2); m = 0.5 (1, 1.5) + 0.5 (0, 2) = (0.5, 1.75).
    # FedAdagrad: v = tau^2 + D^2 = (4.000001, 9.000001), x1_0 = 1e-3 * 1 / (2.00000025 + 1e-3) = 4.9975006e-4;
    #   round 1: v_0 stays 4.000001, x2_0 = x1_0 + 1e-3 * 0.5 / 2.00100025 = 7.4962509e-4.
    ("fedadagrad", [[4.997500625e-4, 4.998333611e-4], [7.496250937e-4, 9.850614361e-4]]),
    # FedYogi: v = tau^2 - 0.01 D^2 sign(tau^2 - D^2) = tau^2 + 0.01 D^2 = (0.040001, 0.090001);
    #   x1_0 = 1e-3 / (0.2000025 + 1e-3) = 4.9750625e-3; round 1: D_0 = 0 leaves v_0, x2_0 = x1_0 + 5e-4 / 0.2010025.
    ("fedyogi", [[4.9750625e-3, 4.983361111e-3], [7.462593749e-3, 9.823544957e-3]]),
    # FedAdam: v = 0.99 tau^2 + 0.01 D^2 = (0.04000099, 0.09000099); x1_0 = 1e-3 / (0.20000247 + 1e-3);
    #   round 1: v_0 = 0.99 * 0.04000099 = 0.03960098, x2_0 = x1_0 + 5e-4 / (0.19900000 + 1e-3).
    ("fedadam", [[4.975063118e-3, 4.983361387e-3], [7.475063743e-3, 9.840340715e-3]]),
])
def test_reddi_algorithm2_against_hand_values(rule, expected):
    algorithm = make_algorithm(fed(fed_alg=rule, fedopt_variant="reddi"), 2)
    x0 = torch.zeros(2)
    state = algorithm.init_state(x0, 2)
    x1 = server_step(algorithm, x0, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), [1, 3], state, 0)
    assert x1.tolist() == pytest.approx(expected[0], rel=1e-6)
    x2 = server_step(algorithm, x1, x1 + torch.tensor([[1.0, 1.0], [-1.0, 3.0]]), [1, 3], state, 1)
    assert x2.tolist() == pytest.approx(expected[1], rel=1e-6)
    assert state["m"].tolist() == pytest.approx([0.5, 1.75])
    # The paper's code (the default) differs from round 0: m <- D, so the first step is about twice as long.
    paper = make_algorithm(fed(fed_alg=rule), 2)
    x1_paper = server_step(paper, x0, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), [1, 3], paper.init_state(x0, 2), 0)
    assert x1_paper[0].item() > 1.9 * x1[0].item()


@pytest.mark.parametrize("flags,message", [
    ({"fed_alg": "fedavgm", "fedopt_variant": "reddi"}, "no adaptive server step"),
    ({"fed_alg": "fedadam", "fedopt_variant": "reddi", "fedopt_weighted": True}, "Algorithm 2 exactly"),
    ({"fed_alg": "fedadam", "fedopt_variant": "reddi", "fedopt_bias_correction": True}, "Algorithm 2 exactly"),
])
def test_reddi_variant_refuses_what_algorithm2_does_not_have(flags, message):
    with pytest.raises(SystemExit, match=message):
        make_algorithm(fed(**flags), 2)


def test_scaffold_control_update_and_client_correction():
    algorithm = make_algorithm(fed(fed_alg="scaffold"), num_clients=4)
    x = torch.tensor([1.0, 1.0])
    state = algorithm.init_state(x, 4)
    store = {1: {"c": torch.tensor([0.5, -0.5])}}
    state["c"] = torch.tensor([0.2, 0.2])
    hooks = algorithm.client_hooks(1, x, state, store)
    assert hooks.correction.tolist() == pytest.approx([-0.3, 0.7])  # c - c_i
    y = torch.tensor([0.8, 1.4])
    uploads, client_state = hooks.finish(y, steps=2, lr=0.1)
    # c_i+ = (x - y) / (K lr) - (c - c_i) = (0.2, -0.4) / 0.2 - (-0.3, 0.7) = (1.3, -2.7)
    assert client_state["c"].tolist() == pytest.approx([1.3, -2.7])
    assert uploads["control_delta"].tolist() == pytest.approx([0.8, -2.2])
    new_x = server_step(algorithm, x, y[None], [5], state, 0, {"control_delta": uploads["control_delta"][None]})
    assert state["c"].tolist() == pytest.approx([0.2 + 0.8 / 4, 0.2 - 2.2 / 4])  # c += sum dc_i / num_clients
    assert new_x.tolist() == pytest.approx(y.tolist())


def test_scaffold_after_step_and_fedprox_term_on_real_parameters():
    model = torch.nn.Linear(3, 2)
    flat = FlatParams(model)
    x = flat.get().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    prox = make_algorithm(fed(fed_alg="fedprox", prox_mu=0.1), 2).client_hooks(0, x, {}, {})
    term = prox.loss_term(flat)
    assert term.item() == pytest.approx(0.5 * 0.1 * 6.0)  # mu/2 ||y - x||^2 with six weights moved by 1
    term.backward()
    assert torch.allclose(model.weight.grad, torch.full((2, 3), 0.1))  # gradient mu (y - x)
    scaffold = make_algorithm(fed(fed_alg="scaffold"), 2)
    state = {"c": torch.ones_like(x)}
    before = flat.get()
    scaffold.client_hooks(0, x, state, {}).after_optimizer_step(flat, lr=0.5)
    assert torch.allclose(flat.get(), before - 0.5)  # y <- y - lr (c - c_i), c_i = 0


def test_flat_params_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)
    flat = FlatParams(model)
    assert flat.numel == 12 + 6 + 2
    vector = torch.arange(flat.numel, dtype=torch.float32)
    flat.set(vector)
    assert torch.equal(flat.get(), vector)
    assert torch.equal(model[1].bias.detach(), torch.tensor([18.0, 19.0]))


def test_client_sampling_follows_the_reference():
    args = fed(sample_clients=3)
    for t in range(5):
        random.seed(t)
        assert sample_clients(args, 10, t) == sorted(random.sample(range(10), 3))
    assert sample_clients(args, 2, 0) == [0, 1]
    assert sample_clients(fed(fed_alg="local12"), 20, 4) == [12]  # every digit of k counts
    assert parse_local("local12") == 12 and parse_local("fedavg") is None


def test_round_subset_is_seeded_by_round():
    class Rows(list):
        def select(self, idx):
            return [self[i] for i in idx]
    rows = Rows(range(100))
    random.seed(3)
    assert round_subset(rows, 3, 8) == random.sample(range(100), 8)
    assert sorted(round_subset(rows, 0, 500)) == list(range(100))


def test_learning_rate_schedule_and_dynamic_steps():
    assert round_learning_rate(2e-5, 1e-6, 0, 10) == pytest.approx(2e-5)
    assert round_learning_rate(2e-5, 1e-6, 5, 10) == pytest.approx(1e-6 + 0.5 * (2e-5 - 1e-6))
    script = ScriptArguments(batch_size=4, gradient_accumulation_steps=2, max_steps=7, dynamic_local_step=True)
    fargs = fed(num_rounds=200, sample_clients=10)
    p = 200 * 10 / 747
    assert local_steps(script, fargs, 154, 747) == math.ceil(154 * 3 / p / 8)
    assert local_steps(script, fargs, 5, 747) == math.ceil(5 * 3 / p / 8)
    script.dynamic_local_step = False
    assert local_steps(script, fargs, 154, 747) == 7


def test_unknown_algorithm_and_local_out_of_range_errors():
    with pytest.raises(SystemExit, match="Unknown --fed_alg 'fedsgd'.*fedavg.*local<k>"):
        make_algorithm(fed(fed_alg="fedsgd"), 5)
    with pytest.raises(SystemExit, match="client index 5 is out of range.*5 clients"):
        make_algorithm(fed(fed_alg="local5"), 5)


def test_every_registered_algorithm_has_a_state_the_checkpoint_can_hold():
    for name in ALGORITHMS:
        state = make_algorithm(fed(fed_alg=name), 3).init_state(torch.zeros(4), 3)
        assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in state.values())


def test_local_epochs_make_one_round_per_epoch_over_all_of_the_clients_data():
    fargs = fed(fed_alg="local3", num_rounds=200, local_epochs=5)
    assert fargs.num_rounds == 5  # the paper's local baseline: epochs, not the federated rounds x steps
    script = ScriptArguments(batch_size=4, gradient_accumulation_steps=4, max_steps=10, dynamic_local_step=True)
    assert local_steps(script, fargs, 154, 237) == math.ceil(154 / 16)  # one pass, dynamic steps ignored
    from datasets import Dataset
    epoch = round_subset(Dataset.from_dict({"i": list(range(154))}), 2, 16 * local_steps(script, fargs, 154, 237))
    assert sorted(epoch["i"]) == list(range(154))  # every sample once
    with pytest.raises(SystemExit, match="--local_epochs 5 needs --fed_alg local<k>"):
        check_arguments(ScriptArguments(), fed(fed_alg="fedavg", local_epochs=5))
    with pytest.raises(SystemExit, match="positive number of epochs"):
        check_arguments(ScriptArguments(), fed(fed_alg="local0", local_epochs=0))
