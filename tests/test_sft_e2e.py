"""main_sft.py end to end on a tiny random Llama (fast) and on the real SmolLM2 (slow): every method, exact
resume after a kill, and every bad input with its one-line error."""
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import main_sft
from conftest import ROOT, run_entry

METHODS = ["fedavg", "fedprox", "scaffold", "fedavgm", "fedadagrad", "fedyogi", "fedadam", "local1"]


def tiny_args(model_dir, out, *extra):
    return ["--model_name_or_path", model_dir, "--output_dir", out, "--synthetic_num_clients", 4,
            "--synthetic_mean_samples", 16, "--sample_clients", 2, "--num_rounds", 2, "--max_steps", 2,
            "--batch_size", 2, "--seq_length", 64, "--learning_rate", 1e-3, "--eval_after", "false", *extra]


def adapter(path) -> dict:
    return load_file(Path(path) / "adapter_model.safetensors")


@pytest.mark.parametrize("method", METHODS)
def test_two_rounds_every_method(method, tiny_model_dir, tmp_path):
    out = tmp_path / method
    run_entry(main_sft, tiny_args(tiny_model_dir, out, "--fed_alg", method))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    expected_clients = [1] if method == "local1" else None
    for row in rows:
        assert len(row["clients"]) == (1 if method == "local1" else 2)
        assert expected_clients is None or row["clients"] == expected_clients
        assert all(np.isfinite(v) for v in row["client_loss"].values())
        assert row["bytes_uploaded"] > 0 and row["peak_memory_mb"] > 0 and row["train_time_s"] > 0
    losses = np.load(out / "training_loss.npy")
    assert losses.shape == (4, 2)
    assert ((losses == -1) | (losses > 0)).all()
    # The saved adapter loads with PeftModel and differs from LoRA's initial state (B = 0).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "checkpoint-2")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    assert json.loads((out / "args.json").read_text())["fed_alg"] == method


@pytest.mark.parametrize("method", ["scaffold", "fedadam"])
def test_resume_from_a_checkpoint_is_bit_identical(method, tiny_model_dir, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ["--fed_alg", method, "--num_rounds", 3, "--checkpoint_step", 1]
    run_entry(main_sft, tiny_args(tiny_model_dir, full, *args))
    # The state on disk after a stop in round 2: checkpoint-1 only, metrics of later rounds to be redone.
    shutil.copytree(full, resumed)
    for later in ("checkpoint-2", "checkpoint-3"):
        shutil.rmtree(resumed / later)
    run_entry(main_sft, tiny_args(tiny_model_dir, resumed, *args, "--resume", "true"))
    a, b = adapter(full / "checkpoint-3"), adapter(resumed / "checkpoint-3")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_file(full / "checkpoint-3/run_state.safetensors"), load_file(resumed / "checkpoint-3/run_state.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k != "torch_rng")
    rows = [json.loads(r) for r in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert np.array_equal(np.load(full / "training_loss.npy"), np.load(resumed / "training_loss.npy"))


def test_killed_run_resumes_bit_identical(tiny_model_dir, tmp_path):
    """A real kill (SIGKILL) once checkpoint-1 exists, then --resume, against an uninterrupted run: SCAFFOLD over
    12 clients, 3 a round, so the client-state store on disk holds states of rounds the kill may cut."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ["--fed_alg", "scaffold", "--num_rounds", 3, "--checkpoint_step", 1, "--max_steps", 3,
            "--synthetic_num_clients", 12, "--sample_clients", 3]
    run_entry(main_sft, tiny_args(tiny_model_dir, full, *args))
    command = [sys.executable, str(ROOT / "main_sft.py"), *map(str, tiny_args(tiny_model_dir, killed, *args))]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-1" / "run_state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoint-3").exists(), "the run finished before it could be killed"
    run_entry(main_sft, tiny_args(tiny_model_dir, killed, *args, "--resume", "true"))
    a, b = adapter(full / "checkpoint-3"), adapter(killed / "checkpoint-3")
    assert all(torch.equal(a[k], b[k]) for k in a)
    from federated.checkpoint import latest_good_checkpoint
    stores = [latest_good_checkpoint(out)[1].client_store for out in (full, killed)]
    assert sorted(stores[0]) == sorted(stores[1]) and len(stores[0]) >= 3
    assert all(torch.equal(stores[0][k]["c"], stores[1][k]["c"]) for k in stores[0])


def test_nan_client_is_dropped_and_the_run_goes_on(tiny_model_dir, tmp_path):
    out = tmp_path / "nan"
    run_entry(main_sft, tiny_args(tiny_model_dir, out, "--learning_rate", 1e38, "--max_steps", 3, "--num_rounds", 1))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["dropped_clients"] == row["clients"]
    assert all(torch.isfinite(t).all() for t in adapter(out / "checkpoint-1").values())


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.mark.parametrize("payload,message", [
    (None, "does not exist"),
    ("{oops", "is not valid JSON"),
    # JSON keeps the last of two equal keys: client c0's first samples would be dropped without a word.
    ('{"c0": [{"instruction": "a", "response": "b"}], "c1": [{"instruction": "c", "response": "d"}], '
     '"c0": [{"instruction": "e", "response": "f"}]}', "holds client id 'c0' more than once"),
    ({"u1": "not a list"}, "must be one JSON object mapping client id to a list"),  # a plain list is one client
    ({"u1": [{"instruction": "a"}]}, "client 'u1', sample 0 lacks 'response'"),
    ({"u1": [{"instruction": "a", "response": "b"}], "u2": []}, "client 'u2' has no samples"),
])
def test_bad_dataset_files(payload, message, tiny_model_dir, tmp_path, capsys):
    file = tmp_path / "data.json"
    if isinstance(payload, str):
        file.write_text(payload)
    elif payload is not None:
        write_json(file, payload)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message):
        run_entry(main_sft, tiny_args(tiny_model_dir, out, "--local_data_dir", file))
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("extra,message", [
    (["--fed_alg", "fedsgd"], "Unknown --fed_alg 'fedsgd': choose one of fedavg, fedprox, scaffold"),
    (["--fed_alg", "local9"], "client index 9 is out of range"),
    (["--dataset", "fed-nothing"], "Unknown --dataset 'fed-nothing'"),
    (["--template", "llama3"], "Unknown --template 'llama3'"),
    (["--num_clients", 9], "--num_clients 9 exceeds the 4 clients"),
    (["--num_rounds", 0], "--num_rounds 0 is invalid: it must be an integer > 0"),
    (["--sample_clients", -1], "--sample_clients -1 is invalid"),
    (["--num_clients", 0], "--num_clients 0 is invalid"),
    (["--max_steps", 0], "--max_steps 0 is invalid"),
    (["--batch_size", 0], "--batch_size 0 is invalid"),
    (["--seq_length", 0], "--seq_length 0 is invalid"),
    (["--checkpoint_step", 0], "--checkpoint_step 0 is invalid"),
    (["--learning_rate", "nan"], "--learning_rate nan is invalid: it must be a finite number > 0"),
    (["--learning_rate", "inf"], "--learning_rate inf is invalid"),
    (["--learning_rate", 0], "--learning_rate 0.0 is invalid"),
    (["--fedopt_beta2", 1], "--fedopt_beta2 1.0 is invalid: it must be a finite number >= 0 and < 1"),
    (["--load_in_8bit", "true", "--load_in_4bit", "true"], "exclude each other"),
    (["--dp_epsilon", 0], "--dp_epsilon 0.0 is invalid"),
    (["--dp_mode", "clip", "--dp_target_epsilon", 1e-6, "--num_rounds", 100],
     "--dp_target_epsilon 1e-06 cannot be met"),
    (["--fed_alg", "fedavg", "--fedopt_variant", "reddi"], "no adaptive server step"),
    (["--resume", "true", "--overwrite_output_dir", "true"], "contradict each other"),
    (["--peft_lora_dropout", 1.5], "--peft_lora_dropout 1.5 is invalid: it must be a finite number >= 0 and < 1"),
    (["--peft_lora_dropout", -0.1], "--peft_lora_dropout -0.1 is invalid"),
    (["--token_budget", -5], "--token_budget -5 is invalid: it must be an integer > 0"),
    (["--token_budget", 0], "--token_budget 0 is invalid"),
])
def test_bad_arguments_fail_before_loading(extra, message, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message):
        run_entry(main_sft, tiny_args("/nonexistent/model", out, *extra))
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("model, extra, message", [
    ("/nonexistent/model", [], "Model folder /nonexistent/model does not exist"),
    ("./no/such/model", [], "Model folder ./no/such/model does not exist"),
    (None, ["--seq_length", 10_000_000], "--seq_length 10000000 exceeds the 512 positions of model"),
])
def test_a_model_that_is_not_there_or_too_short_fails_in_one_line_before_loading(model, extra, message,
                                                                                 tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message):
        run_entry(main_sft, tiny_args(model or tiny_model_dir, out, *extra))
    assert not (out / "metrics.jsonl").exists()


def test_non_utf8_file_is_named_with_its_byte_offset(tmp_path):
    file = tmp_path / "latin1.json"
    file.write_bytes('{"u1": [{"instruction": "caf'.encode() + b"\xe9" + b'", "response": "b"}]}')
    with pytest.raises(SystemExit, match=rf"Local data file {file} is not UTF-8: byte offset 28 \(0xe9\)"):
        run_entry(main_sft, tiny_args("/nonexistent/model", tmp_path / "out", "--local_data_dir", file))


def test_a_local_file_is_named_as_a_file_in_messages(tmp_path):
    file = write_json(tmp_path / "data.json", {"u1": [{"instruction": "a", "response": "b"}], "u2": []})
    with pytest.raises(SystemExit, match=rf"^Local file {file}: client 'u2' has no samples"):
        run_entry(main_sft, tiny_args("/nonexistent/model", tmp_path / "out", "--local_data_dir", file))


def test_prompts_that_fill_seq_length_are_dropped_and_a_client_left_empty_is_refused(tiny_model_dir, tmp_path, caplog):
    long = "word " * 80  # far more than --seq_length 64 tokens of prompt
    ok = [{"instruction": f"Say {i}", "response": str(i)} for i in range(4)]
    file = write_json(tmp_path / "fed.json", {"a": ok + [{"instruction": long, "response": "x"}] * 2, "b": ok})
    out = tmp_path / "out"
    run_entry(main_sft, tiny_args(tiny_model_dir, out, "--local_data_dir", file, "--num_rounds", 1))
    assert "2 samples of 1 clients have a prompt that fills --seq_length 64" in caplog.text
    assert "a: 2" in caplog.text and all(v > 0 for v in json.loads(
        (out / "metrics.jsonl").read_text())["client_loss"].values())
    file = write_json(tmp_path / "fed2.json", {"a": ok, "b": [{"instruction": long, "response": "x"}]})
    with pytest.raises(SystemExit, match="Client 'b' \\(and 0 more\\) has no sample whose response fits"):
        run_entry(main_sft, tiny_args(tiny_model_dir, tmp_path / "out2", "--local_data_dir", file))
    assert not (tmp_path / "out2" / "metrics.jsonl").exists()


def test_output_dir_guards_before_the_model_loads(tiny_model_dir, tmp_path):
    """Another run's checkpoints refuse a new run; --resume with another method or DP mode is refused with the
    differences; more rounds are accepted; --overwrite_output_dir starts anew. All before any model loads."""
    out = tmp_path / "run"
    run_entry(main_sft, tiny_args(tiny_model_dir, out, "--num_rounds", 1))
    with pytest.raises(SystemExit, match="holds checkpoints of an earlier run: pass --resume true"):
        run_entry(main_sft, tiny_args("/nonexistent/model", out, "--fed_alg", "fedprox"))
    with pytest.raises(SystemExit, match=r'fed_alg: "fedavg" -> "fedprox"'):
        run_entry(main_sft, tiny_args("/nonexistent/model", out, "--fed_alg", "fedprox", "--resume", "true"))
    with pytest.raises(SystemExit, match=r'dp_mode: null -> "clip"'):
        run_entry(main_sft, tiny_args("/nonexistent/model", out, "--dp_mode", "clip", "--dp_noise_multiplier", 1,
                                      "--resume", "true"))
    assert json.loads((out / "args.json").read_text())["fed_alg"] == "fedavg"  # nothing overwritten
    run_entry(main_sft, tiny_args(tiny_model_dir, out, "--num_rounds", 2, "--resume", "true"))
    assert [json.loads(r)["round"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    run_entry(main_sft, tiny_args(tiny_model_dir, out, "--num_rounds", 1, "--overwrite_output_dir", "true"))
    assert not (out / "checkpoint-2").exists() and (out / "checkpoint-1").exists()


def test_resume_skips_a_corrupt_checkpoint_and_rebuilds_torn_metrics(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    full, broken = tmp_path / "full", tmp_path / "broken"
    args = ["--fed_alg", "fedavgm", "--num_rounds", 3, "--checkpoint_step", 1]
    run_entry(main_sft, tiny_args(tiny_model_dir, full, *args))
    shutil.copytree(full, broken)
    adapter_file = broken / "checkpoint-3" / "adapter_model.safetensors"
    adapter_file.write_bytes(adapter_file.read_bytes()[:-7])  # truncated, as by a full disk
    (broken / "checkpoint-3.tmp").mkdir()  # left by a kill during a checkpoint write
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    (broken / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:20])  # torn in round 2
    run_entry(main_sft, tiny_args(tiny_model_dir, broken, *args, "--resume", "true"))
    assert "Skipping" in caplog.text and "adapter_model.safetensors does not match its checksum" in caplog.text
    assert "Resuming from" in caplog.text and "checkpoint-2 (round 2)" in caplog.text
    assert not (broken / "checkpoint-3.tmp").exists()
    rows = [json.loads(r) for r in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3] and rows[1]["rebuilt_from_checkpoint"]
    assert rows[1]["clients"] == json.loads((full / "metrics.jsonl").read_text().splitlines()[1])["clients"]
    a, b = adapter(full / "checkpoint-3"), adapter(broken / "checkpoint-3")
    assert all(torch.equal(a[k], b[k]) for k in a)  # round 3 redone from checkpoint-2: the same result


def test_released_file_and_sample_clients_clamp(tiny_model_dir, tmp_path, caplog):
    data = {"alice": [{"instruction": f"Say {i}", "response": str(i)} for i in range(5)],
            "bob": [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}] * 3}
    data["bob"] = [{"instruction": "Greet", "response": "Hello"}] * 3
    file = write_json(tmp_path / "fed.json", data)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="federated.setup"):
        run_entry(main_sft, tiny_args(tiny_model_dir, out, "--local_data_dir", file, "--sample_clients", 5,
                                      "--num_rounds", 1))
    assert "--sample_clients 5 > --num_clients 2: sampling all 2 clients" in caplog.text
    row = json.loads((out / "metrics.jsonl").read_text())
    assert row["clients"] == [0, 1]


def test_multiturn_released_file_trains_with_vicuna(tiny_model_dir, tmp_path):
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]
    file = write_json(tmp_path / "mt.json", {"a": [{"conversations": conv}] * 4, "b": [{"conversations": conv}] * 2})
    out = tmp_path / "out"
    run_entry(main_sft, tiny_args(tiny_model_dir, out, "--local_data_dir", file, "--template", "vicuna_v1.1",
                                  "--num_rounds", 1))
    assert (out / "checkpoint-1" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_smollm2_fed_synthetic_end_to_end(tmp_path):
    """The real embedded model on fed-synthetic: loss falls over rounds and the exact-match score is written, on
    4 held-out samples of each of the 12 tasks (the whole held-out set, 240 answers, took most of the test's time)."""
    out = tmp_path / "smol"
    run_entry(main_sft, ["--output_dir", out, "--num_rounds", 3, "--sample_clients", 2, "--max_steps", 3,
                         "--batch_size", 4, "--seq_length", 96, "--learning_rate", 5e-4, "--synthetic_num_clients", 6,
                         "--eval_per_task", 4])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = (np.mean(list(r["client_loss"].values())) for r in (rows[0], rows[-1]))
    assert last < first
    scores = json.loads((out / "eval_exact_match.json").read_text())
    assert scores["n"] == 48 and 0.0 <= scores["accuracy"] <= 1.0


def test_client_groups_train_one_federation_per_language_family(tiny_model_dir, tmp_path, monkeypatch):
    """--client_groups similar_language on fed-aya-similar built from a source the test writes: English and German
    federate together, Spanish alone, Telugu in none, each group in its own output folder with its own clients."""
    import datasets
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "cache"))
    speakers = {"English": "eng", "German": "deu", "Spanish": "spa", "Telugu": "tel"}
    rows = [{"inputs": f"{language} question {j}", "targets": f"answer {j}", "language": language,
             "language_code": code, "annotation_type": "original-annotations", "user_id": f"annotator-{code}"}
            for language, code in speakers.items() for j in range(100)]  # 100: Fed-Aya's client threshold
    from data.fedllm_bench import AYA_SIMILAR  # every asked-for language needs a row: one each, below the threshold
    rows += [{**rows[0], "language": language, "user_id": "annotator-few"}
             for language in AYA_SIMILAR.params["languages"] if language not in speakers]
    source = tmp_path / "aya.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(source))
    (tmp_path / "eval" / "ref_gpt4").mkdir(parents=True)
    (tmp_path / "eval" / "ref_gpt4" / "aya_testset.json").write_text("{}")  # nothing to remove as leakage
    out = tmp_path / "groups"
    run_entry(main_sft, tiny_args(tiny_model_dir, out, "--dataset", "fed-aya-similar", "--source_path", source,
                                  "--eval_data_dir", tmp_path / "eval", "--client_groups", "similar_language",
                                  "--num_rounds", 1, "--max_steps", 1))
    groups = {p.name: json.loads((p / "args.json").read_text()) for p in out.glob("group-*")}
    assert {name: args["num_clients"] for name, args in groups.items()} == \
        {"group-english-german": 2, "group-romance": 1}
    for name in groups:
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 1 and (out / name / "checkpoint-1" / "adapter_model.safetensors").exists()
        assert np.load(out / name / "training_loss.npy").shape == (groups[name]["num_clients"], 1)
