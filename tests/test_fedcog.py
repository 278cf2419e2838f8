"""FedCOG: the token KL, the selection of the generations the local model disagrees with most and the distillation
term against unbatched hand computations on a tiny model, and main_sft.py --fedcog with a server rule that keeps
client state (SCAFFOLD)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import main_sft
from conftest import run_entry
from federated.algorithms import Algorithm, ClientHooks
from federated.fedcog import ConsensusGeneration, token_kl
from federated.flat import FlatParams


def test_token_kl_by_hand():
    p, q = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.4, 0.4, 0.2]])
    hand = 0.7 * torch.log(torch.tensor(0.7 / 0.4)) + 0.2 * torch.log(torch.tensor(0.5)) \
        + 0.1 * torch.log(torch.tensor(0.5))
    assert token_kl(p.log(), q.log()).item() == pytest.approx(hand.item(), rel=1e-5)
    assert token_kl(p.log(), p.log()).item() == pytest.approx(0.0, abs=1e-7)


@pytest.fixture()
def cog(tokenizer):
    from utils.model import tiny_llama, wrap_with_lora
    model = wrap_with_lora(tiny_llama(tokenizer), r=4, alpha=8, dropout=0.0)
    flat = FlatParams(model)
    torch.manual_seed(0)
    x = torch.randn(flat.numel) * 0.2  # a global model with non-zero B
    local = x + torch.randn(flat.numel) * 0.5  # the client's own model of an earlier round
    prompts = {0: [f"What is {a} + {b}? Answer with the number only." for a, b in [(2, 3), (10, 7), (41, 5), (8, 8),
                                                                                   (13, 29)]]}
    args = SimpleNamespace(cog_num_generate=5, cog_num_keep=2, cog_max_new_tokens=6, cog_kd_weight=0.5)
    method = ConsensusGeneration(Algorithm(args), args, tokenizer, "alpaca", prompts, seq_length=96)
    method.bind(model, flat, x)
    return method, model, flat, x, local


def hand_answer_kl(model, flat, teacher, student, ids: list[int], labels: list[int]) -> float:
    """Mean over the answer tokens of KL(p_teacher || p_student), one unpadded sequence at a time."""
    def logp(vector):
        flat.set(vector)
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    t, s = logp(teacher), logp(student)
    positions = [p - 1 for p in range(1, len(ids)) if labels[p] != -100]
    return sum((t[p].exp() * (t[p] - s[p])).sum().item() for p in positions) / len(positions)


def test_keeps_the_generations_with_the_largest_kl_and_distils_them(cog, tokenizer):
    from evaluation.generate import generate_answers
    from utils.templates import prompt_text, tokenize_sft_sample
    method, model, flat, x, local = cog
    store = {0: {"cog_local": local}}
    hooks = method.client_hooks(0, x, {}, store)
    assert torch.equal(flat.get(), x)  # left holding the global model, as local training starts from it
    # By hand: the same prompts (the first draw of client 0), answered one by one by the global model.
    drawn = __import__("random").Random(0).sample(method.prompts[0], 5)
    flat.set(x)
    answers = [generate_answers(model, tokenizer, [prompt_text("alpaca", tokenizer, p)], max_new_tokens=6,
                                progress=SimpleNamespace(update=lambda n: None))[0] for p in drawn]
    samples = [tokenize_sft_sample(tokenizer, "alpaca", {"instruction": p, "response": a}, 96)
               for p, a in zip(drawn, answers)]
    kls = [hand_answer_kl(model, flat, x, local, s["input_ids"], s["labels"]) for s in samples]
    best = sorted(sorted(range(5), key=lambda i: -kls[i])[:2])
    assert torch.equal(hooks.generations.input_ids[:, :max(len(samples[i]["input_ids"]) for i in best)],
                       torch.nn.utils.rnn.pad_sequence([torch.tensor(samples[i]["input_ids"]) for i in best],
                                                       batch_first=True, padding_value=tokenizer.pad_token_id))
    metrics = hooks.metrics()  # this client's costs, which travel with its result
    assert metrics["cog_generated"] == 5 and metrics["cog_generation_s"] > 0 and metrics["cog_kept_kl_count"] == 2
    assert metrics["cog_kept_kl_sum"] == pytest.approx(sum(kls[i] for i in best), rel=1e-3)

    # The distillation term at a local point y: weight x mean over all kept answer tokens of KL(global || y).
    y = x + torch.randn(flat.numel) * 0.1
    flat.set(y)
    model.zero_grad()
    term = hooks.loss_term(flat)
    term.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    tokens = [sum(label != -100 for label in samples[i]["labels"][1:]) for i in best]
    by_hand = sum(hand_answer_kl(model, flat, x, y, samples[i]["input_ids"], samples[i]["labels"]) * n
                  for i, n in zip(best, tokens)) / sum(tokens)
    assert term.item() == pytest.approx(0.5 * by_hand, rel=1e-3)
    kept = hooks.finish(y, 1, 0.1)[1]
    assert set(kept) == {"cog_local", "cog_draws"} and int(kept["cog_draws"]) == 1  # next round: a fresh draw


def test_a_client_without_a_model_of_its_own_keeps_the_first_draws(cog):
    method, model, flat, x, _ = cog
    hooks = method.client_hooks(0, x, {}, {})
    assert hooks.generations.input_ids.shape[0] == 2
    assert hooks.metrics()["cog_kept_kl_count"] == 2 and hooks.metrics()["cog_kept_kl_sum"] == 0.0
    assert isinstance(hooks.inner, ClientHooks)


def test_the_global_model_writes_its_own_prompts_reproducibly(cog, tokenizer):
    """--cog_prompts model: instructions sampled from the global model after the template's user-turn opening,
    the same for the same (client, draws), others for another draw, the run's RNG state untouched; they are then
    answered as the other sources' prompts are."""
    from evaluation.generate import generate_answers
    from federated.fedcog import instruction_frame
    from utils.templates import prompt_text

    _, model, flat, x, _ = cog
    args = SimpleNamespace(cog_num_generate=4, cog_num_keep=2, cog_max_new_tokens=6, cog_kd_weight=0.5)
    method = ConsensusGeneration(Algorithm(args), args, tokenizer, "alpaca", None, seq_length=96)
    method.bind(model, flat, x)
    opening, end = instruction_frame("alpaca", tokenizer)
    assert opening == prompt_text("alpaca", tokenizer, "Q").split("Q \n\n### Response:")[0]
    assert opening.endswith("### Instruction:\n") and end == "### Response:"

    flat.set(x)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = method._draw_prompts(3, 0)
    assert torch.equal(torch.random.get_rng_state(), before)  # forked: the run's RNG did not move
    assert first == method._draw_prompts(3, 0) and first != method._draw_prompts(3, 1)
    assert first and all(ins and ins == ins.strip() and end not in ins for ins in first)
    # By hand: the same samples from the opening, seeded the same way, cut and stripped.
    by_hand = generate_answers(model, tokenizer, [opening] * 4, batch_size=4, max_new_tokens=6, do_sample=True,
                               seed=3 * 1_000_003, progress=SimpleNamespace(update=lambda n: None))
    assert first == [t.split(end)[0].strip() for t in by_hand if t.split(end)[0].strip()]

    hooks = method.client_hooks(3, x, {}, {})  # answered by the global model, scored and kept as before
    assert hooks.metrics()["cog_generated"] == len(first) and hooks.generations.input_ids.shape[0] == 2


@pytest.mark.parametrize("source", ["own", "model"])
def test_main_sft_fedcog_with_scaffold(tiny_model_dir, tmp_path, one_thread, source):
    out = tmp_path / "cog"
    run_entry(main_sft, ["--model_name_or_path", tiny_model_dir, "--output_dir", out, "--synthetic_num_clients", 3,
                         "--synthetic_mean_samples", 16, "--sample_clients", 2, "--num_rounds", 2, "--max_steps", 1,
                         "--batch_size", 2, "--seq_length", 64, "--learning_rate", 1e-3, "--eval_after", "false",
                         "--fed_alg", "scaffold", "--fedcog", "--cog_num_generate", 3, "--cog_num_keep", 2,
                         "--cog_max_new_tokens", 4, "--cog_prompts", source])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    # Two clients a round, each answering 3 prompts (the tiny model's own: none came out empty) and keeping 2: the
    # row sums their costs.
    assert all(r["cog_generated"] == 6 and r["cog_kept_kl_count"] == 4 and r["cog_generation_s"] > 0 for r in rows)
    assert rows[0]["cog_kept_kl_sum"] == 0.0  # round 1: no client has a model of its own yet
    assert rows[1]["cog_kept_kl_sum"] > 0  # round 2: one of its 2 clients (of 3) trained in round 1 at least
    assert all(r["cog_kept_kl_mean"] == r["cog_kept_kl_sum"] / 4 for r in rows)


@pytest.mark.parametrize("flags, message", [(["--cog_num_keep", 9], "cog_num_keep"),
                                            (["--cog_prompts", "mine"], "cog_prompts"),
                                            (["--cog_public_prompts", "p.json"], "only with --cog_prompts public")])
def test_bad_fedcog_flags_are_refused_before_loading(flags, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        run_entry(main_sft, ["--output_dir", tmp_path / "x", "--fedcog", *flags])


def test_main_dpo_adds_fedcogs_distillation_to_the_dpo_loss(tiny_model_dir, tmp_path, one_thread):
    """main_dpo.py --fedcog: public prompts drawn beside a preference dataset are answered and kept, and the
    distillation term changes local training (its gradient is 0 at the first step, where local = global, and
    not after): the adapter differs from the same run without FedCOG."""
    import main_dpo
    from safetensors.torch import load_file

    def run(name, *extra):
        out = tmp_path / name
        run_entry(main_dpo, ["--model_name_or_path", tiny_model_dir, "--output_dir", out, "--synthetic_num_clients",
                             2, "--synthetic_mean_samples", 8, "--sample_clients", 1, "--num_rounds", 1,
                             "--max_steps", 3, "--batch_size", 2, "--seq_length", 96, "--learning_rate", 1e-2,
                             "--eval_after", "false", *extra])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return rows, load_file(out / "checkpoint-1" / "adapter_model.safetensors")

    plain_rows, plain = run("plain")
    rows, cog = run("cog", "--fedcog", "--cog_prompts", "public", "--cog_num_generate", 3, "--cog_num_keep", 2,
                    "--cog_max_new_tokens", 4, "--cog_kd_weight", 10)
    assert rows[0]["cog_generated"] == 3 and rows[0]["cog_kept_kl_count"] == 2 and "cog_generated" not in plain_rows[0]
    assert plain.keys() == cog.keys() and any(not torch.equal(plain[k], cog[k]) for k in plain)



@pytest.mark.parametrize("source", ["public", "own"])
def test_a_flower_node_draws_the_prompts_main_sft_draws(tiny_model_dir, tmp_path, source):
    """FedCOG's prompts on a Flower node holding only its silo's file: with --cog_prompts public it draws the very
    pool main_sft.py draws (clean fed-synthetic instructions, none a test prompt, not the client's own); with its
    own prompts it never loads the run's dataset."""
    from data.quality import sample_pair
    from federated.fedcog import with_consensus_generation
    from federated.setup import load_dataset_for
    from flower_app.config import NodeData, parse_run_config
    from flower_app.training import Worker

    settings = parse_run_config({"model-name-or-path": tiny_model_dir, "synthetic-num-clients": 4,
                                 "synthetic-mean-samples": 16, "fedcog": True, "cog-prompts": source, "seed": 3})
    s, f = settings.script_args, settings.fed_args
    dataset = load_dataset_for(s, kinds=("sft", "multiturn"), entry="main_sft.py")
    in_process = with_consensus_generation(None, f, None, s.template, dict(enumerate(dataset.clients)),
                                           s.seq_length, dataset, s.seed).prompts
    silo = tmp_path / "silo1.json"
    silo.write_text(json.dumps({dataset.client_ids[1]: dataset.clients[1]}))
    node = Worker(settings)
    own = [sample_pair(x)[0] for x in node.client(7, NodeData(1, 4, str(silo))).samples]
    on_node = with_consensus_generation(None, f, node.tokenizer, s.template, {1: node.clients[7].samples},
                                        s.seq_length, node.fedcog_dataset(), s.seed).prompts
    assert on_node[1] == in_process[1]
    if source == "public":
        test_prompts = {sample_pair(t)[0] for t in dataset.test}
        assert len(on_node[1]) == 20 * f.cog_num_generate and not test_prompts & set(on_node[1])
        assert not set(own) >= set(on_node[1])
    else:
        assert node.dataset is None  # the silo's node never loaded the run's dataset
        assert on_node[1] == own
