"""Padding-free local training against the padded path: the same per-sample losses, the same step loss and the
same LoRA gradient (fp32, CPU), for single-turn and multi-turn SFT and for DPO pairs, with samples cut at
--seq_length; token-budget micro-batches give the step gradient of one batch; a 2-round federated run ends with
the same adapter on both paths."""
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import main_dpo
import main_sft
from conftest import run_entry
from federated import batching
from federated.batching import PreferenceBatches, SFTBatches, micro_batches, pack_rows
from federated.config import ScriptArguments
from utils.model import load_base_model, tiny_llama, wrap_with_lora
from utils.preference import pair_texts

pytestmark = pytest.mark.usefixtures("one_thread")
SEQ_LENGTH = 96
WORDS = "alpha beta gamma delta river stone cloud seven apple window orange quiet seven bright".split()
RTOL = 1e-5


def words(rng, low, high):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def sft_samples(kind: str, n: int = 6):
    rng = random.Random(n)
    if kind == "alpaca":
        return [{"instruction": words(rng, 1, 10), "response": words(rng, 1, 70)} for _ in range(n)]
    def turns():
        return [{"from": f, "value": words(rng, 1, 12)} for _ in range(rng.randint(1, 4)) for f in ("human", "gpt")]
    return [{"conversations": turns()} for _ in range(n)]


def pref_samples(n: int = 5):
    rng = random.Random(n)
    # Every other pair has short answers, which packing can put two to a row.
    return [{"prompt": words(rng, 1, 10), "chosen": words(rng, *((20, 70) if i % 2 else (1, 6))),
             "rejected": words(rng, *((20, 70) if i % 2 else (1, 6)))} for i in range(n)]


def lora_model(tokenizer, base: str):
    """LoRA without dropout (both paths must draw the same masks) and with B != 0, so that A has a gradient."""
    model = tiny_llama(tokenizer) if base == "tiny" else load_base_model("smollm2", dtype=torch.float32)
    model = wrap_with_lora(model, dropout=0.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model


def script_args(tmp_path, batch_size):
    return ScriptArguments(model_name_or_path="unused", batch_size=batch_size, seq_length=SEQ_LENGTH,
                           output_dir=str(tmp_path))


def sft_trainer(model, tokenizer, args):
    from datasets import Dataset
    return main_sft.build_sft_trainer(model, tokenizer, args, Dataset.from_list([{"input_ids": [1], "labels": [1]}]))


def sequence_logps(model, inputs: dict, packed: bool, labels: torch.Tensor) -> torch.Tensor:
    """Sum of each sequence's label log-probabilities, from the model's fused per-token log-probs."""
    forward = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
    forward["labels"] = labels
    with torch.no_grad():
        per_token = model(**forward, use_cache=False, fused_lm_head=True).log_probs
    if not packed:
        return per_token.sum(1)
    owner = inputs["sequence_index"][:, 1:].reshape(-1)
    keep = owner >= 0
    return per_token.new_zeros(int(owner.max()) + 1).index_add(0, owner[keep], per_token.reshape(-1)[keep])


def step_gradient(kind, trainer, model, samples, packed: bool, groups=None) -> tuple[float, torch.Tensor]:
    """The step loss and LoRA gradient as LocalTrainer computes them, over the given micro-batch groups."""
    model.zero_grad(set_to_none=True)
    normaliser, total = kind.normaliser(samples), 0.0
    for group in groups or [list(range(len(samples)))]:
        micro = [samples[i] for i in group]
        loss = kind.loss(trainer, model, kind.collate(micro, packed), micro, normaliser, packed)
        loss.backward()
        total += loss.item()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    return total, grad.clone()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_paths_agree(kind, trainer, model, samples, labels_of):
    padded, packed = kind.collate(samples, False), kind.collate(samples, True)
    assert int((packed["sequence_index"] >= 0).sum()) == sum(kind.length(s) for s in samples)
    assert padded["input_ids"].numel() > packed["input_ids"].numel()  # the batch has padding to save
    per_padded = sequence_logps(model, padded, False, labels_of(padded))
    per_packed = sequence_logps(model, packed, True, packed["labels"])
    torch.testing.assert_close(per_packed, per_padded, rtol=RTOL, atol=0)
    loss_padded, grad_padded = step_gradient(kind, trainer, model, samples, False)
    loss_packed, grad_packed = step_gradient(kind, trainer, model, samples, True)
    assert abs(loss_packed - loss_padded) <= RTOL * abs(loss_padded)
    assert grad_padded.norm() > 0 and relative(grad_packed, grad_padded) <= RTOL
    return per_padded


@pytest.fixture(scope="module")
def tiny_sft(tokenizer, tmp_path_factory):
    model = lora_model(tokenizer, "tiny")
    args = script_args(tmp_path_factory.mktemp("sft"), 6)
    return model, sft_trainer(model, tokenizer, args)


def check_sft(tokenizer, model, trainer, template):
    data = main_sft.tokenize_clients([sft_samples(template)], tokenizer, template, SEQ_LENGTH)[0]
    samples = [data[i] for i in range(len(data))]
    assert max(len(s["input_ids"]) for s in samples) == SEQ_LENGTH, "no sample reaches --seq_length"
    kind = SFTBatches(trainer)
    per_sequence = assert_paths_agree(kind, trainer, model, samples, lambda inputs: inputs["labels"])
    # Per-sample loss: the mean negative log-likelihood over the sample's predicted response tokens.
    counts = torch.tensor([kind.normaliser([s]) for s in samples], dtype=torch.float32)
    assert (counts > 0).all() and torch.isfinite(-per_sequence / counts).all()


@pytest.mark.parametrize("template", ["alpaca", "vicuna_v1.1"])
@pytest.mark.parametrize("attention,one_row", [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_sft_padding_free_matches_padded_tiny(template, attention, one_row, tokenizer, tiny_sft, monkeypatch):
    """Rows as long as the longest sample (mask-based attention), or one row (what flash attention gets)."""
    monkeypatch.setattr(batching, "varlen_attention", lambda model: one_row)
    model, trainer = tiny_sft
    model.set_attn_implementation(attention)
    try:
        check_sft(tokenizer, model, trainer, template)
    finally:
        model.set_attn_implementation("sdpa")


def check_dpo(tokenizer, model, trainer):
    data = main_dpo.tokenize_clients([pref_samples()], tokenizer, "alpaca", SEQ_LENGTH)[0]
    samples = [data[i] for i in range(len(data))]
    kind = PreferenceBatches(trainer)
    assert kind.packable
    lengths = [len(s["prompt_ids"]) + max(len(s["chosen_ids"]), len(s["rejected_ids"])) for s in samples]
    assert max(lengths) > SEQ_LENGTH, "no pair is cut at --seq_length"

    def labels_of(inputs):  # trl's DPO labels: the answer tokens
        return inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    assert_paths_agree(kind, trainer, model, samples, labels_of)


@pytest.fixture(scope="module")
def tiny_dpo(tokenizer, tmp_path_factory):
    model = lora_model(tokenizer, "tiny")
    args = script_args(tmp_path_factory.mktemp("dpo"), 5)
    trainer = main_dpo.build_dpo_trainer(model, tokenizer, args, main_dpo.DPOArguments(),
                                         pair_texts("alpaca", tokenizer, pref_samples()[0]))
    return model, trainer


def test_dpo_padding_free_matches_padded_tiny(tokenizer, tiny_dpo):
    check_dpo(tokenizer, *tiny_dpo)


@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_micro_batches_give_the_step_gradient(packed, tokenizer, tiny_sft, tiny_dpo):
    model, trainer = tiny_sft
    data = main_sft.tokenize_clients([sft_samples("alpaca", 8)], tokenizer, "alpaca", SEQ_LENGTH)[0]
    kind = SFTBatches(trainer)
    samples = [data[i] for i in range(len(data))]
    costs = [kind.length(s) if packed else kind.padded_cost(s) for s in samples]
    groups = micro_batches(costs, len(samples), token_budget=200, packed=packed)
    assert len(groups) > 2 and sorted(i for g in groups for i in g) == list(range(len(samples)))
    loss_one, grad_one = step_gradient(kind, trainer, model, samples, packed)
    loss_split, grad_split = step_gradient(kind, trainer, model, samples, packed, groups)
    assert abs(loss_split - loss_one) <= RTOL * loss_one and relative(grad_split, grad_one) <= RTOL
    model, trainer = tiny_dpo
    kind = PreferenceBatches(trainer)
    pairs = main_dpo.tokenize_clients([pref_samples(6)], tokenizer, "alpaca", SEQ_LENGTH)[0]
    pairs = [pairs[i] for i in range(len(pairs))]
    groups = micro_batches([kind.length(s) if packed else kind.padded_cost(s) for s in pairs], 6, 300, packed)
    assert len(groups) > 1
    loss_one, grad_one = step_gradient(kind, trainer, model, pairs, packed)
    loss_split, grad_split = step_gradient(kind, trainer, model, pairs, packed, groups)
    assert abs(loss_split - loss_one) <= RTOL * loss_one and relative(grad_split, grad_one) <= RTOL


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([3, 5, 2, 4, 1], None) == [[0, 1, 2, 3, 4]]
    assert pack_rows([3, 5, 2, 4, 1], 5) == [[1], [3, 4], [0, 2]]


def test_micro_batches_by_count_and_by_budget():
    assert micro_batches([5, 5, 5, 5, 5], 2, None, True) == [[0, 1], [2, 3], [4]]
    # Packed: sums up to the budget; a sample over the budget stands alone.
    assert micro_batches([4, 3, 2, 12, 1, 1], 99, 9, True) == [[0, 1, 2], [3], [4, 5]]
    # Padded: count x longest.
    assert micro_batches([4, 3, 2, 5], 99, 9, False) == [[0, 1], [2], [3]]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["alpaca", "vicuna_v1.1", "dpo"])
def test_padding_free_matches_padded_smollm2(task, tokenizer, tmp_path):
    """The real SmolLM2 in fp32 on the CPU."""
    model = lora_model(tokenizer, "smollm2")
    if task == "dpo":
        trainer = main_dpo.build_dpo_trainer(model, tokenizer, script_args(tmp_path, 5), main_dpo.DPOArguments(),
                                             pair_texts("alpaca", tokenizer, pref_samples()[0]))
        check_dpo(tokenizer, model, trainer)
    else:
        check_sft(tokenizer, model, sft_trainer(model, tokenizer, script_args(tmp_path, 6)), task)


def adapter(out) -> dict:
    return load_file(out / "checkpoint-2" / "adapter_model.safetensors")


@pytest.mark.parametrize("entry", ["sft", "dpo"])
def test_two_round_run_gives_the_same_adapter_on_both_paths(entry, tiny_model_dir, tmp_path):
    module = main_sft if entry == "sft" else main_dpo
    adapters = {}
    for padding_free in ("true", "false"):
        out = tmp_path / padding_free
        run_entry(module, ["--model_name_or_path", tiny_model_dir, "--output_dir", out, "--synthetic_num_clients", 4,
                           "--synthetic_mean_samples", 16, "--sample_clients", 2, "--num_rounds", 2,
                           "--max_steps", 2, "--batch_size", 4, "--seq_length", 64, "--learning_rate", 1e-3,
                           "--eval_after", "false", "--peft_lora_dropout", 0, "--padding_free", padding_free])
        adapters[padding_free] = adapter(out)
        rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(np.isfinite(v) for r in rows for v in r["client_loss"].values())
    packed, padded = adapters["true"], adapters["false"]
    assert packed.keys() == padded.keys()
    moved = [k for k in padded if "lora_B" in k]
    assert moved and all(padded[k].abs().sum() > 0 for k in moved)  # training changed the adapter
    for key in padded:
        torch.testing.assert_close(packed[key], padded[key], rtol=1e-4, atol=1e-6)
