"""The command-line options data.fedllm_bench, data.stats, data.analyze and data.quality share: which dataset
(built, or a released file), where its sources and caches are, and rule overrides."""
from __future__ import annotations

import argparse
import json

from data.dataset import FederatedDataset
from data.registry import load_federated_dataset


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="a registered dataset, e.g. fed-aya")
    parser.add_argument("--local_data_dir", default=None, help="a released-format JSON file instead of building")
    parser.add_argument("--source_path", default=None, help="local source files (the source's own schema)")
    parser.add_argument("--eval_data_dir", default=None, help="folder with ref_gpt4/*_testset.json (leakage check)")
    parser.add_argument("--hf_token", default=None, help="token for gated sources (default: HF_TOKEN / login)")
    parser.add_argument("--cache_dir", default=None, help="where built datasets are cached")
    parser.add_argument("--rule", action="append", default=[], metavar="KEY=VALUE",
                        help="override a construction rule, e.g. --rule min_samples=150 (value parsed as JSON)")


def parse_rule(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--rule {text!r}: write KEY=VALUE, e.g. --rule min_samples=150")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare word such as turn1_only


def load_from_args(args) -> FederatedDataset:
    options = {"source_path": args.source_path, "eval_data_dir": args.eval_data_dir, "hf_token": args.hf_token,
               "cache_dir": args.cache_dir, **dict(parse_rule(r) for r in args.rule)}
    return load_federated_dataset(args.dataset, local_data_dir=args.local_data_dir, **options)
