"""Answer generation with a tiny random Llama: batching, multi-turn history, resume, adapter swapping."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evaluation import run as eval_run
from evaluation.answers import answer_benchmark, read_answers
from evaluation.benchmarks import BENCHMARKS
from evaluation.generate import generate_answers
from evaluation.models import iter_models, resolve
from utils.templates import prompt_text

from conftest import SHARED_EVAL_DATA, needs_eval_data

EVAL_DATA = SHARED_EVAL_DATA


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smol_tokenizer):
    """A tiny Llama wide enough that different prompts get different greedy continuations."""
    from utils.model import tiny_llama

    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(smol_tokenizer, hidden_size=96, seed=3).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model(model_dir):
    from utils.model import load_base_model

    return load_base_model(model_dir)


def test_batched_greedy_equals_one_by_one(model, smol_tokenizer):
    # Raw questions (no template) end differently, so a random model continues each one differently.
    prompts = ["Hi", "What is 2+2?", "Name three colours of the rainbow, please, and explain each one.",
               "Translate 'cat' to French.", "Write a haiku about autumn leaves falling on a quiet pond."]
    batched = generate_answers(model, smol_tokenizer, prompts, batch_size=3, max_new_tokens=10)
    single = [generate_answers(model, smol_tokenizer, [p], batch_size=1, max_new_tokens=10)[0] for p in prompts]
    assert batched == single
    assert len(set(batched)) > 1  # the check means something only if answers differ


def test_sampling_is_seeded(model, smol_tokenizer):
    prompts = [prompt_text("alpaca", smol_tokenizer, q) for q in ("Tell me a story.", "Say something.")]
    kwargs = dict(batch_size=2, max_new_tokens=8, do_sample=True, temperature=0.7, top_p=1.0)
    assert generate_answers(model, smol_tokenizer, prompts, seed=5, **kwargs) == \
        generate_answers(model, smol_tokenizer, prompts, seed=5, **kwargs)


@needs_eval_data
def test_mtbench_second_turn_sees_first_answer_and_rerun_resumes(model, smol_tokenizer, tmp_path):
    bench = BENCHMARKS["mtbench"]
    items = [i for i in bench.load(EVAL_DATA) if i.category == "math"][:3]  # greedy category: deterministic
    out = tmp_path / "answers.jsonl"
    assert answer_benchmark(model, smol_tokenizer, "vicuna_v1.1", bench, items, out, "m", batch_size=2,
                            max_new_tokens=6) == 3
    rows = read_answers(out)
    first = items[0]
    a1, a2 = rows[first.question_id]["turns"]
    turn2 = prompt_text("vicuna_v1.1", smol_tokenizer, first.turns[1], history=[(first.turns[0], a1)])
    assert generate_answers(model, smol_tokenizer, [turn2], max_new_tokens=6) == [a2]
    assert rows[first.question_id]["decoding"] == {"max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0}
    assert answer_benchmark(model, smol_tokenizer, "vicuna_v1.1", bench, items, out, "m", max_new_tokens=6) == 0
    out.write_text(out.read_text().splitlines(keepends=True)[0])  # as if killed after the first row
    assert answer_benchmark(model, smol_tokenizer, "vicuna_v1.1", bench, items, out, "m", max_new_tokens=6) == 2
    assert {qid: r["turns"] for qid, r in read_answers(out).items()} == {q: r["turns"] for q, r in rows.items()}


def _save_adapter(model_dir: str, target: Path, seed: int) -> None:
    from utils.model import load_base_model, wrap_with_lora

    peft_model = wrap_with_lora(load_base_model(model_dir), r=4)
    torch.manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # LoRA B starts at zero; make the adapter change the model
            param.data.normal_(0, 0.5)
    peft_model.save_pretrained(target)


@pytest.fixture(scope="module")
def run_dir(model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    (run / "args.json").write_text(json.dumps({"model_name_or_path": model_dir, "template": "vicuna_v1.1",
                                               "seq_length": 16, "load_in_8bit": False, "load_in_4bit": False}))
    for round_, seed in ((1, 11), (2, 22)):
        _save_adapter(model_dir, run / f"checkpoint-{round_}", seed)
    return run


def test_adapters_swapped_on_one_base(run_dir, smol_tokenizer):
    from peft import PeftModel
    from utils.model import load_base_model

    checkpoints = [str(run_dir / "checkpoint-1"), str(run_dir / "checkpoint-2")]
    settings, targets = resolve(None, checkpoints, None, include_base=True)
    assert [t.template for t in targets] == ["alpaca", "vicuna_v1.1", "vicuna_v1.1"]
    ids = smol_tokenizer("Hello there", return_tensors="pt")["input_ids"]
    logits = {}
    for target, model, tokenizer in iter_models(settings, targets):
        # The run trained with seq_length 16; evaluation prompts are longer and must not be measured against it.
        assert tokenizer.model_max_length == smol_tokenizer.model_max_length != 16
        with torch.no_grad():
            logits[target.checkpoint] = model(ids).logits
    for checkpoint in checkpoints:  # each swapped-in adapter acts exactly as a freshly loaded one
        fresh = PeftModel.from_pretrained(load_base_model(settings["model_name_or_path"]), checkpoint)
        with torch.no_grad():
            torch.testing.assert_close(logits[checkpoint], fresh(ids).logits)
    assert not torch.allclose(logits[None], logits[checkpoints[0]])
    assert not torch.allclose(logits[checkpoints[0]], logits[checkpoints[1]])


@needs_eval_data
def test_cli_answers_every_checkpoint(run_dir, model_dir, tmp_path):
    eval_run.main(["--stage", "answer", "--checkpoints", str(run_dir / "checkpoint-1"), str(run_dir / "checkpoint-2"),
                   "--include_base", "--benchmarks", "vicuna", "advbench", "--limit", "2", "--max_new_tokens", "4",
                   "--eval_data_dir", str(EVAL_DATA), "--output_dir", str(tmp_path)])
    run = run_dir.name
    for benchmark in ("vicuna", "advbench"):
        files = sorted(p.stem for p in (tmp_path / benchmark / "answers").glob("*.jsonl"))
        assert files == sorted([f"base_{Path(model_dir).name}", f"{run}_checkpoint-1", f"{run}_checkpoint-2"])
        rows = read_answers(tmp_path / benchmark / "answers" / f"{run}_checkpoint-2.jsonl")
        assert len(rows) == 2 and all(r["template"] == "vicuna_v1.1" for r in rows.values())
        assert all(r["decoding"]["temperature"] == 0.7 for r in rows.values())


def test_training_seq_length_is_no_limit_when_evaluating(model):
    """A tokenizer from training has model_max_length = seq_length; evaluating with it must neither warn that
    prompts are "longer than the specified maximum" nor change the tokenizer for the training that follows."""
    from utils.model import load_tokenizer

    tokenizer = load_tokenizer("smollm2", seq_length=8)
    long_prompt = "Explain, step by step and with examples, how a federated learning round works."
    answer = generate_answers(model, tokenizer, [long_prompt], max_new_tokens=3)
    assert not tokenizer.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")
    assert tokenizer.model_max_length == 8
    assert answer == generate_answers(model, load_tokenizer("smollm2"), [long_prompt], max_new_tokens=3)
