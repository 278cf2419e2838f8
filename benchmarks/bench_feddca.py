"""FedDCA's retrieval on a domain-skewed fed-synthetic (each client a few samples of about one task; the public
pool covers every task): coverage of the held-out prompts and tasks reached, with the greedy centre choice
against a random centre per client (issue #26). Embeddings only (all-MiniLM-L6-v2), no training.

    OMP_NUM_THREADS=1 python benchmarks/bench_feddca.py --clients 10 --alpha 0.05 --seeds 0,1
"""
from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--mean_samples", type=int, default=16)
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--retrieve", type=int, default=16)
    parser.add_argument("--pool", type=int, default=480)
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from data.analyze import minilm_embedder
    from data.feddca import coverage, greedy_centres, kmeans, load_public_pool, retrieve
    from data.quality import sample_pair
    from data.synthetic import build_synthetic
    embed = minilm_embedder()
    vectors = lambda samples: torch.from_numpy(np.asarray(embed([sample_pair(s)[0] for s in samples])))  # noqa: E731
    for seed in [int(s) for s in args.seeds.split(",")]:
        ds = build_synthetic(args.clients, args.alpha, seed, args.mean_samples)
        pool = load_public_pool(ds, None, args.pool, seed)
        start = time.perf_counter()
        pool_v, domain = vectors(pool), vectors(ds.test)
        clients_v = [vectors(c) for c in ds.clients]
        centres = [kmeans(v, args.clusters, seed + k) for k, v in enumerate(clients_v)]
        embed_s = time.perf_counter() - start
        rng = random.Random(seed)
        choices = {"greedy": greedy_centres(centres), "random": [rng.randrange(len(c)) for c in centres]}
        before = coverage(torch.cat(clients_v), domain)
        tasks_before = len({s["task"] for c in ds.clients for s in c})
        for rule, chosen in choices.items():
            found = [retrieve(pool_v, c[i:i + 1], args.retrieve)[0].tolist() for c, i in zip(centres, chosen)]
            union = sorted({j for f in found for j in f})
            row = {"seed": seed, "rule": rule, "tasks_clients": tasks_before,
                   "tasks_clients_plus_retrieved": len({s["task"] for c in ds.clients for s in c}
                                                       | {pool[j]["task"] for j in union}),
                   "retrieved_distinct": len(union), "coverage_before": round(before, 4),
                   "coverage_after": round(coverage(torch.cat([*clients_v, pool_v[union]]), domain), 4),
                   "embed_and_cluster_s": round(embed_s, 1)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
