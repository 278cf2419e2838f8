"""The Flower app (flower_app/): its configuration, its failure rules, and end to end on real Flower processes:
the Simulation Engine gives main_sft.py's adapter bit for bit (FedAvg, SCAFFOLD), and a real deployment on
loopback (one SuperLink, two SuperNodes) finishes, also when a SuperNode is killed mid-run."""
import json
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, run_entry
from federated.loop import ClientResult, ClientTask
from flower_app.config import default_run_config, parse_node_config, parse_run_config
from flower_app.server_app import Exchange, NotEnoughReplies, clients_of, gather

# One thread per process on the shared cores; Ray's out-of-memory killer off (it counts other jobs' memory on
# this machine against ours and kills a 0.4 GB client actor).
QUIET_RAY = {"OMP_NUM_THREADS": "1", "RAY_memory_monitor_refresh_ms": "0"}
TINY_RUN = {"synthetic-num-clients": 4, "synthetic-mean-samples": 16, "sample-clients": 2, "num-rounds": 2,
            "max-steps": 2, "batch-size": 2, "seq-length": 64, "learning-rate": 1e-3, "eval-after": False}


def flags(run_config: dict) -> list[str]:
    """The main_sft.py command line of a run config."""
    return [item for key, value in run_config.items()
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


@pytest.mark.slow
def test_simulation_gives_main_sft_adapter_bit_for_bit(tiny_model_dir, tmp_path, one_thread):
    """FedAvg and SCAFFOLD, 2 rounds, 4 simulated nodes with 2 training at once, against main_sft.py."""
    import main_sft
    from flower_app.launch import LocalFlower

    runs = {method: {**TINY_RUN, "fed-alg": method, "model-name-or-path": tiny_model_dir,
                     "output-dir": str(tmp_path / f"flower-{method}")} for method in ("fedavg", "scaffold")}
    with LocalFlower(tmp_path / "home", simulation=True, env=QUIET_RAY) as flower:
        processes = {m: flower.run(config, name=f"run-{m}", num_supernodes=4, client_cpus=1)
                     for m, config in runs.items()}
        for method, config in runs.items():
            run_entry(main_sft, flags({**config, "output-dir": tmp_path / f"inprocess-{method}"}))
        for method, process in processes.items():
            wait(process, f"run-{method}", tmp_path / "home")
    for method in runs:
        flower_dir, reference = tmp_path / f"flower-{method}", tmp_path / f"inprocess-{method}"
        ours, theirs = adapter(flower_dir / "checkpoint-2"), adapter(reference / "checkpoint-2")
        assert ours.keys() == theirs.keys()
        assert all((ours[k] == theirs[k]).all() for k in ours), method
        rows = [json.loads(line) for line in (flower_dir / "metrics.jsonl").read_text().splitlines()]
        expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
        for row, ref in zip(rows, expected, strict=True):
            assert (row["clients"], row["client_loss"], row["failed_clients"]) == (ref["clients"], ref["client_loss"], [])
            assert row["bytes_uploaded"] > ref["bytes_uploaded"] * (1.5 if method == "scaffold" else 1)
        assert json.loads((flower_dir / "args.json").read_text()) == {
            **json.loads((reference / "args.json").read_text()), "output_dir": str(flower_dir)}
