"""main_sft.py and main_dpo.py with DP end to end on a tiny random Llama: paper mode (--fed_alg feddp), clip mode on
a server optimizer with per-round epsilon in metrics.jsonl, and an exact resume that restores the accountant."""
import json
import shutil

import pytest
import torch
from opacus.accountants.analysis import rdp as opacus_rdp
from safetensors.torch import load_file

import main_sft
from conftest import run_entry
from data import load_federated_dataset
from federated.privacy import RDP_ORDERS, paper_sigma


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_args(model_dir, out, *extra):
    """4 fed-synthetic clients of ~16 samples, 2 of them per round, 2 local steps of batch 2 at 96 tokens (which
    hold a preference pair)."""
    return ["--model_name_or_path", model_dir, "--output_dir", out, "--synthetic_num_clients", 4,
            "--synthetic_mean_samples", 16, "--sample_clients", 2, "--num_rounds", 2, "--max_steps", 2,
            "--batch_size", 2, "--seq_length", 96, "--learning_rate", 1e-3, "--eval_after", "false", *extra]


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def entry(name):
    return main_sft if name == "sft" else pytest.importorskip("main_dpo")


@pytest.mark.parametrize("script, dataset", [("sft", "fed-synthetic"), ("dpo", "fed-synthetic-pref")])
def test_paper_mode_two_rounds(script, dataset, tiny_model_dir, tmp_path, caplog):
    out = tmp_path / "feddp"
    with caplog.at_level("INFO", logger="federated.privacy"):
        run_entry(entry(script), tiny_args(tiny_model_dir, out, "--fed_alg", "feddp", "--dp_epsilon", 1.0,
                                           "--dp_delta", 1e-4, "--dataset", dataset))
    assert "No clipping is applied" in caplog.text
    counts = [len(c) for c in load_federated_dataset(dataset, synthetic_num_clients=4,
                                                     synthetic_mean_samples=16).clients]
    sigma = paper_sigma(1.0, 1e-4, 1e-3, 1.0, sum(counts), 4, 2 / 4, 2)
    assert [r["round"] for r in rows(out)] == [1, 2]
    assert all(r["dp_mode"] == "paper" and r["dp_sigma"] == pytest.approx(sigma) and r["dp_epsilon_claimed"] == 1.0
               for r in rows(out))
    assert json.loads((out / "checkpoint-2/run_state.json").read_text())["extra"]["privacy"]["mode"] == "paper"


@pytest.mark.parametrize("script, fed_alg", [("sft", "fedavgm"), ("dpo", "fedadam")])
def test_clip_mode_resumes_exactly_with_the_accountant(script, fed_alg, tiny_model_dir, tmp_path, caplog):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    module = entry(script)
    args = ["--fed_alg", fed_alg, "--dp_noise_multiplier", 0.8, "--dp_clip", 0.05, "--checkpoint_step", 1]
    with caplog.at_level("INFO", logger="federated.privacy"):
        run_entry(module, tiny_args(tiny_model_dir, full, *args))
    assert "seeded by the round index, not secret" in caplog.text
    # Per-round epsilon: Opacus' own analysis of t subsampled Gaussian steps at q = 2/4, z = 0.8.
    orders = RDP_ORDERS
    for t, row in enumerate(rows(full), start=1):
        direct = opacus_rdp.get_privacy_spent(orders=orders, delta=1e-5, rdp=opacus_rdp.compute_rdp(
            q=0.5, noise_multiplier=0.8, steps=t, orders=orders))[0]
        assert row["dp_mode"] == "clip" and row["dp_epsilon"] == pytest.approx(direct, rel=1e-9)
        assert row["dp_noise_std"] == pytest.approx(0.8 * 0.05 / 2) and 0 <= row["dp_clipped_clients"] <= 2

    # Stop after round 1 (checkpoint-1 only, later metric rows to be redone), then --resume.
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoint-2")
    run_entry(module, tiny_args(tiny_model_dir, resumed, *args, "--resume", "true"))
    a, b = (load_file(d / "checkpoint-2/adapter_model.safetensors") for d in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = [json.loads((d / "checkpoint-2/run_state.json").read_text())["extra"]["privacy"] for d in (full, resumed)]
    assert state[0] == state[1] == {"mode": "clip", "history": [[0.8, 0.5, 2]]}
    assert [r["dp_epsilon"] for r in rows(full)] == [r["dp_epsilon"] for r in rows(resumed)]
