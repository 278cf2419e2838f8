"""FedDCA: spherical k-means, the greedy farthest-centre choice and exact retrieval on hand-made vectors, and the
augmentation with the packaged MiniLM encoder on a domain-skewed fed-synthetic."""
from __future__ import annotations

import math

import pytest
import torch

from data import feddca


def unit(*angles_deg):
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles_deg])


def test_kmeans_finds_two_separated_groups():
    points = unit(0, 5, 10, 90, 95, 100)
    centres = feddca.kmeans(points, 2, seed=0)
    angles = sorted(round(math.degrees(math.atan2(c[1].item(), c[0].item()))) for c in centres)
    assert angles == [5, 95]  # the normalised means of each group
    assert feddca.kmeans(points[:1], 4, seed=0).shape == (1, 2)  # never more centres than points


def test_greedy_choice_spreads_the_centres_and_retrieval_is_exact():
    clients = [unit(0, 80, 90), unit(85, 180), unit(10, 270, 95)]
    # client 0: most distinctive centre (lowest similarity to its own mean): 0 degrees.
    # client 1: farthest from {0}: 180 (cosine -1) rather than 85. client 2: farthest from {0, 180}: 270 or 95 ->
    # nearest picked similarity: 10 -> 0.98, 270 -> 0, 95 -> 0.087: 270.
    assert feddca.greedy_centres(clients) == [0, 1, 1]
    pool = unit(0, 30, 60, 90, 120)
    assert feddca.retrieve(pool, unit(50), 2).tolist() == [[2, 1]]
    assert feddca.coverage(unit(0), unit(0, 60)) == pytest.approx((1 + 0.5) / 2, abs=1e-6)


def test_augmentation_widens_a_skewed_clients_coverage():
    from data.analyze import minilm_embedder
    from data.synthetic import build_synthetic
    ds = build_synthetic(num_clients=3, alpha=0.05, seed=1, mean_samples=16)  # few samples of about one task each
    pool = feddca.load_public_pool(ds, None, 120, seed=0)
    used = {s["instruction"] for s in ds.test} | {s["instruction"] for c in ds.clients for s in c}
    assert not {s["instruction"] for s in pool} & used
    out = feddca.augment(ds, pool, minilm_embedder(), clusters=3, per_centre=8, seed=0)
    record = out.info["feddca"]
    assert [len(c) for c in out.clients] == [n + 8 for n in ds.sample_counts]
    assert all(s.get("retrieved") for c in out.clients for s in c[-8:])
    assert record["coverage_after"] > record["coverage_before"]
    assert record["tasks_per_client_after"] >= record["tasks_per_client_before"]


def test_bad_dca_flags_are_refused_before_loading(tmp_path):
    import main_sft
    from conftest import run_entry
    with pytest.raises(SystemExit, match="--dca_clusters"):
        run_entry(main_sft, ["--output_dir", tmp_path / "x", "--feddca", "--dca_clusters", 0])
