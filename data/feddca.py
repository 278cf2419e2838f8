"""FedDCA, domain coverage augmentation (Wang et al. 2024, "FedDCA: Federated Instruction Tuning with Domain
Coverage Augmentation", arXiv 2409.20135), done once before the federated rounds.

  1. Each client embeds its instructions with a shared encoder (all-MiniLM-L6-v2, packaged offline: the same
     embedder as data/analyze.py) and sends k k-means centres (--dca_clusters) to the server; no sample leaves it.
  2. Greedy client-centre selection: the server takes the clients in turn and picks for each the one of its
     centres farthest (cosine distance) from the centres already picked, so the chosen centres spread over the
     domain (farthest-point greedy, the coverage heuristic of the paper).
  3. Retrieval: for each chosen centre the server returns the --dca_retrieve nearest public instructions (exact
     cosine search in torch: the pools here are small, so no approximate index is needed), and the client
     trains on its own samples plus those, with the usual rounds.

The public pool is --dca_public_data (a JSON list of samples) or, for fed-synthetic datasets, clean generated
samples over every task, disjoint from the test set and from the clients' samples. Coverage is reported as the
mean over held-out prompts of the largest cosine similarity to a client's data, averaged over clients, before
and after augmentation (the paper's coverage notion, with the test prompts standing in for the domain).

Departures from the paper: one centre per client, chosen once before training rather than each round; FedDCA*
(a client-side small encoder with a learned projection) is not implemented.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


def kmeans(points: torch.Tensor, k: int, seed: int, iterations: int = 25) -> torch.Tensor:
    """[min(k, n), d] centres of unit vectors by Lloyd's algorithm on cosine similarity (spherical k-means),
    k-means++ seeding; centres renormalised to unit length."""
    n = points.shape[0]
    k = min(k, n)
    generator = torch.Generator().manual_seed(seed)
    centres = [points[torch.randint(n, (1,), generator=generator).item()]]
    for _ in range(1, k):  # k-means++: the next centre far from those chosen
        distance = (1 - points @ torch.stack(centres).T).min(1).values.clamp(min=0)
        if distance.sum() <= 0:
            break
        centres.append(points[torch.multinomial(distance, 1, generator=generator).item()])
    centres = torch.stack(centres)
    for _ in range(iterations):
        assign = (points @ centres.T).argmax(1)
        moved = torch.stack([points[assign == j].mean(0) if (assign == j).any() else centres[j]
                             for j in range(len(centres))])
        moved = torch.nn.functional.normalize(moved, dim=-1)
        if torch.allclose(moved, centres):
            break
        centres = moved
    return centres


def greedy_centres(client_centres: list[torch.Tensor]) -> list[int]:
    """Per client, the index of its centre farthest from the centres picked for the clients before it (the first
    client takes the centre farthest from its own others' mean, i.e. its most distinctive one)."""
    picked, chosen = [], []
    for centres in client_centres:
        if not picked:
            index = int((centres @ centres.mean(0)).argmin()) if len(centres) > 1 else 0
        else:
            nearest = (centres @ torch.stack(picked).T).max(1).values  # similarity to the closest picked centre
            index = int(nearest.argmin())
        chosen.append(index)
        picked.append(centres[index])
    return chosen


def retrieve(pool: torch.Tensor, queries: torch.Tensor, n: int) -> torch.Tensor:
    """[q, n] indices of the n public samples nearest each query by cosine similarity (exact)."""
    return torch.topk(queries @ pool.T, min(n, pool.shape[0]), dim=1).indices


def coverage(data: torch.Tensor, domain: torch.Tensor) -> float:
    """Mean over domain points of the largest cosine similarity to a point of `data`."""
    return float((domain @ data.T).max(1).values.mean())


def load_public_pool(dataset, path: str | None, size: int, seed: int) -> list[dict]:
    if path:
        if not Path(path).is_file():
            raise SystemExit(f"--dca_public_data {path}: no such file; pass a JSON list of {{instruction, response}} "
                             "samples.")
        return json.loads(Path(path).read_text(encoding="utf-8"))
    if not dataset.name.startswith("fed-synthetic"):
        raise SystemExit(f"--feddca needs a public instruction pool for {dataset.described}: pass "
                         "--dca_public_data FILE.")
    from data.synthetic import clean_samples
    taken = {s["instruction"] for s in dataset.test} | {s["instruction"] for c in dataset.clients for s in c}
    return clean_samples(size, seed + 2, exclude=taken)


def augment(dataset, pool: list[dict], embed, clusters: int, per_centre: int, seed: int):
    """The dataset with each client's retrieved public samples appended; info["feddca"] records the chosen
    centres' retrievals and the coverage of the held-out prompts before and after."""
    from data.quality import sample_pair
    as_tensor = lambda texts: torch.from_numpy(np.asarray(embed(texts), dtype=np.float32))  # noqa: E731
    pool_vectors = as_tensor([sample_pair(s)[0] for s in pool])
    client_vectors = [as_tensor([sample_pair(s)[0] for s in samples]) for samples in dataset.clients]
    centres = [kmeans(v, clusters, seed + k) for k, v in enumerate(client_vectors)]
    chosen = greedy_centres(centres)
    found = [retrieve(pool_vectors, c[i:i + 1], per_centre)[0].tolist() for c, i in zip(centres, chosen)]
    clients = [samples + [{**pool[j], "retrieved": True} for j in indices]
               for samples, indices in zip(dataset.clients, found)]
    record = {"clusters": clusters, "per_centre": per_centre, "pool": len(pool),
              "retrieved_distinct": len({j for indices in found for j in indices})}
    if dataset.test:  # per client, and of the federation's data together (what the global model is trained on)
        domain = as_tensor([sample_pair(s)[0] for s in dataset.test])
        retrieved = pool_vectors[sorted({j for indices in found for j in indices})]
        record["coverage_before"] = float(np.mean([coverage(v, domain) for v in client_vectors]))
        record["coverage_after"] = float(np.mean([coverage(torch.cat([v, pool_vectors[idx]]), domain)
                                                  for v, idx in zip(client_vectors, found)]))
        record["retrieved_coverage"] = coverage(retrieved, domain)
        record["federation_coverage_before"] = coverage(torch.cat(client_vectors), domain)
        record["federation_coverage_after"] = coverage(torch.cat([*client_vectors, retrieved]), domain)
    if all("task" in s for s in pool):
        tasks = lambda samples: {s["task"] for s in samples if "task" in s}  # noqa: E731
        record["tasks_per_client_before"] = float(np.mean([len(tasks(c)) for c in dataset.clients]))
        record["tasks_per_client_after"] = float(np.mean([len(tasks(c)) for c in clients]))
        record["tasks_retrieved"] = len(tasks([pool[j] for indices in found for j in indices]))
    logger.info("FedDCA: %s", record)
    return replace(dataset, clients=clients, info={**dataset.info, "feddca": record})


def apply_feddca(dataset, script_args):
    """--feddca: the augmentation above with the packaged MiniLM encoder (once, before the rounds)."""
    if not script_args.feddca:
        return dataset
    if dataset.kind == "preference":
        raise SystemExit("--feddca retrieves instruction-response samples; it is not defined for preference data.")
    from data.analyze import minilm_embedder
    pool = load_public_pool(dataset, script_args.dca_public_data, script_args.dca_pool_size, script_args.seed)
    return augment(dataset, pool, minilm_embedder(), script_args.dca_clusters, script_args.dca_retrieve,
                   script_args.seed)
