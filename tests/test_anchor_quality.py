"""Anchor-scored quality control (CLUES): TracIn scores against a per-sample autograd loop written out by hand, the
global and per-client thresholds, the quality-mixed fed-synthetic variant, and the filter through apply_quality."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data import anchor_quality as aq
from data.quality import filter_with_scores
from data.registry import FederatedDataset
from data.synthetic import build_noisy_synthetic, clean_samples, exact_match


@pytest.fixture(scope="module")
def lora_tiny(tokenizer):
    from utils.model import tiny_llama, wrap_with_lora
    model = wrap_with_lora(tiny_llama(tokenizer), r=4, alpha=8, dropout=0.0).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # B = 0 would leave A without gradient: give both factors a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


SAMPLES = [{"instruction": "What is 2 + 3? Answer with the number only.", "response": "5"},
           {"instruction": "Spell the word 'tiger' backwards.", "response": "regit"},
           {"instruction": "Rewrite in capital letters: ocean apple", "response": "OCEAN APPLE"},
           {"instruction": "What is 7 times 8? Answer with the number only.", "response": "56"},
           {"instruction": "Name a colour.", "response": "A long answer about the colour blue and the sky."}]


def hand_gradient(model, sample: dict) -> torch.Tensor:
    """One sample alone through the model's own loss (labels=...), ordinary backward, gradients concatenated."""
    model.zero_grad()
    out = model(input_ids=torch.tensor([sample["input_ids"]]), labels=torch.tensor([sample["labels"]]))
    out.loss.backward()
    return torch.cat([p.grad.reshape(-1).clone() for _, p in model.named_parameters() if p.requires_grad])


def test_tracin_scores_match_a_per_sample_loop(lora_tiny, tokenizer):
    tokenized = aq.tokenize_samples(SAMPLES, tokenizer, "alpaca", 128)
    anchors, clients = tokenized[:3], tokenized[3:]
    lr, checkpoints = 0.5, 2
    start = {n: p.detach().clone() for n, p in lora_tiny.named_parameters() if p.requires_grad}
    ckpts, anchor_scores = aq.anchor_checkpoints(lora_tiny, anchors, checkpoints, lr, tokenizer.pad_token_id,
                                                 batch_size=2)  # batches of mixed length: padding exercised
    scores = aq.sample_scores(lora_tiny, ckpts, clients, tokenizer.pad_token_id, batch_size=2)
    assert all(torch.equal(p, start[n]) for n, p in lora_tiny.named_parameters() if p.requires_grad)

    expected_anchor, expected_client = np.zeros(3), np.zeros(2)
    trainable = [p for p in lora_tiny.parameters() if p.requires_grad]
    try:
        for _ in range(checkpoints):
            g_anchor = [hand_gradient(lora_tiny, a) for a in anchors]
            mean = sum(g_anchor) / 3
            for i, g in enumerate(g_anchor):
                others = sum(g_anchor[j] for j in range(3) if j != i) / 2
                expected_anchor[i] += lr * float(g @ others)
            for i, sample in enumerate(clients):
                expected_client[i] += lr * float(hand_gradient(lora_tiny, sample) @ mean)
            with torch.no_grad():  # the warm-up step, by hand
                offset = 0
                for p in trainable:
                    p -= lr * mean[offset:offset + p.numel()].view_as(p)
                    offset += p.numel()
    finally:
        with torch.no_grad():
            for n, p in lora_tiny.named_parameters():
                if p.requires_grad:
                    p.copy_(start[n])
    assert np.abs(expected_client).min() > 1e-6  # the scores are not trivially zero
    np.testing.assert_allclose(anchor_scores, expected_anchor, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(scores, expected_client, rtol=1e-3, atol=1e-7)
    # the median of the scores just checked to rtol 1e-3 (thread counts change the float sums' order)
    assert aq.global_threshold(anchor_scores, 0.5) == pytest.approx(float(np.median(expected_anchor)), rel=1e-3)


def toy(scores_per_client, corrupted_per_client) -> FederatedDataset:
    clients = [[{"instruction": f"c{c} q{i}", "response": "r", "corrupted": bad}
                for i, bad in enumerate(marks)] for c, marks in enumerate(corrupted_per_client)]
    return FederatedDataset(name="toy", kind="sft", client_ids=[f"c{c}" for c in range(len(clients))],
                            clients=clients)


def test_global_and_per_client_thresholds_and_detection():
    scores = [[0.9, -0.1, 0.5, -0.2], [-1.0, -0.8, -0.9, 0.3]]  # client 1 scores low throughout
    ds = toy(scores, [[False, True, False, True], [True, True, False, False]])
    kept, values = filter_with_scores(ds, scores, 0.0, metric="anchor")  # one global threshold
    assert [[s["instruction"] for s in c] for c in kept.clients] == [["c0 q0", "c0 q2"], ["c1 q3"]]
    record = kept.info["quality_filter"]
    # dropped: c0 q1 (bad), c0 q3 (bad), c1 q0 (bad), c1 q1 (bad), c1 q2 (good): all 4 bad, 4 of the 5 dropped
    assert (record["recall"], record["precision"], record["metric"]) == (1.0, 0.8, "anchor")
    thresholds = aq.per_client_thresholds(scores, 0.5)  # each client keeps its top half
    assert thresholds == [pytest.approx(0.2), pytest.approx(-0.85)]
    kept, _ = filter_with_scores(ds, scores, thresholds, metric="anchor_per_client")
    assert [[s["instruction"] for s in c] for c in kept.clients] == [["c0 q0", "c0 q2"], ["c1 q1", "c1 q3"]]
    record = kept.info["quality_filter"]  # c1 q1 (bad) survives the per-client rule, c1 q2 (good) does not
    assert (record["recall"], record["precision"], record["threshold"]) == (0.75, 0.75, thresholds)


def test_noisy_synthetic_marks_its_corruption_and_anchors_are_disjoint():
    ds = build_noisy_synthetic(num_clients=8, seed=3, mean_samples=40)
    shares = [m["corrupted_share"] for m in ds.client_metadata]
    assert len(set(shares)) > 4 and 0 <= min(shares) and max(shares) <= 0.6
    for client, share in zip(ds.clients, shares):
        assert sum(s["corrupted"] for s in client) == round(share * len(client))
    assert all(exact_match(s["response"], t["response"]) for s in ds.test for t in [s])  # the test set is clean
    assert not any("corrupted" in s for s in ds.test)
    anchors = aq.load_anchors(ds, None, 24, seed=0)
    used = {s["instruction"] for s in ds.test} | {s["instruction"] for c in ds.clients for s in c}
    assert len(anchors) == 24 and not {a["instruction"] for a in anchors} & used
    assert anchors == clean_samples(24, 0, exclude=used)  # reproducible


def test_corrupted_answers_are_wrong():
    """Each corrupted answer differs from the right answer of its own instruction, recomputed by the task."""
    ds = build_noisy_synthetic(num_clients=4, seed=1, mean_samples=30)
    checked = 0
    for client in ds.clients:
        for s in client:
            if s["task"] in ("add", "multiply"):  # answers computable from the instruction alone
                numbers = [int(w) for w in s["instruction"].replace("?", " ").split() if w.isdigit()]
                right = str(sum(numbers) if s["task"] == "add" else numbers[0] * numbers[1])
                assert (s["response"] != right) == s["corrupted"]
                checked += 1
    assert checked > 5  # the check ran on real samples


def test_apply_quality_anchor_filter_on_a_tiny_model(tiny_model_dir, one_thread, tmp_path, monkeypatch):
    """The flags' path end to end: anchors generated beside the noisy dataset, scored, filtered, recorded; the
    per-client rule then reads the same scores from the cache."""
    from data import anchor_quality
    from federated.setup import apply_quality
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path))
    ds = build_noisy_synthetic(num_clients=2, seed=0, mean_samples=16)
    args = SimpleNamespace(quality_filter="anchor", quality_order=False, quality_anchor_data=None,
                           quality_anchor_size=6, seed=0, quality_model=None, model_name_or_path=tiny_model_dir,
                           seq_length=48, peft_lora_r=4, peft_lora_alpha=8, template="alpaca",
                           quality_checkpoints=1, quality_warmup_lr=0.05, quality_threshold_quantile=0.25)
    kept = apply_quality(ds, args)
    record = kept.info["quality_filter"]
    assert record["metric"] == "anchor" and record["anchors"] == 6
    assert record["samples_before"] == sum(ds.sample_counts) > record["samples_after"] > 0
    assert 0 <= record["recall"] <= 1 and record["corrupted"] == sum(s["corrupted"] for c in ds.clients for s in c)
    monkeypatch.setattr(anchor_quality, "score_with_anchors", lambda *a, **k: pytest.fail("scored twice"))
    per_client = apply_quality(ds, SimpleNamespace(**{**vars(args), "quality_filter": "anchor_per_client"}))
    for before, after in zip(ds.clients, per_client.clients):  # each client drops the scores below its own
        # interpolated lower quartile: ceil(0.25 (n - 1)) samples, fewer where repeated samples tie at it
        assert 0 < len(before) - len(after) <= math.ceil(0.25 * (len(before) - 1))



@pytest.mark.parametrize("flags, message", [(["--quality_filter", "anchor", "--quality_threshold_quantile", 1.5],
                                             "--quality_threshold_quantile"),
                                            (["--quality_filter", "tracin"], "--quality_filter"),
                                            (["--quality_checkpoints", 0], "--quality_checkpoints")])
def test_bad_anchor_flags_are_refused_before_loading(flags, message, tmp_path):
    import main_sft
    from conftest import run_entry
    with pytest.raises(SystemExit, match=message):
        run_entry(main_sft, ["--output_dir", tmp_path / "x", *flags])


PAIRS = [{"prompt": "What is 2 + 3? Answer with the number only.", "chosen": "5", "rejected": "6"},
         {"prompt": "Spell the word 'tiger' backwards.", "chosen": "regit", "rejected": "tiger"},
         {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A long answer about the sky and the sea."}]


def hand_dpo_gradient(model, pair: dict) -> torch.Tensor:
    """One pair alone: each answer's summed log-probability from the model's own mean loss times its answer
    tokens, the reference the same with the adapter off, the DPO loss, ordinary backward."""
    def answer_log_prob(seq):
        labels = torch.tensor([seq["labels"]])
        tokens = int((labels[0, 1:] != -100).sum())
        return -model(input_ids=torch.tensor([seq["input_ids"]]), labels=labels).loss * tokens

    with torch.no_grad(), model.disable_adapter():
        reference = answer_log_prob(pair["chosen"]) - answer_log_prob(pair["rejected"])
    model.zero_grad()
    margin = answer_log_prob(pair["chosen"]) - answer_log_prob(pair["rejected"])
    (-torch.nn.functional.logsigmoid(aq.DPO_BETA * (margin - reference))).backward()
    return torch.cat([p.grad.reshape(-1).clone() for _, p in model.named_parameters() if p.requires_grad])


def test_preference_pairs_get_per_sample_dpo_gradients(lora_tiny, tokenizer):
    """main_dpo.py's anchor filter: the batched DPO gradients (pairs of different lengths padded together, the
    base model as reference) equal a per-pair autograd loop."""
    pairs = aq.add_reference_margins(lora_tiny, aq.tokenize_samples(PAIRS, tokenizer, "alpaca", 128),
                                     tokenizer.pad_token_id)
    params = aq.lora_parameters(lora_tiny)
    batched = aq.per_sample_gradients(lora_tiny, params, pairs, tokenizer.pad_token_id)
    expected = torch.stack([hand_dpo_gradient(lora_tiny, pair) for pair in pairs])
    assert expected.abs().max() > 1e-6  # B != 0 in this fixture: the policy is not the reference
    torch.testing.assert_close(batched, expected, rtol=1e-3, atol=1e-6)


def test_preference_anchors_are_pairs_disjoint_from_the_clients():
    from data.quality import sample_pair
    from data.synthetic_pref import build_synthetic_pref
    ds = build_synthetic_pref(num_clients=3, alpha=0.3, seed=0, mean_samples=8)
    anchors = aq.load_anchors(ds, None, 12, seed=0)
    used = {sample_pair(s)[0] for s in ds.test} | {sample_pair(s)[0] for c in ds.clients for s in c}
    assert len(anchors) == 12 and all({"prompt", "chosen", "rejected"} <= a.keys() for a in anchors)
    assert not {a["prompt"] for a in anchors} & used


def test_main_dpo_filters_pairs_by_anchor_scores(tiny_model_dir, one_thread, tmp_path, monkeypatch):
    """The flags' path through main_dpo.py on flipped pairs: scored, filtered, recorded in the run folder."""
    import json

    import main_dpo
    from conftest import run_entry
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    run_entry(main_dpo, ["--dataset", "fed-synthetic-pref-noisy", "--model_name_or_path", tiny_model_dir,
                         "--output_dir", out, "--synthetic_num_clients", 2, "--synthetic_mean_samples", 8,
                         "--sample_clients", 1, "--num_rounds", 1, "--max_steps", 1, "--batch_size", 2,
                         "--seq_length", 96, "--eval_after", "false", "--peft_lora_r", 4,
                         "--quality_filter", "anchor", "--quality_anchor_size", 4, "--quality_checkpoints", 1,
                         "--quality_threshold_quantile", 0.5])
    record = json.loads((out / "data_methods.json").read_text())["quality_filter"]
    assert record["metric"] == "anchor" and record["anchors"] == 4
    assert record["samples_before"] > record["samples_after"] > 0 and 0 <= record["recall"] <= 1
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_noisy_preference_data_flips_a_marked_share_of_pairs():
    from data.registry import load_federated_dataset
    from data.synthetic_pref import build_synthetic_pref
    clean = build_synthetic_pref(num_clients=6, alpha=0.3, seed=3, mean_samples=20)
    noisy = load_federated_dataset("fed-synthetic-pref-noisy", synthetic_num_clients=6, synthetic_seed=3,
                                   synthetic_mean_samples=20)
    assert noisy.kind == "preference" and noisy.test == clean.test
    for before, after, meta in zip(clean.clients, noisy.clients, noisy.client_metadata):
        for b, a in zip(before, after):  # a flipped pair is exactly the clean pair swapped, and marked
            swapped = (a["chosen"], a["rejected"]) == (b["rejected"], b["chosen"])
            unchanged = (a["chosen"], a["rejected"]) == (b["chosen"], b["rejected"])
            assert a["corrupted"] == swapped and (swapped or unchanged)
        assert meta["corrupted_share"] == pytest.approx(sum(a["corrupted"] for a in after) / len(after), abs=1e-4)
    assert 0 < sum(a["corrupted"] for c in noisy.clients for a in c) < sum(noisy.sample_counts)
