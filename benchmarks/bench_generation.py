"""Batched versus one-prompt-at-a-time answer generation: same model, prompts and decoding settings.

    python benchmarks/bench_generation.py --eval_data_dir /path/to/eval_data --num_prompts 16 --batch_size 16

The reference answer scripts call generate() once per question; evaluation.generate batches left-padded
prompts. Both sides here run the same function (batch_size 1 versus N), greedy, on the first N Vicuna
questions in the model's Alpaca prompt, and report answers/s, new tokens/s and whether the answers agree.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.data import load_vicuna  # noqa: E402
from evaluation.generate import generate_answers  # noqa: E402
from utils.model import load_base_model, load_tokenizer  # noqa: E402
from utils.templates import prompt_text  # noqa: E402


def timed(model, tokenizer, prompts, batch_size: int, max_new_tokens: int) -> tuple[list[str], float]:
    start = time.perf_counter()
    answers = generate_answers(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               desc=f"batch_size={batch_size}")
    return answers, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--template", default="alpaca")
    p.add_argument("--eval_data_dir", default=None)
    p.add_argument("--num_prompts", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_base_model(args.model)
    prompts = [prompt_text(args.template, tokenizer, item.turns[0])
               for item in load_vicuna(args.eval_data_dir)[:args.num_prompts]]
    generate_answers(model, tokenizer, prompts[:1], max_new_tokens=4, desc="warm-up")

    rows = []
    for batch_size in (1, args.batch_size):
        answers, seconds = timed(model, tokenizer, prompts, batch_size, args.max_new_tokens)
        new_tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        rows.append((batch_size, answers, seconds, new_tokens))
    (_, one, t_one, tok_one), (_, batched, t_batched, tok_batched) = rows
    same = sum(a == b for a, b in zip(one, batched))
    print(f"\nmodel={args.model} prompts={len(prompts)} max_new_tokens={args.max_new_tokens} greedy, "
          f"torch threads={torch.get_num_threads()}")
    print("| mode | seconds | answers/s | new tokens/s |")
    print("|---|---|---|---|")
    print(f"| one at a time | {t_one:.1f} | {len(prompts) / t_one:.3f} | {tok_one / t_one:.1f} |")
    print(f"| batched ({args.batch_size}) | {t_batched:.1f} | {len(prompts) / t_batched:.3f} | "
          f"{tok_batched / t_batched:.1f} |")
    print(f"speed-up: {t_one / t_batched:.2f}x answers/s; identical greedy answers: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
