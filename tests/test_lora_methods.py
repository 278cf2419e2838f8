"""LoRA-native methods (federated/lora_methods.py): hand-computed values on small matrices (exact aggregation, SVD
redistribution, personal B, rank masks, bytes), their refusals before loading, and real runs on the tiny model
(FFA-LoRA's A never changes, bytes in metrics.jsonl, personal B's through an interrupted run)."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import main_sft
from conftest import run_entry
from federated.algorithms import Algorithm
from federated.methods import make_algorithm
from federated.checkpoint import RunState, latest_good_checkpoint
from federated.config import FedArguments, ScriptArguments, check_arguments
from federated.flat import FlatParams
from federated.lora_methods import (ExactProduct, HeteroRank, LoraAlgorithm, LoraLayout, LoraModule, PersonalB,
                                    parse_client_ranks)
from test_sft_e2e import tiny_args


class Toy(torch.nn.Module):
    """Two projections of different shapes, for peft to wrap: q [5, 6], v [3, 6]."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(6, 5, bias=False)
        self.v = torch.nn.Linear(6, 3, bias=False)


def toy_model(r=4, alpha=8, seed=0):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    return get_peft_model(Toy(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["q", "v"]))


def composed(method_name, model, **flags):
    fed_args = FedArguments(lora_method=method_name, **flags)
    algorithm = make_algorithm(fed_args, num_clients=4)
    flat = FlatParams(model)
    algorithm.bind(model, flat, flat.get())
    return algorithm, flat


def random_clients(flat, k=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(k, flat.numel, generator=generator)


def effective_weights(layout, vector):
    """W + s B A of every module, for the model held in `vector`."""
    out = []
    for m in layout.modules:
        b, a = m.factors(vector.unsqueeze(0))
        out.append(m.base_weight.detach() + m.scaling * b[0] @ a[0])
    return out


def test_the_layout_pairs_peft_factors_with_their_scaling_and_base_weight():
    model = toy_model()
    layout = LoraLayout(FlatParams(model), model)
    assert [(m.a_shape, m.b_shape, m.scaling) for m in layout.modules] == [((4, 6), (5, 4), 2.0),
                                                                          ((4, 6), (3, 4), 2.0)]
    assert layout.numel == 4 * 6 + 5 * 4 + 4 * 6 + 3 * 4 and int(layout.b_mask.sum()) == 32
    assert layout.numel_at_rank(1) == 6 + 5 + 6 + 3


def test_exact_residual_on_hand_values():
    """A = [2], [4] and B = [3], [5] with weights 1/2: mean(BA) = (6 + 20) / 2 = 13, mean(B) mean(A) = 4 * 3 = 12:
    residual 1, times s = 2."""
    module = LoraModule("m", slice(0, 1), (1, 1), slice(1, 2), (1, 1), 2.0, torch.zeros(1, 1))
    method = ExactProduct(FedArguments(lora_method="exact"))
    method.bind(SimpleNamespace(modules=[module]), torch.zeros(2))
    state = method.init_state(torch.zeros(2))
    rule = Algorithm(FedArguments())
    new = method.aggregate(rule, torch.zeros(2), torch.tensor([[2.0, 3.0], [4.0, 5.0]]), [1, 1], state, 0, {})
    assert new.tolist() == [3.0, 4.0] and state["base_delta"].tolist() == [2.0]


def hand_exact_round(method, state, base_weight_dtype=torch.float32):
    """One round of two clients, A = [3/16], [0] and B = [1/16], [0], weights 1/2, s = 1: residual
    (1/16)(3/16) / 4 = 3/1024, exact in fp32; then the model's W is synced as a client's start would."""
    rule = Algorithm(FedArguments())
    method.aggregate(rule, torch.zeros(2), torch.tensor([[3 / 16, 1 / 16], [0.0, 0.0]]), [1, 1], state, 0, {})
    method.start_vector(0, torch.zeros(2), state, {})


def exact_on(weight):
    module = LoraModule("m", slice(0, 1), (1, 1), slice(1, 2), (1, 1), 1.0, weight)
    method = ExactProduct(FedArguments(lora_method="exact"))
    method.bind(SimpleNamespace(modules=[module]), torch.zeros(2))
    return method, method.init_state(torch.zeros(2))


def test_exact_keeps_residuals_below_bf16_resolution():
    """W0 = 1 in bf16 (spacing 1/128 there): each round's residual 3/1024 alone rounds away, but W is W0 + E
    rounded once, so E = 6/1024 after two rounds shows (W = 1 + 8/1024) and 18/1024 after six (1 + 16/1024).
    Adding each residual to the bf16 W would leave it at 1 forever: the method would silently be FedAvg."""
    weight = torch.ones(1, 1, dtype=torch.bfloat16)
    method, state = exact_on(weight)
    seen = []
    for _ in range(6):
        hand_exact_round(method, state)
        seen.append(float(weight))
    assert seen == [1.0, 1 + 8 / 1024, 1 + 8 / 1024, 1 + 16 / 1024, 1 + 16 / 1024, 1 + 16 / 1024]
    assert state["base_delta"].dtype == torch.float32 and state["base_delta"].tolist() == [18 / 1024]


def test_every_federation_on_the_same_model_starts_from_the_same_base():
    """--client_groups runs one federation after another on one model: the second's W starts at W0, not at W0
    plus the first group's residuals, and its own residuals build on W0."""
    weight = torch.ones(1, 1)
    first, first_state = exact_on(weight)
    for _ in range(3):
        hand_exact_round(first, first_state)
    assert float(weight) == 1 + 9 / 1024
    second, second_state = exact_on(weight)
    second.start_vector(0, torch.zeros(2), second_state, {})
    assert float(weight) == 1.0
    hand_exact_round(second, second_state)
    assert float(weight) == 1 + 3 / 1024


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_base_after_a_resume_is_bit_identical(dtype):
    """A model that lived through rounds 1-3 and a freshly loaded one given round 3's checkpointed state hold the
    same W, bit for bit (adding each round's change to W rounds differently from adding E once)."""
    running, flat = composed("exact", toy_model().to(dtype))
    state = running.init_state(flat.get(), 4)
    for t in range(3):  # three clients' random factors aggregated, then a client's start syncs the base
        clients = random_clients(flat, seed=t)
        x = running.step(flat.get(), clients, [10, 30, 60], state, t)
        running.client_hooks(0, x, state, {})
    resumed, resumed_flat = composed("exact", toy_model().to(dtype))
    resumed.load_global(resumed_flat, RunState(x=x, server_state=state))
    for a, b, w0 in zip(running.method.layout.modules, resumed.method.layout.modules, running.method.w0):
        assert b.base_weight.dtype == dtype and torch.equal(a.base_weight, b.base_weight)
        assert not torch.equal(a.base_weight, w0)  # the residuals are in W


@pytest.mark.parametrize("rule", ["fedavg", "fedprox", "scaffold"])
def test_exact_aggregation_is_the_weighted_mean_of_the_clients_models(rule):
    model = toy_model()
    algorithm, flat = composed("exact", model, fed_alg=rule)
    x = flat.get()
    state = algorithm.init_state(x, 4)
    clients, counts = random_clients(flat), [10, 30, 60]
    uploads = {"control_delta": torch.zeros_like(clients)} if rule == "scaffold" else {}
    layout = algorithm.method.layout
    expected = [sum(w * e for w, e in zip([0.1, 0.3, 0.6], per_module))
                for per_module in zip(*(effective_weights(layout, y) for y in clients))]
    # Plain averaging of the same factors is not exact: the residual is what makes the difference.
    plain = effective_weights(layout, torch.tensor([0.1, 0.3, 0.6]) @ clients)
    assert not any(torch.allclose(p, w, atol=1e-3) for p, w in zip(plain, expected))
    run = RunState(x=algorithm.step(x, clients, counts, state, 0, uploads), server_state=state)
    algorithm.load_global(flat, run)  # folds the residual into the model's frozen weights
    for got, want in zip(effective_weights(layout, flat.get()), expected):
        assert torch.allclose(got, want, atol=1e-5)


def test_svd_redistribution_keeps_the_top_singular_values_and_truncates_per_client():
    model = toy_model(r=4)
    algorithm, flat = composed("hetero_rank", model, client_ranks="1,2,4")
    method, layout = algorithm.method, algorithm.method.layout
    x = flat.get()
    # Clients start at their ranks: masked factors (client 0: rank 1, client 1: rank 2, client 2: rank 4).
    clients = torch.stack([algorithm.client_hooks(k, torch.randn(flat.numel), {}, {}).start_vector(x)
                           for k in range(3)])
    assert all(int((clients[k] != 0).sum()) == layout.numel_at_rank(r) for k, r in enumerate([1, 2, 4]))
    new = algorithm.step(x, clients, [1, 1, 2], {}, 0)
    weights = torch.tensor([0.25, 0.25, 0.5])
    for m in layout.modules:
        b, a = m.factors(clients)
        mean_product = torch.einsum("i,idr,irk->dk", weights, b, a)
        top = torch.linalg.svdvals(mean_product)[:m.rank]
        nb, na = m.factors(new.unsqueeze(0))
        assert torch.allclose(torch.linalg.svdvals(nb[0] @ na[0])[:m.rank], top, atol=1e-5)
        # A client of rank 2 gets the best rank-2 approximation: the top two singular values, nothing else.
        start = method.start_vector(1, new, {}, {})
        sb, sa = m.factors(start.unsqueeze(0))
        values = torch.linalg.svdvals(sb[0] @ sa[0])
        assert torch.allclose(values[:2], top[:2], atol=1e-5) and float(values[2:].abs().max()) < 1e-5


def test_rank_mask_keeps_masked_coordinates_zero_after_a_step():
    model = toy_model(r=4)
    algorithm, flat = composed("hetero_rank", model, client_ranks="2")
    hooks = algorithm.client_hooks(0, flat.get(), {}, {})
    flat.set(torch.ones(flat.numel))  # as if an optimizer had moved every coordinate
    hooks.after_optimizer_step(flat, lr=0.1)
    y = flat.get()
    layout = algorithm.method.layout
    a = y[layout.modules[0].a].view(4, 6)
    b = y[layout.modules[0].b].view(5, 4)
    assert a[:2].eq(1).all() and a[2:].eq(0).all() and b[:, :2].eq(1).all() and b[:, 2:].eq(0).all()


def test_personal_b_start_upload_and_state():
    model = toy_model()
    algorithm, flat = composed("personal", model)
    mask = algorithm.method.layout.b_mask
    x = torch.arange(float(flat.numel))
    own = torch.full((int(mask.sum()),), 7.0)
    hooks = algorithm.client_hooks(2, x, {}, {2: {"lora_B": own}})
    start = hooks.start_vector(x)
    assert torch.equal(start[mask], own) and torch.equal(start[~mask], x[~mask])
    y = start + 1
    sent = hooks.upload_vector(y)
    assert torch.equal(sent[mask], x[mask]) and torch.equal(sent[~mask], y[~mask])  # B is never sent
    _, kept = hooks.finish(y, 1, 0.1)
    assert torch.equal(kept["lora_B"], own + 1)
    # A new client starts from the shared init of B (peft: zeros).
    assert algorithm.client_hooks(3, x, {}, {}).start_vector(x)[mask].eq(0).all()


def test_bytes_each_method_sends_per_client():
    model = toy_model(r=4)
    flat = FlatParams(model)
    n, b, dense = flat.numel, 32, 5 * 6 + 3 * 6
    expected = {"standard": (n, n), "exact": (n, n + dense), "personal": (n - b, n - b)}
    for name, (up, down) in expected.items():
        algorithm, _ = composed(name, toy_model(r=4))
        assert algorithm.transfer_bytes(0, n) == (4 * up, 4 * down), name
    algorithm, _ = composed("hetero_rank", toy_model(r=4), client_ranks="1,4")
    assert algorithm.transfer_bytes(0, n) == (4 * 20, 4 * 20) and algorithm.transfer_bytes(1, n) == (4 * n, 4 * n)


def test_client_ranks_from_a_list_or_a_file(tmp_path):
    assert parse_client_ranks("4,8,16") == [4, 8, 16]
    (tmp_path / "ranks.json").write_text(json.dumps({"0": 4, "3": 8}))
    ranks = parse_client_ranks(str(tmp_path / "ranks.json"))
    method = HeteroRank(FedArguments(lora_method="hetero_rank", client_ranks=str(tmp_path / "ranks.json")))
    method.r_max = 16
    assert ranks == {0: 4, 3: 8} and [method.rank_of(k) for k in range(4)] == [4, 16, 16, 8]


@pytest.mark.parametrize("flags, message", [
    (["--lora_method", "dora"], "Unknown --lora_method 'dora'"),
    (["--lora_method", "exact", "--fed_alg", "fedadam"], "--lora_method exact with --fed_alg fedadam is not defined"),
    (["--lora_method", "hetero_rank", "--client_ranks", "4,8", "--fed_alg", "scaffold"],
     "--lora_method hetero_rank with --fed_alg scaffold is not defined"),
    (["--lora_method", "personal", "--fed_alg", "scaffold"], "--lora_method personal with --fed_alg scaffold"),
    (["--lora_method", "exact", "--dp_mode", "clip", "--dp_noise_multiplier", "1"], "DP releases only their noised"),
    (["--lora_method", "hetero_rank", "--fed_alg", "feddp", "--client_ranks", "4"], "DP releases only"),
    (["--lora_method", "hetero_rank"], "--client_ranks goes with --lora_method hetero_rank"),
    (["--client_ranks", "4"], "--client_ranks goes with --lora_method hetero_rank"),
    (["--lora_method", "hetero_rank", "--client_ranks", "4,32"], "rank 32 exceeds --peft_lora_r 16"),
    (["--lora_method", "hetero_rank", "--client_ranks", "4,x"], "give comma-separated integers"),
    (["--lora_method", "personal", "--fed_alg", "local0"], "trains one client alone"),
])
def test_refusals_name_the_problem_before_loading(flags, message):
    from transformers import HfArgumentParser
    script_args, fed_args = HfArgumentParser((ScriptArguments, FedArguments)).parse_args_into_dataclasses(flags)
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        check_arguments(script_args, fed_args)


def test_every_method_composes_with_every_rule_it_does_not_refuse():
    from transformers import HfArgumentParser
    from federated.algorithms import ALGORITHMS
    accepted = {}
    for method in ("ffa", "exact", "hetero_rank", "personal"):
        for rule in ALGORITHMS:
            flags = ["--lora_method", method, "--fed_alg", rule]
            flags += ["--client_ranks", "4,8,16"] if method == "hetero_rank" else []
            script_args, fed_args = HfArgumentParser((ScriptArguments, FedArguments)).parse_args_into_dataclasses(
                flags)
            try:
                check_arguments(script_args, fed_args)
                accepted.setdefault(method, []).append(rule)
            except SystemExit:
                pass
    assert accepted == {"ffa": list(ALGORITHMS), "exact": ["fedavg", "fedprox", "scaffold"],
                        "hetero_rank": ["fedavg", "fedprox"],
                        "personal": [r for r in ALGORITHMS if r != "scaffold"]}
    assert isinstance(make_algorithm(FedArguments(lora_method="ffa"), 2), LoraAlgorithm)
    assert type(make_algorithm(FedArguments(), 2)) is Algorithm  # standard: the rule alone


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ffa_never_changes_a_and_sends_only_b(tiny_model_dir, tmp_path, one_thread):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out = tmp_path / "ffa"
    run_entry(main_sft, tiny_args(tiny_model_dir, out, "--lora_method", "ffa", "--dp_mode", "clip",
                                  "--dp_noise_multiplier", "0.5"))
    trained = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    # The shared init: the same seeded LoRA wrapping of the same base model.
    from federated.setup import load_lora_model
    init = {n: p.detach() for n, p in load_lora_model(ScriptArguments(model_name_or_path=tiny_model_dir))
            .named_parameters() if "lora_" in n}
    a_keys = [k for k in trained if "lora_A" in k]
    b_keys = [k for k in trained if "lora_B" in k]
    assert a_keys and all(torch.equal(trained[k], init[k.replace(".weight", ".default.weight")]) for k in a_keys)
    assert all(not torch.equal(trained[k], init[k.replace(".weight", ".default.weight")]) for k in b_keys)
    b_numel = sum(trained[k].numel() for k in b_keys)
    assert [(r["bytes_uploaded"], r["bytes_downloaded"]) for r in rows(out)] == [(2 * 4 * b_numel,) * 2] * 2
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "checkpoint-2")


@pytest.mark.slow
@pytest.mark.parametrize("method, kept, rounds", [("personal", "b_sum", 3), ("exact", "base_delta", 3)])
def test_an_interrupted_run_resumes_bit_identically(method, kept, rounds, tiny_model_dir, tmp_path, one_thread):
    """Personal B's (client store) and the exact method's base delta (server state, set into the freshly loaded
    base weights on resume: the last round trains on them) survive a stop before the last round bit for bit
    (exact: the base that lived through two rounds is the base built from their sum at once)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    # lr 1e-2: factors that move enough for the residual to change the next round's training visibly.
    args = ["--lora_method", method, "--checkpoint_step", 1, "--learning_rate", 1e-2, "--max_steps", 3,
            "--num_rounds", rounds]
    run_entry(main_sft, tiny_args(tiny_model_dir, full, *args))
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / f"checkpoint-{rounds}")
    run_entry(main_sft, tiny_args(tiny_model_dir, resumed, *args, "--resume", "true"))
    a = load_file(full / f"checkpoint-{rounds}" / "run_state.safetensors")
    b = load_file(resumed / f"checkpoint-{rounds}" / "run_state.safetensors")
    assert a.keys() == b.keys() and len([k for k in a if k.endswith(kept)]) == 1
    assert all(torch.equal(a[k], b[k]) for k in a if k != "torch_rng")
    if method == "personal":  # every client's own B, in the client-state store
        stores = [latest_good_checkpoint(run)[1].client_store for run in (full, resumed)]
        assert sorted(stores[0]) == sorted({k for r in rows(full) for k in r["clients"]}) == sorted(stores[1])
        assert all(torch.equal(stores[0][k]["lora_B"], stores[1][k]["lora_B"]) for k in stores[0])
    trained_a, trained_b = (load_file(run / f"checkpoint-{rounds}" / "adapter_model.safetensors")
                            for run in (full, resumed))
    assert all(torch.equal(trained_a[k], trained_b[k]) for k in trained_a)
    assert [r["bytes_uploaded"] for r in rows(full)] == [r["bytes_uploaded"] for r in rows(resumed)]
    if method == "personal":  # only A is sent
        a_numel = sum(v.numel() for k, v in trained_a.items() if "lora_A" in k)
        assert rows(full)[0]["bytes_uploaded"] == 2 * 4 * a_numel


@pytest.mark.slow
def test_exact_and_hetero_rank_runs_report_what_they_send(tiny_model_dir, tmp_path, one_thread):
    exact, hetero = tmp_path / "exact", tmp_path / "hetero"
    run_entry(main_sft, tiny_args(tiny_model_dir, exact, "--lora_method", "exact", "--num_rounds", 1))
    run_entry(main_sft, tiny_args(tiny_model_dir, hetero, "--lora_method", "hetero_rank", "--client_ranks", "4,16",
                                  "--num_rounds", 1))
    adapter = load_file(exact / "checkpoint-1" / "adapter_model.safetensors")
    lora = sum(v.numel() for v in adapter.values())
    dense = sum(adapter[k.replace("lora_A", "lora_B")].shape[0] * v.shape[1] for k, v in adapter.items()
                if "lora_A" in k)
    state = load_file(exact / "checkpoint-1" / "run_state.safetensors")
    assert state["server/base_delta"].numel() == dense and state["server/base_delta"].abs().max() > 0
    clients = rows(exact)[0]["clients"]
    assert (rows(exact)[0]["bytes_uploaded"], rows(exact)[0]["bytes_downloaded"]) == (
        4 * lora * len(clients), 4 * (lora + dense) * len(clients))
    row = rows(hetero)[0]
    at_rank = {r: sum(v.numel() * r // 16 for v in adapter.values()) for r in (4, 16)}
    assert row["bytes_uploaded"] == row["bytes_downloaded"] == 4 * sum(at_rank[[4, 16][k % 2]]
                                                                       for k in row["clients"])
