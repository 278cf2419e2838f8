"""FedDCA: spherical k-means, the greedy farthest-centre choice and exact retrieval on hand-made vectors, the
augmentation with the packaged MiniLM encoder on a domain-skewed fed-synthetic, and FedDCA*'s client encoders and
the ridge map into the server's space."""
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
    queries = unit(50, 100, 10)  # in chunks of 2 queries: the same as all at once
    assert feddca.retrieve(pool, queries, 2, chunk=2).tolist() == [[2, 1], [3, 4], [0, 1]]
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


def test_projection_is_the_ridge_solution_by_hand():
    # X = [[1,0],[0,1],[1,1]], y = [1,2,3], ridge 1: (X^T X + I) = [[3,1],[1,3]], X^T y = [4,5];
    # W = 1/8 [[3,-1],[-1,3]] [4,5] = [7/8, 11/8].
    x, y = torch.tensor([[1.0, 0], [0, 1], [1, 1]]), torch.tensor([[1.0], [2], [3]])
    assert feddca.fit_projection(x, y, 1.0).ravel().tolist() == pytest.approx([7 / 8, 11 / 8], abs=1e-6)
    # An exactly linear relation is recovered when the penalty is negligible; project() maps and renormalises.
    a = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    assert torch.allclose(feddca.fit_projection(x, x @ a, 1e-9), a, atol=1e-5)
    assert feddca.project(torch.tensor([[1.0, 0.0]]), a)[0].tolist() == pytest.approx([0.0, 1.0])


def test_hashing_encoder_counts_shared_words_and_bigrams():
    embed = feddca.hashing_embedder()
    v = torch.from_numpy(embed(["a b", "a c", "A  B!", ""]))
    # {a, b, "a b"} and {a, c, "a c"} share one of three features each: cosine 1/3; case and punctuation ignored.
    assert (v[0] @ v[1]).item() == pytest.approx(1 / 3, abs=1e-6)
    assert (v[0] @ v[2]).item() == pytest.approx(1.0, abs=1e-6)
    assert v[3].abs().sum() == 0  # no words, no features (and no division by zero)


def test_feddca_star_with_the_servers_own_encoder_retrieves_as_feddca():
    """A client encoder equal to the server's: the fitted map is the identity (a pool larger than the dimension,
    a negligible penalty), so FedDCA* must send FedDCA's centres, choose the same ones and retrieve samples as
    near. A map applied the wrong way round, or to the wrong side, breaks this. Compared by value, not by index:
    the hashed vectors have exact ties, which the last float digit of the map may order either way."""
    from data.synthetic import build_synthetic
    ds = build_synthetic(num_clients=4, alpha=0.05, seed=2, mean_samples=12)
    pool = feddca.load_public_pool(ds, None, 120, seed=0)
    small = feddca.hashing_embedder(dims=24)  # 24 dims < 120 pool samples: the map is determined
    pool_vectors = feddca.embed_prompts(small, pool)
    plain, _ = feddca.client_centres(ds.clients, 3, 0, small)
    star, _ = feddca.client_centres(ds.clients, 3, 0, small, pool, pool_vectors, ridge=1e-6)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(star, plain))
    chosen = feddca.greedy_centres(plain)
    assert feddca.greedy_centres(star) == chosen
    for a, b, i in zip(star, plain, chosen):  # the retrieved samples' similarities to the centre, in order
        near = [pool_vectors[feddca.retrieve(pool_vectors, c[i:i + 1], 5)[0]] @ b[i] for c in (a, b)]
        assert torch.allclose(near[0], near[1], atol=1e-4)
    record = feddca.augment(ds, pool, small, 3, 5, 0, client_embed=small, ridge=1e-6).info["feddca"]
    assert record["alignment_cosine"] == pytest.approx(1.0, abs=1e-3)


def test_feddca_star_maps_a_small_encoder_into_the_servers_space():
    from data.analyze import minilm_embedder
    from data.synthetic import build_synthetic
    ds = build_synthetic(num_clients=3, alpha=0.05, seed=1, mean_samples=16)
    pool = feddca.load_public_pool(ds, None, 120, seed=0)
    out = feddca.augment(ds, pool, minilm_embedder(), clusters=3, per_centre=8, seed=0,
                         client_embed=feddca.hashing_embedder(), ridge=1.0)
    record = out.info["feddca"]
    # Held-out prompts mapped from the hashing space land near their true MiniLM embeddings (unrelated spaces
    # would give about 0), and the retrieval still widens coverage.
    assert record["alignment_cosine"] > 0.5
    assert record["coverage_after"] > record["coverage_before"]


def test_bad_dca_flags_are_refused_before_loading(tmp_path):
    import main_sft
    from conftest import run_entry
    with pytest.raises(SystemExit, match="--dca_clusters"):
        run_entry(main_sft, ["--output_dir", tmp_path / "x", "--feddca", "--dca_clusters", 0])
    with pytest.raises(SystemExit, match="--dca_align_ridge"):
        run_entry(main_sft, ["--output_dir", tmp_path / "x", "--feddca", "--dca_align_ridge", -1])
    for typo in ("minilm-l2", "hashin", "./no/such/folder"):  # refused before any data or model is loaded
        with pytest.raises(SystemExit, match=f"--dca_client_encoder '{typo}' is invalid"):
            run_entry(main_sft, ["--output_dir", tmp_path / "x", "--feddca", "--dca_client_encoder", typo])
    assert not (tmp_path / "x").exists()


def test_main_sft_runs_feddca_star_end_to_end(tmp_path, tiny_model_dir, one_thread):
    """--feddca --dca_client_encoder reaches the augmentation through the entry script: the run folder's record
    carries FedDCA*'s alignment, and the federation trains on the augmented clients."""
    import json

    import main_sft
    from conftest import run_entry
    out = tmp_path / "run"
    run_entry(main_sft, ["--model_name_or_path", tiny_model_dir, "--output_dir", out,
                         "--synthetic_num_clients", 3, "--synthetic_alpha", 0.05, "--synthetic_mean_samples", 8,
                         "--sample_clients", 1, "--num_rounds", 1, "--max_steps", 1, "--batch_size", 2,
                         "--seq_length", 64, "--eval_after", "false", "--feddca", "--dca_client_encoder",
                         "hashing", "--dca_retrieve", 4, "--dca_pool_size", 60])
    record = json.loads((out / "data_methods.json").read_text())["feddca"]
    assert record["per_centre"] == 4 and -1 <= record["alignment_cosine"] <= 1
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_preference_data_retrieves_preference_pairs(tmp_path):
    """DPO: the generated pool holds pairs with prompts no client or test pair has; a pool of the wrong kind is
    refused with the keys it needs."""
    import json

    from data.synthetic_pref import build_synthetic_pref
    ds = build_synthetic_pref(num_clients=3, alpha=0.05, seed=1, mean_samples=8)
    pool = feddca.load_public_pool(ds, None, 40, seed=0)
    assert all({"prompt", "chosen", "rejected"} <= s.keys() and s["chosen"] != s["rejected"] for s in pool)
    assert not {s["prompt"] for s in pool} & ({s["prompt"] for s in ds.test} | {s["prompt"] for c in ds.clients
                                                                              for s in c})
    out = feddca.augment(ds, pool, feddca.hashing_embedder(), clusters=2, per_centre=3, seed=0)
    assert all({"prompt", "chosen", "rejected"} <= s.keys() for c in out.clients for s in c[-3:])
    wrong = tmp_path / "sft_pool.json"
    wrong.write_text(json.dumps([{"instruction": "a", "response": "b"}]))
    with pytest.raises(SystemExit, match="prompt, chosen, rejected"):
        feddca.load_public_pool(ds, str(wrong), 40, seed=0)


def test_main_dpo_trains_on_retrieved_pairs(tmp_path, tiny_model_dir, one_thread):
    import json

    import main_dpo
    from conftest import run_entry
    out = tmp_path / "run"
    run_entry(main_dpo, ["--model_name_or_path", tiny_model_dir, "--output_dir", out,
                         "--synthetic_num_clients", 3, "--synthetic_alpha", 0.05, "--synthetic_mean_samples", 8,
                         "--sample_clients", 1, "--num_rounds", 1, "--max_steps", 1, "--batch_size", 2,
                         "--seq_length", 96, "--eval_after", "false", "--feddca", "--dca_retrieve", 4,
                         "--dca_pool_size", 60, "--dca_client_encoder", "hashing"])
    assert json.loads((out / "data_methods.json").read_text())["feddca"]["per_centre"] == 4
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
