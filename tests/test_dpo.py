"""main_dpo.py end to end on a tiny random Llama (fast) and on the real SmolLM2 (slow): every method, exact resume,
dynamic local steps in the Fed-ChatbotPA setting (10 of 747 clients) with flat server memory, bad inputs, and
the preference evaluation."""
import gc
import json
import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import federated.loop
from federated.client_store import ClientStore
import main_dpo
from conftest import run_entry
from data import load_federated_dataset
from evaluation import preference
from utils.preference import pair_texts, tokenize_pair

METHODS = ["fedavg", "fedprox", "scaffold", "fedavgm", "fedadagrad", "fedyogi", "fedadam", "local0"]
LN2 = math.log(2)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_args(model_dir, out, *extra):
    # 96 tokens hold the alpaca prompt and both answers of every fed-synthetic-pref pair.
    return ["--model_name_or_path", model_dir, "--output_dir", out, "--synthetic_num_clients", 4,
            "--synthetic_mean_samples", 16, "--sample_clients", 2, "--num_rounds", 2, "--max_steps", 1,
            "--batch_size", 2, "--seq_length", 96, "--learning_rate", 1e-3, "--eval_after", "false", *extra]


def adapter(path) -> dict:
    return load_file(path / "adapter_model.safetensors")


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_round_run(tiny_model_dir, tmp_path_factory):
    """Each method's 2-round run, done once and shared by the tests that inspect it."""
    done = {}

    def run(method):
        if method not in done:
            out = tmp_path_factory.mktemp(method)
            extra = ["--eval_after", "true", "--eval_per_task", 5] if method == "fedavg" else []
            run_entry(main_dpo, tiny_args(tiny_model_dir, out, "--fed_alg", method, *extra))
            done[method] = out
        return done[method]
    return run


@pytest.mark.parametrize("method", METHODS)
def test_two_rounds_every_method(method, two_round_run, tiny_model_dir):
    out = two_round_run(method)
    rows = metrics(out)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        if method == "local0":
            assert row["clients"] == [0]
        else:
            assert len(row["clients"]) == 2
        assert all(np.isfinite(v) and v > 0 for v in row["client_loss"].values())
        assert row["dropped_clients"] == [] and row["bytes_uploaded"] > 0
    assert rows[0]["learning_rate"] == 1e-3 and rows[1]["learning_rate"] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert np.load(out / "training_loss.npy").shape == (4, 2)
    # One adapter is saved (trl's "ref" copy was dropped) and it moved away from LoRA's initial B = 0.
    checkpoint = out / "checkpoint-2"
    assert not (checkpoint / "ref").exists()
    lora_b = [t for k, t in adapter(checkpoint).items() if "lora_B" in k]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)
    args = json.loads((out / "args.json").read_text())
    assert args["fed_alg"] == method and args["dpo_beta"] == 0.1 and args["dataset"] == "fed-synthetic-pref"
    state = load_file(checkpoint / "run_state.safetensors")
    if method == "scaffold":
        manifest = json.loads((checkpoint / "run_state.json").read_text())["client_store"]
        stored = ClientStore.restore(out / "client_state", manifest)  # every sampled client's c_i, on disk
        assert "server/c" in state and sorted(stored) == sorted(set(rows[0]["clients"] + rows[1]["clients"]))
    if method in ("fedavgm", "fedadagrad", "fedyogi", "fedadam"):
        assert "server/m" in state


def test_in_run_evaluation_matches_the_cli(two_round_run):
    """main_dpo's --eval_after and `python -m evaluation.preference --checkpoint` score the same adapter alike."""
    out = two_round_run("fedavg")
    in_run = json.loads((out / "eval_preference.json").read_text())
    cli = preference.main(["--checkpoint", str(out / "checkpoint-2"), "--per_task", "5"])
    assert in_run["n"] == cli["n"] == 60 and set(cli["per_task"]) == set(in_run["per_task"])
    for key in ("preference_accuracy", "mean_margin", "logprob_accuracy", "base_logprob_accuracy"):
        assert cli[key] == pytest.approx(in_run[key], abs=1e-5)
    assert cli["mean_margin"] != 0.0


def test_resume_is_bit_identical(two_round_run, tiny_model_dir, tmp_path):
    """Stop after round 1 (a run of num_rounds 1), --resume to round 2: SCAFFOLD's global model, server control
    and per-client controls equal those of the uninterrupted 2-round run, bit for bit."""
    full, resumed = two_round_run("scaffold"), tmp_path / "resumed"
    run_entry(main_dpo, tiny_args(tiny_model_dir, resumed, "--fed_alg", "scaffold", "--num_rounds", 1))
    run_entry(main_dpo, tiny_args(tiny_model_dir, resumed, "--fed_alg", "scaffold", "--resume", "true"))
    a, b = adapter(full / "checkpoint-2"), adapter(resumed / "checkpoint-2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (load_file(d / "checkpoint-2" / "run_state.safetensors") for d in (full, resumed))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if k != "torch_rng")
    assert [r["client_loss"] for r in metrics(full)] == [r["client_loss"] for r in metrics(resumed)]


def test_fed_chatbotpa_setting_dynamic_steps_and_flat_server_memory(tiny_model_dir, tmp_path, monkeypatch):
    """10 of 747 clients per round with --dynamic_local_step, from a released-format file. Local steps follow
    ceil(3 n / p / (bs ga)), p = rounds * sampled / clients; the live tensors at each server step (sampled
    clients' vectors, global vector, model, optimizer) do not grow from round to round, and the checkpointed
    run state holds no per-client tensors."""
    pairs = [p for c in load_federated_dataset("fed-synthetic-pref", synthetic_num_clients=8).clients for p in c]
    sizes = [1 + k % 3 for k in range(747)]
    rng = random.Random(0)
    file = tmp_path / "fed_747.json"
    file.write_text(json.dumps({f"user_{k}": rng.sample(pairs, n) for k, n in enumerate(sizes)}))

    live = []

    def measuring_server_step(*args, **kwargs):
        gc.unfreeze()  # the loop freezes long-lived objects, which get_objects() would not list
        gc.collect()
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
        gc.freeze()
        live.append((sum(t.numel() * t.element_size() for t in tensors), len(tensors)))
        return server_step(*args, **kwargs)

    server_step = federated.loop.server_step
    monkeypatch.setattr(federated.loop, "server_step", measuring_server_step)
    out = tmp_path / "out"
    # A batch larger than any client: each local step takes all of a client's pairs, so steps stay cheap.
    batch_size, rounds, sampled = 256, 2, 10
    run_entry(main_dpo, tiny_args(tiny_model_dir, out, "--local_data_dir", file, "--sample_clients", sampled,
                                  "--num_rounds", rounds, "--batch_size", batch_size, "--dynamic_local_step", "true"))
    p = rounds * sampled / 747
    for row in metrics(out):
        assert len(row["clients"]) == sampled
        expected = {str(k): math.ceil(sizes[k] * 3 / p / batch_size) for k in row["clients"]}
        assert row["local_steps"] == expected
    assert len({s for r in metrics(out) for s in r["local_steps"].values()}) > 1  # the formula is exercised
    (bytes_1, count_1), (bytes_2, count_2) = live
    assert count_2 <= count_1 and bytes_2 <= bytes_1 * 1.01, f"live tensors grew: {live}"
    state = load_file(out / "checkpoint-2" / "run_state.safetensors")
    assert not any(k.startswith("client/") for k in state)


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


GOOD = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}


@pytest.mark.parametrize("bad,message", [
    ({"chosen": "4", "rejected": "5"}, "client 'bob', sample 1 lacks 'prompt'"),
    ({"prompt": "2 + 2?", "rejected": "5"}, "client 'bob', sample 1 lacks 'chosen'"),
    ({"prompt": "2 + 2?", "chosen": "4"}, "client 'bob', sample 1 lacks 'rejected'"),
    ({"prompt": "2 + 2?", "chosen": "4", "rejected": "4"}, "client 'bob', sample 1 has chosen == rejected"),
])
def test_bad_pairs_name_the_client(bad, message, tmp_path):
    file = write_json(tmp_path / "pref.json", {"alice": [GOOD], "bob": [GOOD, bad]})
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message):
        run_entry(main_dpo, tiny_args("/nonexistent/model", out, "--local_data_dir", file))
    assert not (out / "metrics.jsonl").exists()


def test_a_file_without_pairs_is_read_as_pairs_and_refused(tmp_path):
    """Kind comes from the entry script, not from the first sample: an SFT file gets the pair keys it lacks."""
    file = write_json(tmp_path / "sft.json", {"carol": [{"instruction": "a", "response": "b"}]})
    with pytest.raises(SystemExit, match="client 'carol', sample 0 lacks 'prompt', 'chosen', 'rejected'"):
        run_entry(main_dpo, tiny_args("/nonexistent/model", tmp_path / "out", "--local_data_dir", file))


@pytest.mark.parametrize("extra,message", [
    (["--dataset", "fed-synthetic"], "holds sft samples, which main_dpo.py does not train: use main_sft.py"),
    (["--fed_alg", "fedsgd"], "Unknown --fed_alg 'fedsgd'"),
    (["--fed_alg", "local4"], "client index 4 is out of range"),
])
def test_bad_arguments_fail_before_loading(extra, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        run_entry(main_dpo, tiny_args("/nonexistent/model", tmp_path / "out", *extra))


def test_fed_synthetic_pref_pairs():
    ds = load_federated_dataset("fed-synthetic-pref", synthetic_num_clients=6)
    sft = load_federated_dataset("fed-synthetic", synthetic_num_clients=6)
    assert ds.kind == "preference" and ds.sample_counts == sft.sample_counts and len(ds.test) == 240
    for client, sft_client in zip(ds.clients, sft.clients):
        assert [p["prompt"] for p in client] == [s["instruction"] for s in sft_client]
        assert [p["chosen"] for p in client] == [s["response"] for s in sft_client]
    assert all(p["chosen"] != p["rejected"] for c in [*ds.clients, ds.test] for p in c)
    held_out = {p["prompt"] for p in ds.test}
    assert not any(p["prompt"] in held_out for c in ds.clients for p in c)


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_pairs_tokenise_as_prompt_then_answer(template, smol_tokenizer):
    tok = smol_tokenizer
    sample = {"prompt": "Spell the word 'tiger' backwards.", "chosen": "regit", "rejected": "tiger"}
    texts = pair_texts(template, tok, sample)
    ids = tokenize_pair(tok, template, sample)
    assert tok.decode(ids["prompt_ids"]) == texts["prompt"]
    assert ids["prompt_ids"] + ids["chosen_ids"] == tok(texts["prompt"] + texts["chosen"])["input_ids"]
    assert ids["prompt_ids"] + ids["rejected_ids"] == tok(texts["prompt"] + texts["rejected"])["input_ids"]
    assert tok.eos_token_id in ids["chosen_ids"] and tok.eos_token_id in ids["rejected_ids"]


def test_padded_batch_log_probs_match_one_pair_at_a_time(tiny_model_dir, smol_tokenizer):
    """The evaluation's batched, padded log-probabilities equal a plain per-pair computation."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pairs = load_federated_dataset("fed-synthetic-pref", synthetic_num_clients=2).test[::40]
    lp = preference.pair_log_probs(model, smol_tokenizer, "alpaca", pairs, max_length=None, batch_size=4)
    for i, pair in enumerate(pairs):
        ids = tokenize_pair(smol_tokenizer, "alpaca", pair)
        for key in ("chosen", "rejected"):
            seq = torch.tensor([ids["prompt_ids"] + ids[f"{key}_ids"]])
            with torch.no_grad():
                logps = torch.log_softmax(model(input_ids=seq).logits[0, :-1].float(), -1)
            answer = range(len(ids["prompt_ids"]) - 1, seq.shape[1] - 1)
            expected = sum(logps[t, seq[0, t + 1]] for t in answer)
            assert lp[key][i] == pytest.approx(float(expected), abs=1e-3)
            assert lp[f"ref_{key}"][i] == lp[key][i]  # no adapter: the model is its own reference
    scores = preference.score_preferences(model, smol_tokenizer, "alpaca", pairs)
    assert scores["mean_margin"] == 0 and scores["preference_accuracy"] == 0
    assert scores["dpo_loss"] == pytest.approx(LN2)


@pytest.mark.slow
def test_smollm2_dpo_loss_falls(tmp_path):
    """The real SmolLM2 on fed-synthetic-pref: the DPO loss on the clients' training pairs starts at ln 2 (the
    adapter starts as the reference) and falls over the rounds."""
    out = tmp_path / "smol"
    run_entry(main_dpo, ["--output_dir", out, "--fed_alg", "fedavg", "--synthetic_num_clients", 4,
                         "--sample_clients", 2, "--num_rounds", 3, "--max_steps", 2, "--batch_size", 2,
                         "--seq_length", 96, "--learning_rate", 5e-4, "--eval_after", "false"])
    rows = metrics(out)
    first, last = (np.mean(list(r["client_loss"].values())) for r in (rows[0], rows[-1]))
    assert last < first < LN2 + 1e-3
    # Scored afresh with the final adapter: the first pairs of every client, against the base model.
    from peft import PeftModel
    from utils.model import load_base_model, load_tokenizer
    tokenizer = load_tokenizer("smollm2")
    model = PeftModel.from_pretrained(load_base_model("smollm2"), out / "checkpoint-3")
    train_pairs = [p for c in load_federated_dataset("fed-synthetic-pref", synthetic_num_clients=4).clients
                   for p in c[:8]]
    scores = preference.score_preferences(model, tokenizer, "alpaca", train_pairs, max_length=96)
    assert scores["dpo_loss"] < LN2 - 0.01 and scores["mean_margin"] > 0

