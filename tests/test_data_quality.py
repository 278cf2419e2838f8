"""IFD / IRA on a tiny random Llama against losses computed by hand, the FedDQC hooks, and the Table 1
statistics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data import quality as q
from data.registry import FederatedDataset
from data.stats import aggregate, main as stats_main, table1_row


def hand_loss(model, ids: list[int], n_tail: int) -> float:
    """Mean of -log p(token) over the last n_tail tokens, one unpadded sequence, written out step by step."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    total = 0.0
    for position in range(len(ids) - n_tail, len(ids)):
        total += -logp[position - 1, ids[position]].item()  # token at `position` is predicted one step earlier
    return total / n_tail


def test_losses_ifd_and_ira_match_hand_computation(tiny, tokenizer):
    from utils.templates import prompt_text

    pairs = [("Name a colour.", "Blue."), ("Add 2 and 3.", "The sum of two and three is five."),
             ("Say hi", "hi there, how are you doing today?")]
    cond, direct = q.response_losses(tiny, tokenizer, pairs, batch_size=2)  # padded batches of mixed length
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for (instruction, response), c, d in zip(pairs, cond, direct):
        prompt = tokenizer(prompt_text("alpaca", tokenizer, instruction))["input_ids"]
        answer = tokenizer(" " + response, add_special_tokens=False)["input_ids"]
        assert c == pytest.approx(hand_loss(tiny, prompt + answer, len(answer)), abs=1e-4)
        assert d == pytest.approx(hand_loss(tiny, [start] + answer, len(answer)), abs=1e-4)
    scores = q.scores_from_losses(cond, direct)
    np.testing.assert_allclose(scores["ifd"], cond / direct)
    np.testing.assert_allclose(scores["ifd_ppl"], np.exp(cond) / np.exp(direct))
    np.testing.assert_allclose(scores["ira"], direct - cond)


def sft_dataset(counts=(3, 2), languages=None) -> FederatedDataset:
    clients = [[{"instruction": f"c{c} q{i}", "response": f"answer {i} of client {c}"} for i in range(n)]
               for c, n in enumerate(counts)]
    meta = [{"language": lang} for lang in languages] if languages else []
    return FederatedDataset(name="toy", kind="sft", client_ids=[f"c{c}" for c in range(len(counts))],
                            clients=clients, client_metadata=meta)


def test_score_dataset_groups_by_client_and_caches(tiny, tokenizer, tmp_path):
    ds = sft_dataset()
    scores = q.score_dataset(ds, "tiny-test", model=tiny, tokenizer=tokenizer, cache_dir=str(tmp_path), progress=False)
    assert [len(v) for v in scores.metrics["ira"]] == [3, 2]
    assert scores.per_client("ifd")[1] == pytest.approx(np.mean(scores.metrics["ifd"][1]))

    class Refuses(torch.nn.Module):  # a second run must read the cache, not run the model
        def forward(self, *a, **k):
            raise AssertionError("the cache was not used")

    again = q.score_dataset(ds, "tiny-test", model=Refuses(), tokenizer=tokenizer, cache_dir=str(tmp_path))
    assert again.metrics == scores.metrics


def test_quality_filter_and_order():
    ds = sft_dataset(counts=(3, 2), languages=["English", "Telugu"])
    ira = [[0.5, -0.2, 0.9], [-1.0, -0.5]]
    filtered = q.apply_quality_filter(ds, ira, threshold=0.0)
    assert filtered.client_ids == ["c0"] and [s["instruction"] for s in filtered.clients[0]] == ["c0 q0", "c0 q2"]
    assert filtered.client_metadata == [{"language": "English"}]
    assert filtered.info["quality_filter"]["dropped_clients"] == ["c1"]
    assert filtered.info["quality_filter"]["samples_after"] == 2
    ordered = q.order_by_quality(ds, ira)
    assert [s["instruction"] for s in ordered.clients[0]] == ["c0 q2", "c0 q0", "c0 q1"]
    assert [s["instruction"] for s in ordered.clients[1]] == ["c1 q1", "c1 q0"]
    with pytest.raises(SystemExit, match="every sample"):
        q.apply_quality_filter(ds, [[0.1]], 0.0)
    with pytest.raises(SystemExit, match="lower it"):
        q.apply_quality_filter(ds, ira, threshold=5.0)
    again, kept_ira = q.filter_with_scores(ds, ira, threshold=0.0)
    assert again == filtered and kept_ira == [[0.5, 0.9]]  # aligned with the kept samples: ready for ordering
    assert [s["instruction"] for s in q.order_by_quality(again, kept_ira).clients[0]] == ["c0 q2", "c0 q0"]


def test_filter_then_order_scores_the_data_once(tiny_model_dir, tmp_path, monkeypatch):
    """--quality_filter ira --quality_order: the dataset is scored once (here: from the cache); the order uses
    the kept samples' scores instead of scoring the filtered dataset again."""
    from types import SimpleNamespace

    from federated.setup import apply_quality
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "cache"))
    ds = sft_dataset(counts=(5, 4))
    ira = q.score_dataset(ds, tiny_model_dir, max_length=64, progress=False).metrics["ira"]
    threshold = float(np.median([v for client in ira for v in client]))  # drops about half of the samples
    passes = []
    real_losses = q.response_losses
    monkeypatch.setattr(q, "response_losses", lambda *a, **k: passes.append(1) or real_losses(*a, **k))
    args = SimpleNamespace(quality_filter="ira", quality_order=True, quality_threshold=threshold,
                           quality_model=tiny_model_dir, model_name_or_path=tiny_model_dir, seq_length=64)
    result = apply_quality(ds, args)
    assert passes == []  # the full dataset's scores came from the cache, and nothing was scored again
    expected = [sorted([(v, s["instruction"]) for s, v in zip(samples, values) if v >= threshold], reverse=True)
                for samples, values in zip(ds.clients, ira)]
    assert [[s["instruction"] for s in client] for client in result.clients] == \
        [[name for _, name in client] for client in expected if client]


def test_aggregations_use_population_std():
    agg = aggregate([[1, 3], [10]])
    assert agg["pooled"] == pytest.approx((14 / 3, np.std([1, 3, 10])))
    assert agg["across_clients"] == pytest.approx((6.0, 4.0))  # client means 2 and 10
    assert agg["within_clients"] == pytest.approx((6.0, 0.5))  # client stds 1 and 0


def test_table1_row_lengths(tokenizer):
    ds = FederatedDataset(name="toy", kind="preference", client_ids=["a", "b"], clients=[
        [{"prompt": "one two", "chosen": "yes", "rejected": "no no no"}],
        [{"prompt": "three", "chosen": "ok", "rejected": "nope"}, {"prompt": "four", "chosen": "a b", "rejected": "c"}]])
    row = table1_row(ds, tokenizer)
    lengths = lambda texts: [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]  # noqa: E731
    assert row["clients"] == 2 and row["samples"] == 3 and row["per_client"] == (1.5, 0.5)
    assert row["instruction_length"]["pooled"][0] == pytest.approx(np.mean(lengths(["one two", "three", "four"])))
    assert row["response_length"]["pooled"][0] == pytest.approx(np.mean(lengths(["yes", "ok", "a b"])))
    both = table1_row(ds, tokenizer, pa_response="both")
    assert both["response_length"]["pooled"][0] == pytest.approx(
        np.mean(lengths(["yes", "no no no", "ok", "nope", "a b", "c"])))


def test_stats_cli_prints_the_row_beside_the_paper(tmp_path, capsys):
    released = {f"user{c}": [{"instruction": "hello there", "response": "hi"}] * n for c, n in enumerate([1, 3])}
    path = tmp_path / "aya.json"
    path.write_text(json.dumps(released))
    stats_main(["--dataset", "fed-aya", "--local_data_dir", str(path), "--tokenizer", "smollm2"])
    out = capsys.readouterr().out
    assert "tokenizer: smollm2" in out and "2±1" in out and "671±815" in out and "116±199" in out


def test_stats_json_is_the_papers_across_clients_aggregation(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Lengths (one SmolLM2 token per word here) and IFD as mean ± std over clients of per-client means."""
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "cache"))  # for the quality scores
    # --tokenizer: the tiny model's, which is SmolLM2's (read from its folder, not converted again)
    words = lambda n: " ".join(["one", "two", "three", "four", "five", "six"][:n])  # noqa: E731
    lengths = {"A": [(1, 2), (3, 4)], "B": [(6, 1)], "C": [(2, 3), (2, 3), (5, 3)]}  # (instruction, response)
    released = {cid: [{"instruction": words(i), "response": words(r)} for i, r in pairs]
                for cid, pairs in lengths.items()}
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(released))
    out = tmp_path / "row.json"
    stats_main(["--dataset", "fed-chatbotit", "--local_data_dir", str(path), "--tokenizer", tiny_model_dir,
                "--quality_model", tiny_model_dir, "--quality_max_per_client", "2", "--json", str(out)])
    row = json.loads(out.read_text())
    assert row["aggregation"] == "across_clients" and "lengths and IFD by across_clients" in capsys.readouterr().out
    # Client means: instructions 2, 6, 3 and responses 3, 1, 3 (pooled would give 19/6 and 16/6 instead).
    assert row["instruction_length"]["across_clients"] == pytest.approx([11 / 3, 26 ** 0.5 / 3])
    assert row["response_length"]["across_clients"] == pytest.approx([7 / 3, 8 ** 0.5 / 3])
    assert row["instruction_length"]["pooled"][0] == pytest.approx(19 / 6)
    assert row["clients"] == 3 and row["samples"] == 6 and row["per_client"] == pytest.approx([2, (2 / 3) ** 0.5])
    assert set(row) >= {"clients", "samples", "per_client", "instruction_length", "response_length", "quality",
                        "aggregation", "tokenizer", "quality_model", "quality_max_per_client"}
    # IFD: each client's first two samples scored (cached by the run above), averaged per client, then over clients.
    from data.registry import load_federated_dataset
    ifd = q.score_dataset(load_federated_dataset(local_data_dir=str(path)), tiny_model_dir, max_per_client=2,
                          progress=False).metrics["ifd"]
    assert [len(v) for v in ifd] == [2, 1, 2]
    means = [sum(v) / len(v) for v in ifd]
    centre = sum(means) / 3
    spread = (sum((m - centre) ** 2 for m in means) / 3) ** 0.5
    assert row["quality"]["across_clients"] == pytest.approx([centre, spread])


def test_table1_row_is_printed_beside_the_paper_with_a_flag_beyond_the_tolerance():
    from data.fedllm_bench import AYA
    from data.stats import format_row

    row = {"clients": 38, "samples": 25513, "per_client": (671.4, 814.8), "quality": None,
           "instruction_length": {"across_clients": (130.0, 199.0)}, "response_length": {"across_clients": (225, 500)}}
    checks = {line[:22].strip(): line[54:].strip() for line in format_row(row, AYA.targets)[1:]}
    assert checks == {"# clients": "ok", "# samples": "ok", "# samples per client": "ok",
                      "L. instruction": "mean FLAG +12%", "L. response": "std FLAG +22%", "quality (IFD)": ""}
