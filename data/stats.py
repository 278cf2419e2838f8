"""Table 1 of the paper for one dataset: clients, samples, samples per client, instruction and response length
in tokens, and data quality (IFD), each as mean ± population std, beside the paper's values.

    python -m data.stats --dataset fed-aya [--local_data_dir FILE] [--tokenizer T] [--quality_model M]
                         [--quality_max_per_client N] [--json FILE]

Lengths use the Llama-2 tokenizer when it is available (the paper's unit), else the one given by
--tokenizer, else the embedded SmolLM2 tokenizer; the output says which. Tokens are counted without special
tokens. The paper averages each quantity per client and reports mean ± std over clients ("(Client)" in
Table 1; Section 3.3 averages lengths "for each client", Fig. 3 "the IFD scores ... of each client"): that is
the default `--aggregation across_clients`. The other two candidates stay available and all three go to --json:
  pooled          mean ± std over all samples together
  across_clients  mean ± std over clients of each client's mean (the paper's)
  within_clients  mean of client means ± mean of client stds

Quality is IFD (data.quality, loss-ratio form) under --quality_model, on each client's first
--quality_max_per_client samples (all when not given). Preference data is scored on the chosen response,
conversations on their first exchange.

--json writes one object: clients, samples, per_client [mean, std], instruction_length / response_length /
quality as {pooled, across_clients, within_clients: [mean, std]} (quality null without --quality_model),
aggregation (the one printed), tokenizer, quality_model and quality_max_per_client.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from data.cli import add_dataset_args, load_from_args
from data.dataset import FederatedDataset
from data.fedllm_bench import RECIPES, TABLE1_TOLERANCE, against_paper, population_mean_std
from utils.files import write_json_atomic

LLAMA2_TOKENIZERS = ("meta-llama/Llama-2-7b-hf", "hf-internal-testing/llama-tokenizer")  # the second is ungated
AGGREGATIONS = ("pooled", "across_clients", "within_clients")


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and lengths
# ---------------------------------------------------------------------------------------------------------

def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection: without it, each download attempt retries for
    minutes before giving up."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # only the proxy knows; let the hub client try
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_tokenizer(name: str | None = None):
    """(tokenizer, description): `name` if given, else a Llama-2 tokenizer if one loads, else SmolLM2's."""
    from transformers import AutoTokenizer

    from utils.model import load_tokenizer

    if name:
        return load_tokenizer(name), name
    online = os.environ.get("HF_HUB_OFFLINE") != "1" and _hub_reachable()
    for local_only in (True, False) if online else (True,):
        for candidate in LLAMA2_TOKENIZERS:
            try:
                return AutoTokenizer.from_pretrained(candidate, local_files_only=local_only), f"{candidate} (Llama-2)"
            except Exception:  # not cached, gated or offline: try the next way
                continue
    return load_tokenizer("smollm2"), ("embedded SmolLM2-135M (no Llama-2 tokenizer reachable: lengths are not in "
                                       "the paper's unit; pass --tokenizer for another)")


def sample_texts(sample: dict, pa_response: str = "chosen") -> tuple[str, list[str]]:
    """(instruction text, response texts) whose lengths Table 1 reports.

    Conversations count all user turns as the instruction and all assistant turns as the response;
    preference pairs count `chosen`, or chosen and rejected as two responses with pa_response="both".
    """
    if "conversations" in sample:
        turns = sample["conversations"]
        return ("\n".join(t["value"] for t in turns if t.get("from") == "human"),
                ["\n".join(t["value"] for t in turns if t.get("from") == "gpt")])
    if "prompt" in sample:
        return sample["prompt"], [sample["chosen"]] + ([sample["rejected"]] if pa_response == "both" else [])
    return sample["instruction"], [sample["response"]]


def token_lengths(tokenizer, texts: list[str], chunk: int = 512) -> list[int]:
    from tqdm.auto import tqdm

    lengths = []
    for start in tqdm(range(0, len(texts), chunk), desc="tokenizing", disable=len(texts) < 5 * chunk):
        lengths += [len(ids) for ids in tokenizer(texts[start:start + chunk], add_special_tokens=False)["input_ids"]]
    return lengths


def client_lengths(dataset: FederatedDataset, tokenizer, pa_response: str = "chosen"):
    """Per client: (instruction lengths, response lengths) in tokens."""
    instructions, responses = [], []
    for client in dataset.clients:
        texts = [sample_texts(s, pa_response) for s in client]
        instructions.append(token_lengths(tokenizer, [ins for ins, _ in texts]))
        responses.append(token_lengths(tokenizer, [r for _, rs in texts for r in rs]))
    return instructions, responses


# ---------------------------------------------------------------------------------------------------------
# Table 1
# ---------------------------------------------------------------------------------------------------------

def aggregate(per_client: list[list[float]]) -> dict[str, tuple[float, float]]:
    """The three candidate aggregations of per-sample values grouped by client (population std throughout)."""
    clients = [np.asarray(v, dtype=float) for v in per_client if len(v)]
    means = [c.mean() for c in clients]
    return {
        "pooled": population_mean_std(np.concatenate(clients) if clients else []),
        "across_clients": population_mean_std(means),
        "within_clients": (float(np.mean(means)), float(np.mean([c.std(ddof=0) for c in clients]))),
    }


def table1_row(dataset: FederatedDataset, tokenizer, quality: list[list[float]] | None = None,
               pa_response: str = "chosen") -> dict:
    """The dataset's Table 1 values: counts and, per aggregation, (mean, population std) of each quantity."""
    instructions, responses = client_lengths(dataset, tokenizer, pa_response)
    return {
        "clients": dataset.num_clients,
        "samples": int(sum(dataset.sample_counts)),
        "per_client": population_mean_std(dataset.sample_counts),
        "instruction_length": aggregate(instructions),
        "response_length": aggregate(responses),
        "quality": aggregate(quality) if quality is not None else None,
    }


def _pm(pair, digits: int) -> str:
    return f"{pair[0]:.{digits}f}±{pair[1]:.{digits}f}"


def _check(ours, paper) -> str:
    """'ok', or which of the value (or mean and std) lies beyond Table 1's tolerance of the paper's."""
    if ours is None or paper is None:
        return ""
    if not isinstance(paper, (tuple, list)):
        return against_paper(ours, paper)
    flags = {part: against_paper(o, p) for part, o, p in zip(("mean", "std"), ours, paper)}
    beyond = [f"{part} {flag}" for part, flag in flags.items() if flag != "ok"]
    return "; ".join(beyond) or "ok"


def format_row(row: dict, targets: dict, aggregation: str = "across_clients") -> list[str]:
    """Printable lines: quantity, ours, the paper's value, and a flag beyond TABLE1_TOLERANCE of it."""
    lines = [f"{'quantity':<22}{'ours':>16}{'paper':>14}  check (flag: beyond {TABLE1_TOLERANCE:.0%} of the paper)",
             f"{'# clients':<22}{row['clients']:>16}{targets.get('clients', '-'):>14}  "
             f"{_check(row['clients'], targets.get('clients'))}",
             f"{'# samples':<22}{row['samples']:>16}{targets.get('samples', '-'):>14}  "
             f"{_check(row['samples'], targets.get('samples'))}",
             f"{'# samples per client':<22}{_pm(row['per_client'], 0):>16}"
             f"{_pm(targets['per_client'], 0) if 'per_client' in targets else '-':>14}  "
             f"{_check(row['per_client'], targets.get('per_client'))}"]
    for key, label, digits in (("instruction_length", "L. instruction", 0), ("response_length", "L. response", 0),
                               ("quality", "quality (IFD)", 2)):
        ours = row[key][aggregation] if row[key] else None
        paper = _pm(targets[key], digits) if key in targets else "-"
        lines.append(f"{label:<22}{_pm(ours, digits) if ours else 'not computed':>16}{paper:>14}  "
                     f"{_check(ours, targets.get(key))}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataset_args(parser)
    parser.add_argument("--tokenizer", default=None, help="tokenizer for lengths (default: Llama-2 if available)")
    parser.add_argument("--aggregation", choices=AGGREGATIONS, default="across_clients",
                        help="the one printed beside the paper's value (default: the paper's, over clients)")
    parser.add_argument("--pa_response", choices=("chosen", "both"), default="chosen",
                        help="preference data: response length of chosen, or of chosen and rejected")
    parser.add_argument("--quality_model", default=None, help="causal LM for IFD (slow; cached by data.quality)")
    parser.add_argument("--quality_max_per_client", type=int, default=None,
                        help="score only each client's first N samples for IFD (default: all)")
    parser.add_argument("--json", default=None, help="also write the row (all aggregations) to this JSON file")
    args = parser.parse_args(argv)

    dataset = load_from_args(args)
    tokenizer, described = resolve_tokenizer(args.tokenizer)
    quality = None
    if args.quality_model:
        from data.quality import score_dataset

        quality = score_dataset(dataset, args.quality_model, max_per_client=args.quality_max_per_client).metrics["ifd"]
    row = table1_row(dataset, tokenizer, quality, args.pa_response)
    recipe = RECIPES.get(dataset.name)
    print(f"{dataset.name}: Table 1 row (mean±population std; lengths and IFD by {args.aggregation}); "
          f"tokenizer: {described}")
    print("\n".join(format_row(row, recipe.targets if recipe else {}, args.aggregation)))
    if quality is None:
        print("(quality: pass --quality_model M to compute IFD; the paper's scorer is probably Llama-2-7B)")
    if args.json:
        # Atomic: the file is also run_all's done marker for this step.
        write_json_atomic(args.json, {**row, "aggregation": args.aggregation, "tokenizer": described,
                                      "quality_model": args.quality_model,
                                      "quality_max_per_client": args.quality_max_per_client}, indent=1)


if __name__ == "__main__":
    main()
