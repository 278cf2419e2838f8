"""FedDCA's retrieval on a domain-skewed fed-synthetic (each client a few samples of about one task; the public
pool covers every task): coverage of the held-out prompts and tasks reached, with the greedy centre choice
against a random centre per client, for the clients' encoders of FedDCA (the server's all-MiniLM-L6-v2) and
FedDCA* (their own cheaper one, mapped into the server's space): issue #26. Embeddings only, no training.

    OMP_NUM_THREADS=1 python benchmarks/bench_feddca.py --clients 10 --alpha 0.05 --seeds 0,1

client_embed_ms_per_prompt is the clients' encoding time per instruction, measured here one after another on
the same thread: compare the encoders by its ratio, not its absolute value. alignment_cosine is FedDCA*'s mean
cosine between mapped and true server embeddings of the held-out prompts, to be read against
prompts_mean_pairwise_cosine, what two different held-out prompts share in the server's space.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--mean_samples", type=int, default=16)
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--retrieve", type=int, default=16)
    parser.add_argument("--pool", type=int, default=480)
    parser.add_argument("--ridge", type=float, default=1.0)
    parser.add_argument("--client_encoders", default="server,minilm_l2,hashing")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from data.analyze import minilm_embedder
    from data.feddca import (alignment_cosine, client_centres, client_embedder, coverage, embed_prompts,
                             greedy_centres, load_public_pool, retrieve)
    from data.synthetic import build_synthetic
    server = minilm_embedder()
    encoders = {name: client_embedder(name) or server for name in args.client_encoders.split(",")}
    for seed in [int(s) for s in args.seeds.split(",")]:
        ds = build_synthetic(args.clients, args.alpha, seed, args.mean_samples)
        pool = load_public_pool(ds, None, args.pool, seed)
        pool_v, domain = embed_prompts(server, pool), embed_prompts(server, ds.test)
        n = len(domain)  # alignment_cosine's reference: two different held-out prompts' mean cosine
        pairwise = float(((domain @ domain.T).sum() - n) / (n * (n - 1)))
        server_clients = [embed_prompts(server, c) for c in ds.clients]
        before = coverage(torch.cat(server_clients), domain)
        tasks_before = len({s["task"] for c in ds.clients for s in c})
        for name, encoder in encoders.items():
            start = time.perf_counter()
            embed_prompts(encoder, [s for c in ds.clients for s in c])
            per_prompt_ms = 1000 * (time.perf_counter() - start) / sum(ds.sample_counts)
            star = name != "server"
            centres, projection = client_centres(ds.clients, args.clusters, seed, encoder,
                                                 pool if star else None, pool_v, args.ridge)
            rng = random.Random(seed)
            choices = {"greedy": greedy_centres(centres), "random": [rng.randrange(len(c)) for c in centres]}
            for rule, chosen in choices.items():
                found = retrieve(pool_v, torch.stack([c[i] for c, i in zip(centres, chosen)]), args.retrieve).tolist()
                union = sorted({j for f in found for j in f})
                row = {"seed": seed, "client_encoder": name, "rule": rule, "tasks_clients": tasks_before,
                       "tasks_clients_plus_retrieved": len({s["task"] for c in ds.clients for s in c}
                                                           | {pool[j]["task"] for j in union}),
                       "retrieved_distinct": len(union), "coverage_before": round(before, 4),
                       "coverage_after": round(coverage(torch.cat([pool_v[union], *server_clients]), domain), 4),
                       "alignment_cosine": round(alignment_cosine(encoder, projection, ds.test, domain), 4)
                       if star else None, "prompts_mean_pairwise_cosine": round(pairwise, 4),
                       "client_embed_ms_per_prompt": round(per_prompt_ms, 3)}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
