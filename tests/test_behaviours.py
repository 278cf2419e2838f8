"""One small test per behaviour that a round of hand-made plausible bugs broke without any test failing: each
asserts the behaviour itself, with numbers a broken version would not give (the LoRA methods, the round loop,
DP, resume settings, the run folder, the batching, the reproduction tables, the judge and benchmark scorers, and
the Flower messages and secure aggregation)."""
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import needs_eval_data
from federated.checkpoint import RunState
from federated.config import FedArguments, ScriptArguments
from federated.loop import ClientResult, Federation, SummedUpdate, train_client
from test_loop_wiring import N, SEED, client_data, make, rows, run


# --- LoRA methods ------------------------------------------------------------------------------------------------

def test_client_ranks_shorter_than_the_client_count_are_cycled():
    from federated.lora_methods import HeteroRank
    method = HeteroRank(FedArguments(lora_method="hetero_rank", client_ranks="4,8"))
    method.r_max = 16
    assert [method.rank_of(k) for k in range(5)] == [4, 8, 4, 8, 4]


def test_personal_keeps_the_global_b_at_its_init_whatever_dp_adds():
    """DP noises every coordinate of the mean, B's too: the global B must stay at the shared init (nobody's B
    is sent, so noise there would be applied to no one), while A takes the noised step."""
    from test_lora_methods import composed, toy_model
    algorithm, flat = composed("personal", toy_model())
    mask = algorithm.method.layout.b_mask
    x = flat.get()
    noised_mean = x + torch.randn(1, flat.numel, generator=torch.Generator().manual_seed(0))
    new = algorithm.step(x, noised_mean, [1], {}, 0)
    assert torch.equal(new[mask], x[mask]) and not torch.equal(new[~mask], x[~mask])


def test_the_scored_personal_model_holds_the_mean_of_the_clients_b(tmp_path):
    from federated.client_store import ClientStore
    from test_lora_methods import composed, toy_model
    algorithm, flat = composed("personal", toy_model())
    mask = algorithm.method.layout.b_mask
    x, nb = flat.get(), int(mask.sum())
    run = RunState(x=x, server_state=algorithm.init_state(x, 4), client_store=ClientStore.fresh(tmp_path))
    algorithm.keep_client_state(run, 3, {"lora_B": torch.full((nb,), 4.0)}, 1)
    algorithm.keep_client_state(run, 0, {"lora_B": torch.full((nb,), 1.0)}, 1)
    algorithm.load_global(flat, run)
    scored = flat.get()
    assert torch.equal(scored[mask], torch.full((nb,), 2.5)) and torch.equal(scored[~mask], x[~mask])


# --- the round loop ----------------------------------------------------------------------------------------------

def federation(tmp_path, trainer, sizes, privacy=None):
    script = ScriptArguments(output_dir=str(tmp_path), learning_rate=0.1, seed=SEED, max_steps=2, batch_size=2,
                             checkpoint_step=100)
    fed_args = FedArguments(num_rounds=2, sample_clients=len(sizes))
    fed_args.num_clients = len(sizes)
    return Federation(script, fed_args, trainer.model, trainer.flat, sizes, lr_min=1e-3, privacy=privacy)


def test_the_rounds_mean_loss_leaves_out_dropped_clients(tmp_path):
    losses = {0: 1.0, 1: 50.0, 2: 3.0}
    trainer = make(lambda k, t: torch.full((N,), float("nan") if k == 1 else 0.0), loss=lambda k, t: losses[k])
    fed = federation(tmp_path, trainer, [4, 4, 4])
    tasks, data = fed.plan(0), client_data([4, 4, 4])
    results = [train_client(trainer, fed.algorithm, task, data[task.client], fed.run.x, fed.run.server_state,
                            fed.run.client_store) for task in tasks]
    row = fed.finish_round(tasks, results, 0.0)
    assert row["dropped_clients"] == [1] and row["mean_loss"] == 2.0


def test_a_client_whose_loss_is_finite_but_whose_weights_are_not_is_dropped(tmp_path):
    trainer = make(lambda k, t: torch.tensor([0.0, float("inf"), 0.0, 0.0]) if k == 1 else torch.ones(N),
                   loss=lambda k, t: 0.5)
    state = run(tmp_path, trainer, sizes=[4, 4], num_rounds=1)
    assert rows(tmp_path)[0]["dropped_clients"] == [1] and torch.equal(state.x, torch.arange(4.0) + 1)


def test_an_outlier_dropped_clients_state_is_not_kept(tmp_path):
    deltas = {0: 0.01, 1: 0.02, 2: 1e5}
    trainer = make(lambda k, t: torch.full((N,), deltas[k]))
    state = run(tmp_path, trainer, sizes=[5, 5, 5], num_rounds=1, fed_alg="scaffold", drop_outliers=True)
    assert rows(tmp_path)[0]["dropped_clients"] == [2] and sorted(state.client_store) == [0, 1]


def test_secure_dp_noise_is_divided_by_the_replies_in_the_sum(tmp_path):
    """Three sampled, two in the secure sum: the noise std is z C / 2, as for the uniform mean of two."""
    from federated.privacy import ClippedDP
    privacy = ClippedDP(clip=1.0, noise_multiplier=0.6, sample_rate=1.0, delta=1e-5, seed=SEED)
    fed = federation(tmp_path, make(lambda k, t: torch.zeros(N)), [4, 4, 4], privacy=privacy)
    tasks = fed.plan(0)
    results = [ClientResult(task.client, None, {}, {}, 1.0, 2) for task in tasks]
    row = fed.finish_round(tasks, results, 0.0, summed=SummedUpdate(torch.zeros(N), clients=[0, 2], metrics={}))
    assert row["dropped_clients"] == [1] and row["dp_noise_std"] == pytest.approx(0.6 / 2)


def test_a_round_subset_not_a_multiple_of_a_step_keeps_its_last_short_chunk():
    from federated.client import LocalTrainer
    local = LocalTrainer.__new__(LocalTrainer)  # only the step plan: no trainer needed
    local.trainer, local.per_step = SimpleNamespace(args=SimpleNamespace(train_sampling_strategy="random")), 4
    steps = list(local._step_indices(10, 3, torch.Generator().manual_seed(0)))
    assert [len(s) for s in steps] == [4, 4, 2] and sorted(sum(steps, [])) == list(range(10))


def test_padded_dpo_under_a_token_budget_counts_both_sequences():
    """A padded pair costs its chosen and its rejected sequence, both padded to the longer: 2 x 30 tokens here,
    so two pairs (120 tokens) do not fit a budget of 100."""
    from federated.batching import PreferenceBatches, micro_batches
    kind = PreferenceBatches.__new__(PreferenceBatches)  # only the cost: no trainer needed
    kind.max_length = 64
    pair = {"prompt_ids": [1] * 10, "chosen_ids": [2] * 20, "rejected_ids": [3] * 5}
    costs = [kind.padded_cost(pair)] * 2
    assert costs == [60, 60] and micro_batches(costs, per_micro=2, token_budget=100, packed=False) == [[0], [1]]


# --- DP, resume settings, the run folder -------------------------------------------------------------------------

def test_dp_max_grad_norm_is_the_clip_of_clip_mode():
    from federated.privacy import make_privacy
    fed_args = FedArguments(num_clients=4, sample_clients=2, dp_noise_multiplier=0.0, dp_max_grad_norm=0.3)
    privacy = make_privacy(fed_args, SimpleNamespace(learning_rate=2e-5, seed=SEED), [10] * 4)
    x = torch.zeros(4)
    mean, _ = privacy.privatize(x, torch.tensor([[3.0, 4.0, 0.0, 0.0]]), [10], 0, [0])
    assert torch.allclose(mean[0], torch.tensor([0.18, 0.24, 0.0, 0.0]))  # norm 5 clipped to 0.3, no noise


def different(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    return "other" if value is None else f"{value}-other"


def test_resume_refuses_every_run_defining_setting_changed(tmp_path):
    """Table-driven over every flag of both entry dataclasses: each one that defines the run is refused by name
    on --resume, each one documented as resumable is accepted."""
    from federated.run_dir import RESUMABLE_CHANGES, prepare_run_dir, settings_of
    saved = settings_of(ScriptArguments(), FedArguments())
    prepare_run_dir(tmp_path, saved, resume=False, overwrite=False)
    defining = [key for key in saved if key not in RESUMABLE_CHANGES]
    assert {"learning_rate", "fed_alg", "lora_method", "seed", "seq_length", "dp_clip", "template"} <= set(defining)
    for key in defining:
        with pytest.raises(SystemExit, match=f"{key}: "):
            prepare_run_dir(tmp_path, {**saved, key: different(saved[key])}, resume=True, overwrite=False)
    for key in RESUMABLE_CHANGES.keys() & saved.keys():
        prepare_run_dir(tmp_path, {**saved, key: different(saved[key])}, resume=True, overwrite=False)
        prepare_run_dir(tmp_path, saved, resume=True, overwrite=False)


def test_overwrite_output_dir_removes_the_earlier_runs_evaluation_files(tmp_path):
    from federated.run_dir import prepare_run_dir
    (tmp_path / "checkpoint-3").mkdir()
    written = ["args.json", "metrics.jsonl", "training_loss.npy", "eval_exact_match.json", "eval_personal.json",
               "eval_preference.json"]  # what main_sft.py and main_dpo.py write into their folder
    for name in written:
        (tmp_path / name).write_text("{}")
    prepare_run_dir(tmp_path, {"fed_alg": "fedavg"}, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".run.lock") == ["args.json"]
    assert json.loads((tmp_path / "args.json").read_text()) == {"fed_alg": "fedavg"}


def test_the_latest_checkpoint_is_the_highest_round_past_ten(tmp_path):
    from federated.checkpoint import latest_good_checkpoint, save_checkpoint
    from test_run_dir import AdapterStub, a_run
    for r in (2, 9, 10, 11):
        save_checkpoint(tmp_path, a_run(r), AdapterStub())
    path, state = latest_good_checkpoint(tmp_path)
    assert path.name == "checkpoint-11" and state.round == 11


# --- reproduction tables -----------------------------------------------------------------------------------------

def test_the_two_random_local_clients_differ_for_every_seed():
    from reproduce.plan import LocalChoice
    from reproduce.steps import pick_client
    clients = tuple((f"c{i}", 10, None) for i in range(5))
    for seed in range(300):
        first, _ = pick_client(LocalChoice("random", 0, count=2, seed=seed), clients)
        second, _ = pick_client(LocalChoice("random", 1, count=2, seed=seed), clients)
        assert first != second, seed


def test_an_average_with_a_missing_column_stays_empty():
    from reproduce.plan import Cell
    from reproduce.tables import Values
    values = Values(ctx=None, plan=None)
    assert values.cell(Cell(mean_of=["A", "B", "C"]), {"A": 4.0, "B": None, "C": 6.0}) is None
    assert values.cell(Cell(mean_of=["A", "C"]), {"A": 4.0, "B": None, "C": 6.0}) == 5.0


def test_a_row_whose_runs_were_done_in_an_earlier_call_is_done():
    from reproduce.tables import row_status
    assert row_status({"a", "b"}, {"train a": "done earlier", "train b": "ran"}) == "done"
    assert row_status({"a", "b"}, {"train a": "done earlier", "train b": "failed (exit 1)"}) == "failed (exit 1)"


# --- judge and benchmark scorers ---------------------------------------------------------------------------------

def test_the_lenient_parser_accepts_the_maximum_rating():
    from evaluation.judge import parse_score_lenient
    assert parse_score_lenient("Rating: 10") == 10.0 and parse_score_lenient("I rate it 10/10.") == 10.0
    assert parse_score_lenient("Rating: 11") == -1


def test_a_boolean_json_rating_is_refused():
    from evaluation.judge import parse_score, parse_structured
    assert parse_structured('{"explanation": "fine", "rating": true}', parse_score) == -1
    assert parse_structured('{"explanation": "fine", "rating": 1}', parse_score) == 1.0


@needs_eval_data
def test_the_judge_model_id_is_matched_exactly_in_the_servers_list(tmp_path, caplog, monkeypatch):
    """--judge_model judge-x against a server listing only judge-x-large: a different model, so refused; with
    --judge_allow_unlisted it judges, and the judgments record that the name was not listed."""
    from evaluation.judge import read_judgments
    from test_eval_judge import BENCHMARKS, EVAL_DATA, ScriptedServer, judge_cli, rating_reply, write_answers
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")  # a local server: any key
    write_answers(tmp_path, "vicuna", "m1", BENCHMARKS["vicuna"].load(EVAL_DATA)[:1])
    with ScriptedServer(rating_reply, served_model="judge-x-large") as server:
        with pytest.raises(SystemExit, match="does not list --judge_model 'judge-x'"):
            judge_cli(tmp_path, server.url, ["vicuna"])
        judge_cli(tmp_path, server.url, ["vicuna"], "--judge_allow_unlisted")
    rows = [row for path in (tmp_path / "vicuna" / "judgments").glob("m1__*.jsonl") for row in read_judgments(path)]
    assert [row["judge_model_listed"] for row in rows] == [False]


def test_stratified_subsets_spread_the_extra_questions_over_the_strata():
    """3 strata of 10 and a limit of 4: one stratum gets a second question, which one depends on the seed, and
    over many seeds each stratum gets it; never two extra in one stratum."""
    from evaluation.subsets import stratified_subset
    entries = [(s, i) for s in "abc" for i in range(10)]
    got_extra = []
    for seed in range(60):
        chosen = stratified_subset(entries, 4, seed=seed, stratum=lambda e: e[0])
        counts = {s: sum(e[0] == s for e in chosen) for s in "abc"}
        assert sorted(counts.values()) == [1, 1, 2]
        got_extra.append(max(counts, key=counts.get))
    assert all(got_extra.count(s) >= 10 for s in "abc")


def test_humaneval_keeps_a_functions_decorators():
    from evaluation.humaneval import extract_code
    answer = ("Here you go:\n```python\nimport functools\n\n\n@functools.lru_cache(maxsize=None)\n"
              "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n```\n")
    code = extract_code(answer, "fib")
    assert "@functools.lru_cache(maxsize=None)\ndef fib(n):" in code
    namespace = {}
    exec(code, namespace)
    assert namespace["fib"](30) == 832040 and namespace["fib"].cache_info().hits > 0


def test_mmlu_reads_the_letter_the_answer_starts_with():
    from evaluation.mmlu import is_correct
    assert is_correct("A B", "A") and not is_correct("A B", "B")
    assert not is_correct(" (B", "B")  # InstructEval's rule: the continuation must start with the letter


# --- Flower messages and secure aggregation ----------------------------------------------------------------------

def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


def test_flower_messages_carry_fp32_vectors_bit_for_bit_through_serialisation():
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    from federated.loop import ClientTask
    from flower_app.messages import read_result, read_task, result_content, task_content

    def wire(content):
        return recorddict_from_proto(recorddict_to_proto(content))

    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(1000, generator=generator), torch.tensor([-0.0, 1e-45, 3.4e38, -1.17e-38])])
    task = ClientTask(3, 2, 1e-4, 5, 10, None, 12345)
    read, num_clients, x_read, server, kept = read_task(wire(task_content(
        task, 8, x, {"c": x * 3}, {"c": x / 7}, ("c",))), "cpu")
    assert read == task and num_clients == 8
    assert torch.equal(bits(x_read), bits(x)) and torch.equal(bits(server["c"]), bits(x * 3))
    assert torch.equal(bits(kept["c"]), bits(x / 7))
    result = ClientResult(3, x * 1.5, {"control_delta": -x}, {"c": x + 1}, 0.25, 5, 1.5)
    back = read_result(wire(result_content(result)), "cpu")
    assert torch.equal(bits(back.vector), bits(x * 1.5)) and torch.equal(bits(back.uploads["control_delta"]), bits(-x))
    assert torch.equal(bits(back.state["c"]), bits(x + 1)) and (back.loss, back.steps) == (0.25, 5)


def test_min_replies_is_capped_at_the_clients_sampled():
    from flower_app.server_app import gather
    from test_flower import Nodes, tasks
    exchange = gather(tasks(0, 1), Nodes(), min_replies=5, retries=0, round_number=1)
    assert sorted(exchange.results) == [0, 1]


def test_secure_aggregation_weights_clients_by_samples_or_uniformly():
    from flower_app.secure import client_weights
    by_samples = SimpleNamespace(privacy=None, algorithm=SimpleNamespace(weighting="samples"), sample_counts=[3, 5])
    assert client_weights(by_samples) == [3, 5]
    assert client_weights(SimpleNamespace(**{**vars(by_samples), "privacy": object()})) == [1, 1]
    assert client_weights(SimpleNamespace(**{**vars(by_samples), "algorithm": SimpleNamespace(
        weighting="uniform")})) == [1, 1]


def test_a_secure_client_clips_its_own_delta_under_clip_mode_dp():
    from flower_app.secure import secure_update
    x = torch.zeros(4)
    result = ClientResult(0, torch.tensor([3.0, 4.0, 0.0, 0.0]), {}, {}, 1.0, 1)
    clipped, report = secure_update(result, x, FedArguments(dp_clip=0.5, dp_noise_multiplier=1.0), 1.0)
    assert clipped.tolist() == pytest.approx([0.3, 0.4, 0.0, 0.0]) and report == {"out_of_range": 0}
    plain, report = secure_update(result, x, FedArguments(), 1.0)
    assert plain.tolist() == [3.0, 4.0, 0.0, 0.0] and report == {"out_of_range": 2}
    withdrawn, _ = secure_update(ClientResult(1, None, {}, {}, float("nan"), 1), x, FedArguments(), 1.0)
    assert withdrawn.tolist() == [0.0] * 4
