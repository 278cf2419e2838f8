"""The client-state store (federated/client_store.py) and what the round loop does with it at many clients: states on
disk, read only for the sampled clients, checkpoints that refer to them instead of copying them, resume bit for bit,
damaged files named; personal adapters' global B from a running sum; the loss table written in bounded chunks."""
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from federated.checkpoint import latest_good_checkpoint
from federated.client_store import ClientStateError, ClientStore
from federated.loop import write_loss_table
from test_loop_wiring import make, run


def personal_trainer(delta=lambda k, t, numel: torch.cos(torch.arange(float(numel)) * (k + 1) + t) / 10):
    """The stub trainer on the toy peft model: every coordinate, A and B, moves by a client's and round's delta."""
    from test_lora_methods import toy_model
    from test_loop_wiring import StubTrainer
    model = toy_model()
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stub = StubTrainer(model, lambda k, t: delta(k, t, numel))
    stub.model = model
    return stub


def states(store):
    return {k: {name: t.clone() for name, t in store[k].items()} for k in store}


def test_a_state_round_trips_and_a_restore_forgets_later_rounds(tmp_path):
    store = ClientStore.fresh(tmp_path)
    store.put(3, {"c": torch.arange(4.0)}, 1)
    store.put(5, {"c": torch.ones(2)}, 1)
    manifest = store.manifest()
    store.put(3, {"c": torch.zeros(4)}, 2)  # after the checkpoint: a round that will be redone
    store.put(7, {"c": torch.full((3,), 2.0)}, 2)
    assert torch.equal(store[3]["c"], torch.zeros(4)) and sorted(store) == [3, 5, 7]
    restored = ClientStore.restore(tmp_path, manifest)
    assert sorted(restored) == [3, 5] and torch.equal(restored[3]["c"], torch.arange(4.0))
    assert not (tmp_path / "3-r2.safetensors").exists() and not (tmp_path / "7-r2.safetensors").exists()
    assert len((tmp_path / "index.jsonl").read_text().splitlines()) == 2  # the later lines are cut off


@pytest.mark.parametrize("tail", [b'{"client": 5, "vers', b'{"clienT": 3, "version": 2}\n', b'\xff\xfe\n'],
                         ids=["torn", "damaged key", "not UTF-8"])
def test_a_torn_or_damaged_index_line_after_the_checkpoint_is_cut_off_with_its_round(tmp_path, tail):
    """A kill or a full disk while a later round appends to the index leaves a torn last line (or a damaged one):
    the checkpoint's lines are whole, so the restore keeps them and cuts the rest off, rather than refusing every
    checkpoint (which would start the run over from round 0)."""
    store = ClientStore.fresh(tmp_path)
    store.put(3, {"c": torch.arange(4.0)}, 1)
    manifest = store.manifest()
    store.put(3, {"c": torch.zeros(4)}, 2)
    with open(tmp_path / "index.jsonl", "ab") as f:
        f.write(tail)
    restored = ClientStore.restore(tmp_path, manifest)
    assert sorted(restored) == [3] and torch.equal(restored[3]["c"], torch.arange(4.0))
    assert not (tmp_path / "3-r2.safetensors").exists()
    assert (tmp_path / "index.jsonl").read_bytes().count(b"\n") == 1


def test_a_fresh_store_forgets_a_run_that_never_checkpointed(tmp_path):
    ClientStore.fresh(tmp_path).put(1, {"c": torch.ones(2)}, 1)  # a run killed before its first checkpoint
    store = ClientStore.fresh(tmp_path)
    store.put(2, {"c": torch.zeros(2)}, 1)
    restored = ClientStore.restore(tmp_path, store.manifest())  # the index holds this run's lines only
    assert sorted(restored) == [2] and sorted(p.name for p in tmp_path.iterdir()) == ["2-r1.safetensors",
                                                                                      "index.jsonl"]


def test_a_damaged_or_missing_state_is_named(tmp_path):
    store = ClientStore.fresh(tmp_path)
    store.put(4, {"c": torch.arange(1000.0)}, 1)
    path = tmp_path / "4-r1.safetensors"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01  # one bit of one value
    path.write_bytes(bytes(data))
    with pytest.raises(ClientStateError, match="4-r1.safetensors .*does not match the SHA-256"):
        store[4]
    manifest = store.manifest()
    path.write_bytes(bytes(data[:-4]))  # cut short (a full disk): the size says so without reading every state
    with pytest.raises(ClientStateError, match="4-r1.safetensors .*missing or has the wrong size"):
        ClientStore.restore(tmp_path, manifest)
    path.unlink()
    with pytest.raises(ClientStateError, match="4-r1.safetensors .*missing"):
        ClientStore.restore(tmp_path, manifest)
    with pytest.raises(ClientStateError, match="SHA-256"):
        ClientStore.restore(tmp_path, {**manifest, "sha256": "0" * 64})
    (tmp_path / "index.jsonl").unlink()
    with pytest.raises(ClientStateError, match="index.jsonl is missing; the checkpoint refers to its first 1 lines"):
        ClientStore.restore(tmp_path, manifest)


def test_prune_keeps_what_each_checkpoint_and_the_next_round_read(tmp_path):
    store = ClientStore.fresh(tmp_path)
    for version in (1, 2, 3, 5):
        store.put(0, {"c": torch.full((2,), float(version))}, version)
    store.prune([2, 4])  # checkpoint-2 reads version 2, checkpoint-4 version 3, the next round version 5
    kept = sorted(p.name for p in tmp_path.glob("0-r*.safetensors"))
    assert kept == ["0-r2.safetensors", "0-r3.safetensors", "0-r5.safetensors"]


def test_scaffold_at_many_clients_keeps_states_on_disk_and_resumes_bit_identically(tmp_path):
    """60 clients, 3 sampled per round, 6 rounds, a checkpoint every 2: the checkpoint holds no client state, the
    store holds every sampled client's c_i, and a run stopped after round 2 ends equal to the uninterrupted one."""
    delta = lambda k, t: torch.sin(torch.arange(4.0) * (k + 1) + t)  # noqa: E731
    flags = dict(fed_alg="scaffold", num_rounds=6, sample_clients=3, checkpoint_step=2)
    full = run(tmp_path / "full", make(delta), sizes=[4 + k % 5 for k in range(60)], **flags)
    seen = {k for line in (tmp_path / "full/metrics.jsonl").read_text().splitlines() for k in json.loads(line)["clients"]}
    assert sorted(full.client_store) == sorted(seen) and len(seen) > 10
    checkpoint = load_file(tmp_path / "full/checkpoint-6/run_state.safetensors")
    assert not [k for k in checkpoint if k.startswith("client/")]  # referred to, not copied
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    for later in ("checkpoint-4", "checkpoint-6"):
        shutil.rmtree(tmp_path / "resumed" / later)
    resumed = run(tmp_path / "resumed", make(delta), sizes=[4 + k % 5 for k in range(60)], resume=True, **flags)
    assert torch.equal(full.x, resumed.x) and torch.equal(full.server_state["c"], resumed.server_state["c"])
    a, b = states(full.client_store), states(resumed.client_store)
    assert a.keys() == b.keys() and all(torch.equal(a[k]["c"], b[k]["c"]) for k in a)
    assert np.array_equal(np.load(tmp_path / "full/training_loss.npy"), np.load(tmp_path / "resumed/training_loss.npy"))


def test_every_state_a_checkpoint_refers_to_is_on_disk_before_the_checkpoint(tmp_path, monkeypatch):
    """The state files are written without fsync during a round; the checkpoint that refers to them must make them
    durable (and the index) before it is renamed into place, or a power loss leaves it pointing at empty files."""
    synced, renamed = set(), {}
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd):
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    def rename(self, target):  # a checkpoint folder into place: which state files were durable by then
        states = (tmp_path / "client_state").glob("*")
        renamed[Path(target).name] = {p.name for p in states if p.stat().st_ino not in synced}
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    run(tmp_path, make(lambda k, t: torch.full((4,), 0.5)), sizes=[4] * 6, fed_alg="scaffold", num_rounds=4,
        sample_clients=2, checkpoint_step=2)
    assert renamed == {"checkpoint-2": set(), "checkpoint-4": set()}


def test_a_checkpoints_size_does_not_grow_with_the_clients(tmp_path):
    sizes = {}
    for clients in (6, 120):
        out = tmp_path / str(clients)
        run(out, make(lambda k, t: torch.full((4,), 0.1 * (k + 1))), sizes=[5] * clients, fed_alg="scaffold",
            num_rounds=8, sample_clients=3, checkpoint_step=8)
        sizes[clients] = (out / "checkpoint-8/run_state.safetensors").stat().st_size
    assert sizes[120] == sizes[6]


def test_resume_with_a_damaged_client_state_stops_with_its_name(tmp_path):
    flags = dict(fed_alg="scaffold", num_rounds=2, sample_clients=2, checkpoint_step=1)
    run(tmp_path, make(lambda k, t: torch.full((4,), 0.5)), sizes=[4, 4], **flags)
    shutil.rmtree(tmp_path / "checkpoint-2")
    damaged = sorted((tmp_path / "client_state").glob("*-r1.safetensors"))[0]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0x10
    damaged.write_bytes(bytes(data))
    with pytest.raises(ClientStateError, match=damaged.name + ".*remove the checkpoints of round 1 and later"):
        run(tmp_path, make(lambda k, t: torch.full((4,), 0.5)), sizes=[4, 4], resume=True, **flags)


def test_resume_when_no_checkpoint_can_be_used_stops_and_deletes_nothing(tmp_path):
    """Every checkpoint refers to index.jsonl, which is gone: the resume stops with the fix, and keeps the
    checkpoints, the state files and metrics.jsonl for a repair, instead of starting over from round 0."""
    flags = dict(fed_alg="scaffold", num_rounds=4, sample_clients=2, checkpoint_step=2)
    run(tmp_path, make(lambda k, t: torch.full((4,), 0.5)), sizes=[4, 4, 4], **flags)
    (tmp_path / "client_state/index.jsonl").unlink()
    kept = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit, match="none of the checkpoints in .* can be used.*--overwrite_output_dir true"):
        run(tmp_path, make(lambda k, t: torch.full((4,), 0.5)), sizes=[4, 4, 4], resume=True, **flags)
    assert sorted(p.name for p in tmp_path.rglob("*")) == kept
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_the_loss_table_in_chunks_equals_the_dense_one(tmp_path):
    round_losses = [{0: 0.5, 7: 1.5}, {3: -1.0, 7: 2.5}, {}, {9: 0.25}]
    write_loss_table(tmp_path / "loss.npy", round_losses, num_clients=10, rows_per_chunk=3)
    dense = np.full((10, 4), -1.0)
    for t, losses in enumerate(round_losses):
        for k, loss in losses.items():
            dense[k, t] = loss
    assert np.array_equal(np.load(tmp_path / "loss.npy"), dense)


def test_an_old_checkpoint_with_states_inside_still_resumes(tmp_path):
    """Checkpoints written before the store kept c_i inside run_state.safetensors and a dense loss table."""
    from safetensors.torch import save_file
    run(tmp_path, make(lambda k, t: torch.full((4,), 0.5)), sizes=[4, 4, 4], fed_alg="scaffold", num_rounds=1,
        sample_clients=2, checkpoint_step=1)
    folder = tmp_path / "checkpoint-1"
    tensors = load_file(folder / "run_state.safetensors")
    tensors["client/2/c"] = torch.arange(4.0)
    save_file(tensors, folder / "run_state.safetensors")
    meta = json.loads((folder / "run_state.json").read_text())
    del meta["client_store"], meta["round_losses"]
    meta["loss_history"] = [[0.5], [-1.0], [0.75]]
    (folder / "run_state.json").write_text(json.dumps(meta))
    (folder / "checksums.json").unlink()
    _, state = latest_good_checkpoint(tmp_path)
    assert torch.equal(state.client_store[2]["c"], torch.arange(4.0))
    assert state.round_losses == [{0: 0.5, 2: 0.75}]


def test_personal_global_b_is_the_mean_of_every_stored_b_without_stacking_them(tmp_path):
    """The scored global B = mean over every client that has a B (kept as a running sum and count): after clients
    are stored, replaced and added over rounds, it equals the mean computed from the store."""
    from test_lora_methods import composed, toy_model
    algorithm, flat = composed("personal", toy_model())
    mask = algorithm.method.layout.b_mask
    x = flat.get()
    run_state = type("Run", (), {})()
    run_state.x, run_state.server_state = x, algorithm.init_state(x, 4)
    run_state.client_store = ClientStore.fresh(tmp_path)
    generator = torch.Generator().manual_seed(0)
    for round_number, clients in enumerate([[0, 2], [1, 2], [2, 3], [0, 3]], start=1):
        for k in clients:
            b = torch.randn(int(mask.sum()), generator=generator)
            algorithm.keep_client_state(run_state, k, {"lora_B": b}, round_number)
    algorithm.load_global(flat, run_state)
    stored = torch.stack([run_state.client_store[k]["lora_B"] for k in run_state.client_store])
    assert int(run_state.server_state["b_clients"]) == 4
    assert torch.allclose(flat.get()[mask], stored.mean(0), atol=1e-6, rtol=0)
    assert torch.equal(flat.get()[~mask], x[~mask])


def test_personal_at_many_clients_resumes_bit_identically(tmp_path):
    """40 clients with their own B, 3 sampled per round: a run stopped after round 2 and resumed ends with the same
    global vector, the same running sum of B's and the same B for every client as the uninterrupted run."""
    flags = dict(lora_method="personal", num_rounds=5, sample_clients=3, checkpoint_step=2)
    full = run(tmp_path / "full", personal_trainer(), sizes=[3 + k % 4 for k in range(40)], **flags)
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    for later in ("checkpoint-4", "checkpoint-5"):
        shutil.rmtree(tmp_path / "resumed" / later)
    resumed = run(tmp_path / "resumed", personal_trainer(), sizes=[3 + k % 4 for k in range(40)], resume=True, **flags)
    assert torch.equal(full.x, resumed.x)
    assert all(torch.equal(full.server_state[k], resumed.server_state[k]) for k in full.server_state)
    a, b = states(full.client_store), states(resumed.client_store)
    assert a.keys() == b.keys() and len(a) > 8 and all(torch.equal(a[k]["lora_B"], b[k]["lora_B"]) for k in a)


def test_an_old_personal_checkpoint_rebuilds_the_running_sum_and_resumes(tmp_path):
    """A personal run checkpointed before the store kept its B's inside run_state.safetensors and had no b_sum or
    b_clients: the resume moves the B's into the store and rebuilds the sum and count from them, and ends as the
    uninterrupted run does."""
    from safetensors.torch import save_file
    flags = dict(lora_method="personal", sample_clients=2, checkpoint_step=2)
    sizes = [4, 5, 6, 7]
    full = run(tmp_path / "full", personal_trainer(), sizes=sizes, num_rounds=4, **flags)
    old = tmp_path / "old"
    run(old, personal_trainer(), sizes=sizes, num_rounds=2, **flags)
    _, state = latest_good_checkpoint(old)
    tensors = load_file(old / "checkpoint-2/run_state.safetensors")
    del tensors["server/b_sum"], tensors["server/b_clients"]
    tensors.update({f"client/{k}/lora_B": state.client_store[k]["lora_B"] for k in state.client_store})
    save_file(tensors, old / "checkpoint-2/run_state.safetensors")
    meta = json.loads((old / "checkpoint-2/run_state.json").read_text())
    del meta["client_store"]
    (old / "checkpoint-2/run_state.json").write_text(json.dumps(meta))
    (old / "checkpoint-2/checksums.json").unlink()
    shutil.rmtree(old / "client_state")
    resumed = run(old, personal_trainer(), sizes=sizes, num_rounds=4, resume=True, **flags)
    assert torch.equal(full.x, resumed.x) and int(resumed.server_state["b_clients"]) == len(full.client_store) == 4
    stored = torch.stack([resumed.client_store[k]["lora_B"].double() for k in resumed.client_store])
    assert torch.allclose(resumed.server_state["b_sum"], stored.sum(0), rtol=0, atol=1e-12)
    assert torch.allclose(resumed.server_state["b_sum"], full.server_state["b_sum"], rtol=0, atol=1e-12)


def test_personal_running_sum_does_not_depend_on_the_order_results_arrive_in(tmp_path):
    """A transport hands the round's results over in any order; the B's enter the fp64 sum in client order, so the
    sum is the same bits either way (B's of 1, 2^60 and -2^60, where the order of fp64 additions shows)."""
    from federated.config import FedArguments, ScriptArguments
    from federated.loop import Federation, train_client
    from test_loop_wiring import SEED, client_data

    values = {0: 1.0, 1: 2.0 ** 60, 2: -2.0 ** 60}
    sums = []
    for order in (1, -1):
        trainer = personal_trainer(lambda k, t, numel: torch.full((numel,), values[k]))
        script = ScriptArguments(output_dir=str(tmp_path / str(order)), max_steps=1, batch_size=1, seed=SEED)
        fed_args = FedArguments(lora_method="personal", num_rounds=1, sample_clients=3)
        data = client_data([2, 2, 2])
        (tmp_path / str(order)).mkdir()
        federation = Federation(script, fed_args, trainer.model, trainer.flat, [2, 2, 2], lr_min=0.0)
        tasks, run_state = federation.plan(0), federation.run
        results = [train_client(trainer, federation.algorithm, task, data[task.client], run_state.x,
                                run_state.server_state, run_state.client_store) for task in tasks]
        federation.finish_round(tasks, results[::order], round_time=0.0)
        sums.append(run_state.server_state["b_sum"])
    assert torch.equal(sums[0], sums[1])


def test_a_dropped_client_keeps_the_state_of_its_last_good_round(tmp_path):
    """Round 2: client 1 diverges (NaN loss) and client 2's update is absurd (--drop_outliers): neither is aggregated,
    and neither's c_i is replaced, so their next round does not start from a control built on a bad update."""
    deltas = {0: 0.01, 1: 0.02, 2: 1e5}
    trainer = make(lambda k, t: torch.full((4,), deltas[k] if t == 1 else 0.01 * (k + 1)),
                   loss=lambda k, t: math.nan if (k, t) == (1, 1) else 1.0)
    state = run(tmp_path, trainer, sizes=[5, 5, 5], fed_alg="scaffold", num_rounds=2, checkpoint_step=1,
                drop_outliers=True)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])["dropped_clients"] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "client_state").glob("*.safetensors")) == [
        "0-r1.safetensors", "0-r2.safetensors", "1-r1.safetensors", "2-r1.safetensors"]
    assert torch.equal(state.client_store[2]["c"], load_file(tmp_path / "client_state/2-r1.safetensors")["c"])


def test_a_run_that_kept_no_state_resumes_without_its_folder(tmp_path):
    """FedAvg keeps no client state: a run folder copied without client_state/ resumes and checkpoints again."""
    flags = dict(num_rounds=2, sample_clients=2, checkpoint_step=1)
    run(tmp_path / "full", make(lambda k, t: torch.full((4,), 0.5)), sizes=[4, 4], **flags)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-1", resumed / "checkpoint-1")
    state = run(resumed, make(lambda k, t: torch.full((4,), 0.5)), sizes=[4, 4], resume=True, **flags)
    assert state.round == 2 and (resumed / "checkpoint-2").is_dir()
