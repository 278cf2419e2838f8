"""How well each data quality filter finds the corrupted answers of fed-synthetic-noisy (issue #26), or the
flipped pairs of fed-synthetic-pref-noisy (--dataset; scored with the DPO loss as main_dpo.py scores them): recall
and precision against the known corruption, samples kept, and the scoring time, for
  anchor             CLUES's TracIn scores against the anchor set, one global threshold (a quantile of the
                     anchors' own scores)
  anchor_per_client  the same scores, each client dropping its own lowest share
  ira                FedDQC's IRA filter, at --ira_threshold
Every filter runs exactly as main_sft.py and main_dpo.py run it (federated.setup.apply_quality).

    OMP_NUM_THREADS=1 python benchmarks/bench_quality_filters.py --clients 8 --mean_samples 24 --quantiles 0.1,0.3
    OMP_NUM_THREADS=1 python benchmarks/bench_quality_filters.py --dataset fed-synthetic-pref-noisy --seq_length 96
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--mean_samples", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--anchors", type=int, default=48)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--warmup_lr", type=float, default=0.05)
    parser.add_argument("--quantiles", default="0.1,0.3")
    parser.add_argument("--ira_threshold", type=float, default=0.0)
    parser.add_argument("--filters", default="anchor,anchor_per_client,ira")
    parser.add_argument("--dataset", default="fed-synthetic-noisy",
                        choices=["fed-synthetic-noisy", "fed-synthetic-pref-noisy"])
    parser.add_argument("--seq_length", type=int, default=256)
    parser.add_argument("--json", default=None, help="write the rows here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from data.registry import load_federated_dataset
    from federated.setup import apply_quality
    dataset = load_federated_dataset(args.dataset, synthetic_num_clients=args.clients, synthetic_alpha=0.3,
                                     synthetic_seed=args.seed, synthetic_mean_samples=args.mean_samples)
    settings = dict(quality_order=False, quality_anchor_data=None, quality_anchor_size=args.anchors, seed=args.seed,
                    quality_model=None, model_name_or_path=args.model, seq_length=args.seq_length, peft_lora_r=16,
                    peft_lora_alpha=32, template="alpaca", quality_checkpoints=args.checkpoints,
                    quality_warmup_lr=args.warmup_lr, quality_threshold=args.ira_threshold)
    rows = []
    for name in args.filters.split(","):
        for q in ([None] if name == "ira" else [float(v) for v in args.quantiles.split(",")]):
            start = time.perf_counter()
            kept = apply_quality(dataset, SimpleNamespace(**settings, quality_filter=name,
                                                          quality_threshold_quantile=q))
            record = kept.info["quality_filter"]
            row = {"filter": name, "quantile": q, "seconds": round(time.perf_counter() - start, 1),
                   **{k: record[k] for k in ("samples_before", "samples_after", "corrupted", "corrupted_dropped",
                                            "recall", "precision")}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
