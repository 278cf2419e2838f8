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

The public pool is --dca_public_data (a JSON list of samples of the dataset's kind) or, for fed-synthetic
datasets, clean generated samples over every task, disjoint from the test set and from the clients' samples. For
preference data (main_dpo.py) the pool holds prompt-chosen-rejected pairs and retrieval is by prompt: the paper
augments instruction data, and the same coverage argument holds for the prompts of preference pairs.

Coverage is reported as the mean over held-out prompts of the largest cosine similarity to a client's data,
averaged over clients, before and after augmentation (the paper's coverage notion, with the test prompts standing
in for the domain).

FedDCA* (--dca_client_encoder): the clients embed with a cheaper encoder of their own (`minilm_l2`, the first
two layers of MiniLM; `hashing`, feature-hashed word uni- and bigrams, no model at all; or any Hugging Face
encoder id), and the server maps their centres into its own encoder's space before choosing and retrieving. The
map is learned on the public pool, which the server embeds with both encoders: ridge regression
W = argmin ||P_c W - P_s||^2 + ridge ||W||^2 = (P_c^T P_c + ridge I)^-1 P_c^T P_s (--dca_align_ridge), and a
client centre c becomes normalise(c W). How well the map transfers is recorded as the mean cosine between
mapped and true server embeddings of the held-out prompts, which the fit never saw.

Departures from the paper: one centre per client, chosen once before training rather than each round;
FedDCA*'s alignment is a closed-form linear map fitted on the public pool (the paper trains a projector on
public data; its exact architecture is not needed for the idea, and a linear map has no training loop to tune).
"""
from __future__ import annotations

import json
import logging
import re
import zlib
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


def retrieve(pool: torch.Tensor, queries: torch.Tensor, n: int, chunk: int = 64) -> torch.Tensor:
    """[q, n] indices of the n public samples nearest each query by cosine similarity (exact), `chunk` queries
    at a time: the similarity block stays chunk x pool (747 clients against a pool of a million would otherwise
    hold 3 GB at once)."""
    k = min(n, pool.shape[0])
    return torch.cat([torch.topk(queries[i:i + chunk] @ pool.T, k, dim=1).indices
                      for i in range(0, len(queries), chunk)]) if len(queries) else torch.zeros(0, k, dtype=torch.long)


def coverage(data: torch.Tensor, domain: torch.Tensor) -> float:
    """Mean over domain points of the largest cosine similarity to a point of `data`."""
    return float((domain @ data.T).max(1).values.mean())


def fit_projection(client_space: torch.Tensor, server_space: torch.Tensor, ridge: float) -> torch.Tensor:
    """[d_client, d_server] ridge-regression map from client to server embeddings of the same texts (closed form,
    in float64: the normal equations of nearly collinear embeddings lose float32's digits)."""
    x, y = client_space.double(), server_space.double()
    gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, x.T @ y).float()


def project(vectors: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Client-space vectors mapped into the server's space, unit length (cosine search there)."""
    return torch.nn.functional.normalize(vectors @ projection, dim=-1)


def alignment_cosine(client_embed, projection: torch.Tensor, samples: list[dict],
                     server_vectors: torch.Tensor) -> float:
    """Mean cosine between the samples' mapped client embeddings and their true server embeddings."""
    return float((project(embed_prompts(client_embed, samples), projection) * server_vectors).sum(1).mean())


def hashing_embedder(dims: int = 512):
    """Feature-hashed lower-cased word unigrams and bigrams, signed, L2-normalised: a client encoder with no model
    (crc32, not Python's salted hash(): the same text gives the same vector in every process)."""
    def embed(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), dims), dtype=np.float32)
        for row, text in enumerate(texts):
            words = re.findall(r"\w+", text.lower())
            for feature in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
                h = zlib.crc32(feature.encode("utf-8"))
                out[row, h % dims] += 1.0 if (h >> 31) & 1 else -1.0
            norm = np.linalg.norm(out[row])
            out[row] /= norm if norm > 0 else 1.0
        return out
    return embed


def client_embedder(name: str):
    """--dca_client_encoder: None for `server` (plain FedDCA, the clients share the server's encoder)."""
    from data.analyze import minilm_embedder, transformer_embedder
    if name == "server":
        return None
    if name == "minilm_l2":
        return minilm_embedder(layers=2)
    if name == "hashing":
        return hashing_embedder()
    return transformer_embedder(name)


def load_public_pool(dataset, path: str | None, size: int, seed: int) -> list[dict]:
    """--dca_public_data (samples of the dataset's own kind: instruction-response samples or conversations for
    SFT, prompt-chosen-rejected pairs for DPO), or for fed-synthetic datasets `size` clean generated samples over
    every task (pairs for fed-synthetic-pref), disjoint from the test set and the clients' samples."""
    from data.dataset import REQUIRED_KEYS
    kind = "preference" if dataset.kind == "preference" else "sft"
    if path:
        if not Path(path).is_file():
            raise SystemExit(f"--dca_public_data {path}: no such file; pass a JSON list of samples with "
                             f"{', '.join(REQUIRED_KEYS[kind])}.")
        pool = json.loads(Path(path).read_text(encoding="utf-8"))
        usable = lambda s: isinstance(s, dict) and (  # noqa: E731
            all(k in s for k in REQUIRED_KEYS[kind]) or (kind == "sft" and "conversations" in s))
        if not (isinstance(pool, list) and pool and all(usable(s) for s in pool)):
            raise SystemExit(f"--dca_public_data {path}: {dataset.described} holds {dataset.kind} samples, so the "
                             f"pool must be a non-empty JSON list of objects with {', '.join(REQUIRED_KEYS[kind])}.")
        return pool
    if not dataset.name.startswith("fed-synthetic"):
        raise SystemExit(f"--feddca needs a public pool for {dataset.described}: pass --dca_public_data FILE.")
    from data.synthetic_pref import clean_samples_beside
    return clean_samples_beside(dataset, size, seed + 2)


def embed_prompts(encoder, samples: list[dict]) -> torch.Tensor:
    """[n, d] embeddings of the samples' (first) instructions."""
    from data.quality import sample_pair
    return torch.from_numpy(np.asarray(encoder([sample_pair(s)[0] for s in samples]), dtype=np.float32))


def client_centres(clients: list[list[dict]], clusters: int, seed: int, client_embed, pool: list[dict] | None = None,
                   pool_vectors: torch.Tensor | None = None, ridge: float = 1.0):
    """Step 1, as the server receives it: each client's k-means centres of its own embeddings, in the server's
    space. Plain FedDCA: `client_embed` is the server's encoder. FedDCA* (`pool` given): the clients' encoder is
    their own; the returned map (ridge, fitted on the pool's two embeddings) carries the centres across."""
    centres = [kmeans(embed_prompts(client_embed, samples), clusters, seed + k) for k, samples in enumerate(clients)]
    if pool is None:
        return centres, None
    projection = fit_projection(embed_prompts(client_embed, pool), pool_vectors, ridge)
    return [project(c, projection) for c in centres], projection


def augment(dataset, pool: list[dict], embed, clusters: int, per_centre: int, seed: int, client_embed=None,
            ridge: float = 1.0):
    """The dataset with each client's retrieved public samples appended; info["feddca"] records the chosen
    centres' retrievals and the coverage of the held-out prompts before and after. With `client_embed` (FedDCA*),
    the clients cluster in that encoder's space and the server maps their centres into `embed`'s space."""
    pool_vectors = embed_prompts(embed, pool)
    # Server-space embeddings of the clients' data serve only the coverage record (FedDCA* clients never make them).
    client_vectors = [embed_prompts(embed, samples) for samples in dataset.clients]
    domain = embed_prompts(embed, dataset.test) if dataset.test else None  # the held-out prompts
    record = {"clusters": clusters, "per_centre": per_centre, "pool": len(pool)}
    if client_embed is None:
        centres = [kmeans(v, clusters, seed + k) for k, v in enumerate(client_vectors)]
    else:
        centres, projection = client_centres(dataset.clients, clusters, seed, client_embed, pool, pool_vectors, ridge)
        if domain is not None:
            record["alignment_cosine"] = alignment_cosine(client_embed, projection, dataset.test, domain)
    chosen = greedy_centres(centres)
    found = retrieve(pool_vectors, torch.stack([c[i] for c, i in zip(centres, chosen)]), per_centre).tolist()
    clients = [samples + [{**pool[j], "retrieved": True} for j in indices]
               for samples, indices in zip(dataset.clients, found)]
    distinct = sorted({j for indices in found for j in indices})
    record["retrieved_distinct"] = len(distinct)
    if domain is not None:  # per client, and of the federation's data together (what the global model trains on)
        retrieved = pool_vectors[distinct]
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
        record["tasks_retrieved"] = len(tasks([pool[j] for j in distinct]))
    logger.info("FedDCA: %s", record)
    return replace(dataset, clients=clients, info={**dataset.info, "feddca": record})


def apply_feddca(dataset, script_args):
    """--feddca: the augmentation above with the packaged MiniLM encoder on the server (once, before the rounds);
    the clients' encoder is --dca_client_encoder."""
    if not script_args.feddca:
        return dataset
    from data.analyze import minilm_embedder
    pool = load_public_pool(dataset, script_args.dca_public_data, script_args.dca_pool_size, script_args.seed)
    return augment(dataset, pool, minilm_embedder(), script_args.dca_clusters, script_args.dca_retrieve,
                   script_args.seed, client_embedder(script_args.dca_client_encoder), script_args.dca_align_ridge)
