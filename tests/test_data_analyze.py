"""data.analyze writes non-empty PNG figures (tiny scorer model, the packaged MiniLM embedder)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data import analyze
from data.registry import FederatedDataset

AYA_TESTSET = Path(__file__).resolve().parents[2] / "shared" / "eval_data" / "ref_gpt4" / "aya_testset.json"
PNG_MAGIC = b"\x89PNG"


def aya_clients() -> FederatedDataset:
    """Real Aya rows: each language split into two clients of 12 and 8 samples."""
    if not AYA_TESTSET.exists():
        pytest.skip("../shared/eval_data/ref_gpt4/aya_testset.json is not there")
    data = json.loads(AYA_TESTSET.read_text(encoding="utf-8"))
    ids, clients, meta = [], [], []
    for language, rows in data.items():
        samples = [{"instruction": r["instruction"], "response": r["reference"]} for r in rows]
        for part, chunk in enumerate((samples[:12], samples[12:])):
            ids.append(f"{language}-{part}")
            clients.append(chunk)
            meta.append({"language": language.replace("_", " ")})
    return FederatedDataset(name="aya-fixture", kind="sft", client_ids=ids, clients=clients, client_metadata=meta)


def preference_clients() -> FederatedDataset:
    clients = [[{"prompt": f"question {c}.{i}", "chosen": "a long and careful answer " * (1 + i % 3),
                 "rejected": "short"} for i in range(4 + c)] for c in range(3)]
    return FederatedDataset(name="pa-fixture", kind="preference", client_ids=["u0", "u1", "u2"], clients=clients)


def assert_pngs(paths, names):
    assert sorted(p.name for p in paths) == sorted(names)
    for path in paths:
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == PNG_MAGIC


def test_sft_figures(tmp_path, tokenizer, tiny, monkeypatch):
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "cache"))  # quality scores cache stays in tmp
    embed = analyze.minilm_embedder()
    texts = ["a much longer sentence about cats and dogs", "hello world", "hi"]
    together = embed(texts)  # batched in length order: rows must still follow `texts`
    assert together.shape == (3, 384)
    assert abs(float(together[1] @ embed(["hello world"])[0]) - 1.0) < 1e-4
    paths = analyze.analyze(aya_clients(), tmp_path / "figs", tokenizer, embed,
                            quality_model="tiny-test", quality_clients=4, quality_per_client=3,
                            tsne_per_client=4, model=tiny, model_tokenizer=tokenizer)
    assert_pngs(paths, ["fig1a_language.png", "fig1b_lengths.png", "fig3_quality.png", "fig4_tsne.png",
                        "fig5_quantity.png"])


def test_preference_figures(tmp_path, tokenizer, tiny, monkeypatch):
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "cache"))
    paths = analyze.analyze(preference_clients(), tmp_path / "figs", tokenizer, None, quality_model="tiny-test",
                            model=tiny, model_tokenizer=tokenizer)
    # No language metadata and no embedder: Fig. 1a and 4 are skipped.
    assert_pngs(paths, ["fig1b_lengths.png", "fig1c_length_preference.png", "fig1d_quality_preference.png",
                        "fig3_quality.png", "fig5_quantity.png"])


def test_cli_on_a_released_file(tmp_path, capsys):
    released = {f"user{c}": [{"instruction": f"q{c}.{i}", "response": "an answer"} for i in range(3 + c)]
                for c in range(3)}
    path = tmp_path / "released.json"
    path.write_text(json.dumps(released))
    analyze.main(["--dataset", "fed-chatbotit", "--local_data_dir", str(path), "--out", str(tmp_path / "out"),
                  "--tokenizer", "smollm2", "--skip_quality", "--embedding", "none"])
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "out" / "fig5_quantity.png").stat().st_size > 1000
