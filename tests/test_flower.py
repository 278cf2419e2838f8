"""The Flower app (flower_app/): its configuration, its failure rules, and end to end on real Flower processes:
the Simulation Engine gives main_sft.py's adapter bit for bit (FedAvg, SCAFFOLD), and a real deployment on
loopback (one SuperLink, two SuperNodes) finishes, also when a SuperNode is killed mid-run."""
import json
import time
from dataclasses import fields
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_entry
from federated.loop import ClientResult, ClientTask
from flower_app.config import FlowerArguments, default_run_config, key_of, parse_node_config, parse_run_config
from flower_app.messages import Exchange
from flower_app.server_app import NotEnoughReplies, clients_of, gather

# One thread per process on the shared cores; Ray's out-of-memory killer off (it counts other jobs' memory on
# this machine against ours and kills a 0.4 GB client actor).
QUIET_RAY = {"OMP_NUM_THREADS": "1", "RAY_memory_monitor_refresh_ms": "0"}
TINY_RUN = {"synthetic-num-clients": 4, "synthetic-mean-samples": 16, "sample-clients": 2, "num-rounds": 2,
            "max-steps": 2, "batch-size": 2, "seq-length": 64, "learning-rate": 1e-3, "eval-after": False}


def flags(run_config: dict) -> list[str]:
    """The main_sft.py command line of a run config (the networked run's own keys left out)."""
    networked = {key_of(f.name) for f in fields(FlowerArguments)}
    return [item for key, value in run_config.items() if key not in networked
            for item in (f"--{key.replace('-', '_')}", str(value).lower() if isinstance(value, bool) else value)]


# --- configuration -------------------------------------------------------------------------------------------

def test_pyproject_lists_every_flag_with_its_default():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["flwr"]["app"]["config"] == default_run_config()
    assert config["tool"]["flwr"]["app"]["components"] == {"serverapp": "flower_app.server_app:app",
                                                           "clientapp": "flower_app.client_app:app"}


def test_run_config_maps_onto_the_entry_scripts_dataclasses():
    settings = parse_run_config({**default_run_config(), "fed-alg": "scaffold", "num-rounds": 7, "dp-sigma": "",
                                 "learning-rate": 0.5, "min-replies": 2})
    assert settings.fed_args.fed_alg == "scaffold" and settings.fed_args.num_rounds == 7
    assert settings.fed_args.dp_sigma is None and settings.script_args.learning_rate == 0.5
    assert settings.flower.min_replies == 2 and settings.dpo_args is None
    assert settings.script_args.dataset == "fed-synthetic"
    dpo = parse_run_config({**default_run_config(), "task": "dpo", "dpo-beta": 0.2})
    assert dpo.script_args.dataset == "fed-synthetic-pref" and dpo.dpo_args.dpo_beta == 0.2


@pytest.mark.parametrize("run_config, message", [
    ({"fed_alg": "fedavg"}, "Unknown run-config key 'fed_alg'"),
    ({"fed-alg": "fedsgd"}, "Unknown --fed_alg 'fedsgd'"),
    ({"num-rounds": 0}, "--num_rounds 0 is invalid"),
    ({"task": "rlhf"}, "Run-config task 'rlhf' is invalid"),
    ({"min-replies": 0}, "min-replies 0 is invalid"),
    ({"client-groups": "same_language"}, "does not"),
    ({"lora-method": "exact"}, "not supported by the Flower app yet: its residual is folded"),
])
def test_bad_run_config_is_one_clear_line(run_config, message):
    with pytest.raises(SystemExit, match=message):
        parse_run_config(run_config)


def test_node_config():
    assert parse_node_config({"partition-id": 3, "num-partitions": 4}).partition_id == 3
    assert parse_node_config({"partition-id": 0, "data-file": "/silo/a.json"}).data_file == "/silo/a.json"
    with pytest.raises(SystemExit, match="partition-id"):
        parse_node_config({"num-partitions": 4})
    with pytest.raises(SystemExit, match="Unknown node-config"):
        parse_node_config({"partition-id": 0, "datafile": "x"})


def test_clients_are_complete_only_when_every_partition_has_a_node():
    answers = {11: {"partition_id": 0, "num_samples": 5, "num_partitions": 3},
               12: {"partition_id": 2, "num_samples": 0, "num_partitions": 3}}  # partition 2: no data this run
    assert clients_of(answers, None) is None  # partition 1 has not answered yet
    answers[13] = {"partition_id": 1, "num_samples": 7, "num_partitions": 3}
    assert clients_of(answers, None) == {0: (11, 5), 1: (13, 7)}
    assert clients_of(answers, 1) == {0: (11, 5)}
    answers[14] = {"partition_id": 1, "num_samples": 7}
    with pytest.raises(SystemExit, match="both hold partition 1"):
        clients_of(answers, None)


def test_waiting_for_nodes_says_what_is_missing():
    from flower_app.server_app import waiting_for
    settings = parse_run_config({"num-clients": 30})
    assert "no SuperNode is connected" in waiting_for({}, [], settings)
    answers = {n: {"partition_id": n - 100, "num_samples": 3} for n in range(100, 105)}  # partitions 0 .. 4
    said = waiting_for(answers, list(range(100, 106)), settings)
    assert said.startswith("6 nodes connected, 5 answered; partitions 5, 6,") and "(25 in all)" in said


# --- scale: what a node and the server hold --------------------------------------------------------------------

def test_the_server_builds_the_initial_adapter_without_the_base_weights(tiny_model_dir, tmp_path):
    """layout_model gives load_lora_model's initial adapter bit for bit, for standard and ffa (A frozen), with
    no base weight in memory (meta tensors, or one-element stand-ins), and saves the same adapter file."""
    from federated.config import FedArguments, ScriptArguments
    from federated.flat import FlatParams
    from federated.setup import load_lora_model
    from flower_app.training import layout_model

    for method in ("standard", "ffa"):
        s, f = ScriptArguments(model_name_or_path=tiny_model_dir), FedArguments(lora_method=method)
        full, bare = load_lora_model(s, f), layout_model(s, f)
        assert FlatParams(bare).names == FlatParams(full).names
        assert torch.equal(FlatParams(bare).get(), FlatParams(full).get())
        base = [p for n, p in bare.named_parameters() if "lora_" not in n]
        assert base and all(p.is_meta or p.untyped_storage().nbytes() <= 4 for p in base)
    full.save_pretrained(tmp_path / "full")
    bare.save_pretrained(tmp_path / "bare")
    assert same_adapter(tmp_path / "bare", tmp_path / "full")


def test_a_worker_loads_the_dataset_once_and_keeps_few_tokenised_partitions(tiny_model_dir):
    from flower_app.config import NodeData
    from flower_app.training import TOKENISED_PER_WORKER, Worker

    settings = parse_run_config({**TINY_RUN, "synthetic-num-clients": 40, "model-name-or-path": tiny_model_dir})
    worker = Worker(settings)
    first = worker.client(1000, NodeData(0, 41, None))
    partitions = worker.partitions
    for node in range(1, 41):
        worker.client(1000 + node, NodeData(node, 41, None))
    assert worker.partitions is partitions  # loaded once for every node
    assert len(worker.clients) == TOKENISED_PER_WORKER and 1000 not in worker.clients
    assert worker.clients[1040] is None  # partition 40: past the dataset's 40 clients, no data
    again = worker.client(1000, NodeData(0, 41, None))  # tokenised again, the same samples
    assert again is not first and again.data["input_ids"] == first.data["input_ids"]


def test_a_node_worker_answers_the_messages_of_one_message_processes(tiny_model_dir):
    """A deployment's ClientApp process forwards to the node's warm worker: the first message starts it, the next
    ones reach the same process; its answer equals the one computed in process, and its failure (a bad run
    config) comes back as an error with the reason."""
    import os
    import secrets
    import signal

    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from flower_app.client_app import answer_query
    from flower_app.worker_link import call, folder

    node_id = secrets.randbits(62)  # not the seeded `random`: a node id of its own, in every run
    run_config = {**TINY_RUN, "model-name-or-path": tiny_model_dir}
    node_config = {"partition-id": 1, "num-partitions": 4}
    log = folder() / f"node-{node_id}.log"
    assert not log.exists()
    try:
        answers = [call("query", b"", 7, node_id, node_config, run_config, supernode_pid=os.getpid())
                   for _ in range(2)]
        with pytest.raises(RuntimeError, match="Unknown run-config key 'fed_alg'"):
            call("query", b"", 8, node_id, node_config, {"fed_alg": "fedavg"}, supernode_pid=os.getpid())
    finally:
        started = [int(line.split()[2]) for line in log.read_text().splitlines() if "listening on" in line]
        for pid in started:
            os.kill(pid, signal.SIGTERM)
    assert len(started) == 1  # one worker served all three
    from flwr.app import Context, RecordDict
    expected = answer_query(Context(7, node_id, node_config, RecordDict(), run_config))
    for answer in answers:
        assert dict(recorddict_from_proto(ProtoRecordDict.FromString(answer))["node"]) == dict(expected["node"])
    assert dict(expected["node"])["partition_id"] == 1 and dict(expected["node"])["num_samples"] > 0


def test_a_result_and_its_costs_cross_the_network_unchanged():
    """A client's result through the bytes Flower sends (plain, and in SecAgg+'s FitRes layout, where only the
    scalars travel): the same vector, state, loss, steps, time and own costs, ints staying ints."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.compat.common import recorddict_compat

    from flower_app.messages import read_result, read_secure_result, result_content, secure_reply

    costs = {"cog_generation_s": 0.125, "cog_generated": 3, "cog_kept_kl_sum": 0.75, "cog_kept_kl_count": 2}
    sent = ClientResult(5, torch.arange(4.0), {}, {"cog_local": torch.ones(4)}, 1.5, 2, 0.25, costs)
    received = read_result(recorddict_from_proto(recorddict_to_proto(result_content(sent))), "cpu")
    assert (received.client, received.loss, received.steps, received.train_time) == (5, 1.5, 2, 0.25)
    assert torch.equal(received.vector, sent.vector) and torch.equal(received.state["cog_local"], torch.ones(4))
    assert received.metrics == costs and isinstance(received.metrics["cog_generated"], int)
    reply = secure_reply(sent, np.zeros(4), 1, {"out_of_range": 0})
    fitres = recorddict_compat.recorddict_to_fitres(recorddict_from_proto(recorddict_to_proto(reply)),
                                                    keep_input=False)
    assert read_secure_result(fitres).metrics == costs


# --- failures and the minimum of replies ---------------------------------------------------------------------

def tasks(*clients):
    return [ClientTask(k, 0, 0.1, 1, 2, None, k) for k in clients]


class Nodes:
    """Answers for the clients that are up; `down` clients fail, `flaky` ones fail on their first attempt."""

    def __init__(self, down=(), flaky=()):
        self.down, self.flaky, self.calls = set(down), set(flaky), []

    def __call__(self, pending):
        self.calls.append([t.client for t in pending])
        exchange = Exchange(downloaded=10 * len(pending))
        for task in pending:
            if task.client in self.down or (task.client in self.flaky and len(self.calls) == 1):
                exchange.failed[task.client] = "node is disconnected"
            else:
                exchange.results[task.client] = ClientResult(task.client, None, {}, {}, 1.0, 1)
                exchange.uploaded += 10
        return exchange


def test_a_failed_client_is_dropped_when_enough_answered():
    nodes = Nodes(down={2})
    exchange = gather(tasks(0, 1, 2), nodes, min_replies=2, retries=3, round_number=1)
    assert sorted(exchange.results) == [0, 1] and list(exchange.failed) == [2]
    assert nodes.calls == [[0, 1, 2]]  # enough replies: no retry
    assert (exchange.uploaded, exchange.downloaded) == (20, 30)


def test_too_few_replies_are_retried_then_the_round_stops():
    flaky = Nodes(flaky={1, 2})
    exchange = gather(tasks(0, 1, 2), flaky, min_replies=3, retries=1, round_number=1)
    assert flaky.calls == [[0, 1, 2], [1, 2]] and sorted(exchange.results) == [0, 1, 2] and not exchange.failed
    down = Nodes(down={1, 2})
    with pytest.raises(NotEnoughReplies, match=r"Round 4: 1 of 3 sampled clients answered, fewer than min-replies 2"):
        gather(tasks(0, 1, 2), down, min_replies=2, retries=2, round_number=4)
    assert down.calls == [[0, 1, 2], [1, 2], [1, 2]]


def test_an_empty_round_is_never_aggregated():
    with pytest.raises(NotEnoughReplies, match="0 of 2"):
        gather(tasks(0, 1), Nodes(down={0, 1}), min_replies=1, retries=0, round_number=1)


# --- end to end on Flower processes --------------------------------------------------------------------------

def adapter(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(folder / "adapter_model.safetensors")


def wait(process, name: str, log_dir: Path) -> None:
    rc = process.wait(timeout=process.timeout)
    assert rc == 0, f"{name} exited with {rc}: {(log_dir / (name + '.log')).read_text()[-3000:]}"


def in_process_reference(config: dict, out: Path, **changes) -> Path:
    import main_sft
    run_entry(main_sft, flags({**config, **changes, "output-dir": out}))
    return out


def same_adapter(ours: Path, theirs: Path) -> bool:
    a, b = adapter(ours), adapter(theirs)
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


FEDCOG = {"fedcog": True, "cog-num-generate": 3, "cog-num-keep": 2, "cog-max-new-tokens": 4}


@pytest.mark.slow
@pytest.mark.parametrize("fed_alg, lora_method, extra", [("scaffold", "standard", FEDCOG),
                                                         ("fedprox", "personal", {})],
                         ids=["scaffold-fedcog", "fedprox-personal"])
def test_simulation_gives_main_sft_adapter_bit_for_bit(tiny_model_dir, tmp_path, one_thread, fed_alg, lora_method,
                                                       extra):
    """2 rounds, 4 simulated nodes of which 2 train at once, against main_sft.py: SCAFFOLD composed with FedCOG
    (client state and extra uploads: c_i and FedCOG's kept model travel together with the task; each node
    generates from its own instructions; client 1, sampled in both rounds, gets its round-1 model back for round
    2's selection; the costs travel with the results; FedAvg's bit-identity is checked over a real deployment
    below), and personalised adapters (each client's own B travels with its task and comes back as kept state, as
    SCAFFOLD's c_i)."""
    from flower_app.launch import LocalFlower

    config = {**TINY_RUN, "fed-alg": fed_alg, "lora-method": lora_method, "model-name-or-path": tiny_model_dir,
              "output-dir": str(tmp_path / "flower"), **extra}
    with LocalFlower(tmp_path / "home", simulation=True, env=QUIET_RAY) as flower:
        process = flower.run(config, num_supernodes=4, client_cpus=1)
        reference = in_process_reference(config, tmp_path / "inprocess")  # meanwhile
        wait(process, "run", tmp_path / "home")
    ours = tmp_path / "flower"
    assert same_adapter(ours / "checkpoint-2", reference / "checkpoint-2")
    rows = [json.loads(line) for line in (ours / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    for row, ref in zip(rows, expected, strict=True):
        assert (row["clients"], row["client_loss"], row["failed_clients"]) == (ref["clients"], ref["client_loss"], [])
        # Really sent: x, y (and SCAFFOLD's control delta), plus the state the server keeps for the client (c_i,
        # or the personal B) both ways (docs/FLOWER.md); in process only the vectors are counted.
        assert row["bytes_uploaded"] > ref["bytes_uploaded"] * 1.5
        if extra:  # FedCOG's costs: the same generations kept with the same KL; times differ
            cog = ("cog_generated", "cog_kept_kl_count", "cog_kept_kl_sum", "cog_kept_kl_mean")
            assert [row[k] for k in cog] == [ref[k] for k in cog] and row["cog_generation_s"] > 0
    if extra:
        assert rows[1]["cog_kept_kl_sum"] > 0  # round 2 selected with client 1's own model from round 1
    assert json.loads((ours / "args.json").read_text()) == {
        **json.loads((reference / "args.json").read_text()), "output_dir": str(ours)}
    if lora_method == "personal":  # every client's own B kept by the server, equal to the in-process run's
        from federated.checkpoint import latest_good_checkpoint
        mine, theirs = latest_good_checkpoint(ours)[1].client_store, latest_good_checkpoint(reference)[1].client_store
        assert mine.keys() == theirs.keys() and mine
        assert all(torch.equal(mine[k]["lora_B"], theirs[k]["lora_B"]) for k in mine)


@pytest.mark.slow
def test_deployment_on_loopback_survives_a_supernode_stopped_mid_run(tiny_model_dir, tmp_path, one_thread):
    """One SuperLink and two SuperNodes as separate processes, over TLS (a throw-away CA) with node authentication
    (a third SuperNode whose key is not registered claims partition 1 and is kept out), `flwr run` on this
    project, FedAvg for 2 rounds. Round 1 equals main_sft.py's bit for bit; then SuperNode 1 is stopped (SIGTERM
    to its pid) and round 2 aggregates client 0 alone, with client 1 logged as failed."""
    from flower_app.deploy import make_certificates
    from flower_app.launch import LocalFlower

    out = tmp_path / "flower"
    config = {**TINY_RUN, "fed-alg": "fedavg", "model-name-or-path": tiny_model_dir, "output-dir": str(out),
              "checkpoint-step": 1, "round-timeout": 300.0}
    certificates = make_certificates(tmp_path / "certificates", ["127.0.0.1", "localhost"])
    with LocalFlower(tmp_path / "home", simulation=False, env=QUIET_RAY, certificates=certificates,
                     node_auth=True) as flower:
        for k in range(2):
            flower.start_supernode(f"node{k}", {"partition-id": k, "num-partitions": 2})
        # Were it admitted, two nodes would hold partition 1 and the run would stop at the start.
        flower.start_supernode("intruder", {"partition-id": 1, "num-partitions": 2}, register=False)
        process = flower.run(config, timeout=400)
        reference = in_process_reference(config, tmp_path / "inprocess", **{"num-clients": 2})  # meanwhile
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and process.poll() is None:
            assert time.monotonic() < deadline, "round 1 did not finish"
            time.sleep(0.2)
        flower.processes["node1"].terminate()
        wait(process, "run", tmp_path / "home")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["failed_clients"] == [] and rows[0]["clients"] == [0, 1]
    assert rows[1]["failed_clients"] == [1] and list(rows[1]["client_loss"]) == ["0"]
    assert rows[1]["bytes_uploaded"] * 2 == rows[0]["bytes_uploaded"]  # one reply instead of two
    assert same_adapter(out / "checkpoint-1", reference / "checkpoint-1")
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file() and (out / "args.json").is_file()
    assert "https://127.0.0.1" in (tmp_path / "home" / "superlink.log").read_text()  # TLS on every link
    assert "Connection attempt failed" in (tmp_path / "home" / "intruder.log").read_text()
    losses = np.load(out / "training_loss.npy")
    assert losses.shape == (2, 2) and losses[1, 1] == -1.0 and losses[0, 1] > 0


# --- secure aggregation (SecAgg+) ----------------------------------------------------------------------------

@pytest.mark.parametrize("run_config, message", [
    ({"fed-alg": "scaffold"}, "SCAFFOLD's c_i is kept by the server"),
    ({"fed-alg": "feddp", "dp-epsilon": 1.0}, "DP paper mode noises every client's vector"),
    ({"dp-sigma": 0.1}, "DP paper mode"),
    ({"drop-outliers": True}, "drop-outliers compares each client's update norm"),
    ({"lora-method": "personal"}, "every client's own B"),
    ({"lora-method": "hetero_rank", "client-ranks": "2,4"}, "the SVD of the mean"),
    ({"fed-alg": "local0"}, "trains one client alone"),
    ({"sample-clients": 1}, "sample >= 2"),
    ({"secagg-quantization-range": 2 ** 30}, "the masked sum overflows"),
    ({"secagg-clipping-range": 0.0}, "secagg-clipping-range 0.0 is invalid"),
    ({"secagg-num-shares": 2.5}, "above 1 it is a count"),
    ({"secagg-num-shares": 5, "secagg-reconstruction-threshold": 5}, "must be less than `num_shares`"),
])
def test_secure_aggregation_refuses_what_it_cannot_serve(run_config, message):
    with pytest.raises(SystemExit, match=message) as refused:
        parse_run_config({"secagg": True, "sample-clients": 5, **run_config})
    assert "\n" not in str(refused.value)


def test_secure_aggregation_serves_the_fedavg_family():
    for run_config in ({"fed-alg": "fedavg"}, {"fed-alg": "fedprox"}, {"fed-alg": "fedadam"},
                       {"fed-alg": "fedavgm", "lora-method": "ffa"}, {"fed-alg": "fedyogi", "dp-clip": 0.5,
                                                                      "dp-noise-multiplier": 1.0}):
        settings = parse_run_config({"secagg": True, "sample-clients": 3, **run_config})
        assert settings.flower.secagg and settings.flower.secagg_quantization_range == 2 ** 22


def test_secure_error_bound_is_one_quantization_level_for_equal_weights():
    from flower_app.secure import error_bound
    assert error_bound([1, 1, 1], 1.0, 1.0, 2 ** 22) == pytest.approx(2 / 2 ** 22)
    # Sample weights: each client's rounding error is relative to its share of the largest weight.
    assert error_bound([10, 5], 10.0, 1.0, 2 ** 22) == pytest.approx(2 * 2 / (1.5 * 2 ** 22), rel=1e-6)


def test_a_client_clips_its_own_delta_as_the_server_would():
    from federated.privacy import clip_delta
    x, y = torch.zeros(4), torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert torch.allclose(clip_delta(x, y, 1.0), torch.tensor([0.6, 0.8, 0.0, 0.0]))
    assert torch.equal(clip_delta(x, y, 10.0), y)


def test_clip_mode_dp_on_a_securely_summed_mean_is_the_same_mechanism():
    """Clients clip their own deltas, the server noises their uniform mean: the in-process result (server clips
    each vector, same seed and round: the same noise), and the same privacy accounting."""
    from federated.privacy import ClippedDP, clip_delta
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=generator)
    vectors = x + torch.randn(3, 1000, generator=generator) * torch.tensor([[0.01], [0.1], [1.0]])
    in_process, secure = (ClippedDP(0.5, 1.2, 0.5, 1e-5, seed=7) for _ in range(2))
    expected, _ = in_process.privatize(x, vectors, [5, 9, 2], 3, [0, 1, 2])
    mean = x + torch.stack([clip_delta(x, y, 0.5) for y in vectors]).mean(0)
    assert torch.allclose(secure.noise_mean(x, mean, 3, 3), expected[0], atol=1e-6)
    assert secure.epsilon() == in_process.epsilon()


@pytest.mark.slow
def test_secure_aggregation_in_simulation_matches_the_in_process_run(tiny_model_dir, tmp_path, one_thread):
    """FedAvg, 3 simulated nodes, all 3 sampled, 2 rounds, through SecAgg+, against main_sft.py: every round's
    global adapter is within the quantization bound the run logs of the plain aggregate of the same training
    (round 2 against main_sft.py resumed from the secure round 1, so that both start round 2 from the same
    vector), and metrics.jsonl has the rows of the plain run plus the bound.

    FedCOG runs along with a distillation weight of 0 and no dropout (generation and selection run, training is
    untouched): under SecAgg+ the server never holds a client's kept model, so each node keeps it in its
    Context.state. Every client trains in round 1, so in round 2 every client selects by KL against its own
    round-1 model: a KL sum of exactly 0 would mean a node lost its state (a client with none keeps KL 0)."""
    import shutil

    from flower_app.launch import LocalFlower

    # No LoRA dropout: its random masks follow the shapes of the kept generations, which round 2 of the resumed
    # main_sft.py (no FedCOG state: none is on the secure run's server) selects differently.
    config = {**TINY_RUN, **FEDCOG, "cog-kd-weight": 0.0, "peft-lora-dropout": 0.0, "synthetic-num-clients": 3,
              "sample-clients": 3, "fed-alg": "fedavg", "model-name-or-path": tiny_model_dir, "checkpoint-step": 1,
              "output-dir": str(tmp_path / "flower")}
    with LocalFlower(tmp_path / "home", simulation=True, env=QUIET_RAY) as flower:
        process = flower.run({**config, "secagg": True}, num_supernodes=3, client_cpus=1)
        reference = in_process_reference(config, tmp_path / "inprocess")  # meanwhile
        wait(process, "run", tmp_path / "home")
    ours = tmp_path / "flower"
    resumed = tmp_path / "resumed"  # main_sft.py's round 2 from the secure checkpoint-1
    resumed.mkdir()
    shutil.copytree(ours / "checkpoint-1", resumed / "checkpoint-1")
    for name in ("args.json", "metrics.jsonl"):
        shutil.copy(ours / name, resumed / name)
    in_process_reference(config, resumed, resume=True)

    rows = [json.loads(line) for line in (ours / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    for round_number, plain in ((1, reference), (2, resumed)):
        mine, theirs = adapter(ours / f"checkpoint-{round_number}"), adapter(plain / f"checkpoint-{round_number}")
        difference = max(float((mine[k] - theirs[k]).abs().max()) for k in theirs)
        scale = max(float(v.abs().max()) for v in theirs.values())
        bound = rows[round_number - 1]["secagg_error_bound"]
        print(f"round {round_number}: max |secure - plain| = {difference:.3g}, bound {bound:.3g}")
        assert 0 < difference <= bound + 4 * scale * torch.finfo(torch.float32).eps  # + fp32 rounding of x + mean
    final = max(float((adapter(ours / "checkpoint-2")[k] - adapter(reference / "checkpoint-2")[k]).abs().max())
                for k in adapter(reference / "checkpoint-2"))
    print(f"final adapter against main_sft.py's uninterrupted run: max difference {final:.3g}")
    for row, ref in zip(rows, expected, strict=True):
        assert set(row) == set(ref) | {"secure_aggregation", "secagg_error_bound", "secagg_out_of_range"}
        assert (row["clients"], row["failed_clients"], row["secagg_out_of_range"]) == (ref["clients"], [], 0)
    assert rows[0]["client_loss"] == expected[0]["client_loss"]  # the same training from the same x
    for row, ref in zip(rows, expected):  # FedCOG: the same generations and selections, the state on the nodes
        assert (row["cog_generated"], row["cog_kept_kl_count"]) == (ref["cog_generated"], ref["cog_kept_kl_count"])
    assert rows[0]["cog_kept_kl_sum"] == expected[0]["cog_kept_kl_sum"] == 0.0
    assert rows[1]["cog_kept_kl_sum"] > 0 and expected[1]["cog_kept_kl_sum"] > 0
    assert rows[0]["bytes_uploaded"] > 2 * expected[0]["bytes_uploaded"]  # int64 masked vectors, keys, shares
    assert np.load(ours / "training_loss.npy").shape == (3, 2)
