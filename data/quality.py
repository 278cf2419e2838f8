"""Data quality per sample and per client: IFD (Li et al. 2024) and FedDQC's IRA (Du et al. 2025).

Both compare the response's mean token loss with and without its instruction, under any causal LM:
  cond    mean cross-entropy of the response tokens after the Alpaca prompt holding the instruction
  direct  mean cross-entropy of the same response tokens after a single start token
  IFD, loss ratio        cond / direct                 (Cherry_LLM)
  IFD, perplexity ratio  exp(cond) / exp(direct)       (Superfiltering)
  IRA                    direct - cond                 (FedDQC: how much the instruction helps)
Both passes score exactly the same response token ids, so the ratios compare like with like.

`filter_with_scores` (`apply_quality_filter` with the kept scores) and `order_by_quality` are what the training
loop calls for FedDQC-style runs.

    python -m data.quality --dataset fed-aya --model smollm2 --max_per_client 50
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from data.cli import add_dataset_args, load_from_args
from data.dataset import FederatedDataset

METRICS = ("cond_loss", "direct_loss", "ifd", "ifd_ppl", "ira")


def sample_pair(sample: dict, response_key: str | None = None) -> tuple[str, str]:
    """(instruction, response) scored for a released-format sample.

    Conversations are scored on their first exchange; preference pairs on `chosen` unless `response_key`
    says "rejected" (Fig. 1d compares the two).
    """
    if "conversations" in sample:
        conv = sample["conversations"]
        human = next(i for i, t in enumerate(conv) if t.get("from") == "human")
        return conv[human]["value"], conv[human + 1]["value"] if human + 1 < len(conv) else ""
    if "prompt" in sample:
        return sample["prompt"], sample[response_key or "chosen"]
    return sample["instruction"], sample["response"]


def _sequences(tokenizer, instruction: str, response: str, max_length: int) -> tuple[list[int], list[int], list[int]]:
    """Token ids (conditioned sequence, direct sequence, response ids) for one pair."""
    from utils.templates import prompt_text

    prompt = tokenizer(prompt_text("alpaca", tokenizer, instruction), add_special_tokens=True)["input_ids"]
    if len(prompt) > max_length // 2:
        prompt = prompt[-(max_length // 2):]  # keep the end: the "### Response:" marker conditions the answer
    response_ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"]
    response_ids = response_ids[: max(1, max_length - len(prompt))]
    # The direct pass needs a token to predict the first response token from; a model without BOS gets EOS,
    # the usual document separator.
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return prompt + response_ids, [start] + response_ids, response_ids


@torch.no_grad()
def _tail_losses(model, sequences: list[list[int]], tail: list[int], batch_size: int, pad_id: int,
                 progress=None) -> np.ndarray:
    """Mean cross-entropy over the last `tail[i]` tokens of each sequence (right-padded batches by length)."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = np.zeros(len(sequences))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
            attention[row, :len(sequences[i])] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(device),
                                                reduction="none").cpu()  # nll[:, p] scores token p + 1
        for row, i in enumerate(idx):
            end = len(sequences[i]) - 1
            out[i] = nll[row, end - tail[i]:end].mean().item()
        if progress is not None:
            progress.update(len(idx))
    return out


def response_losses(model, tokenizer, pairs: list[tuple[str, str]], max_length: int = 512, batch_size: int = 4,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(cond, direct): mean response-token cross-entropy with and without the instruction, per pair."""
    from tqdm.auto import tqdm

    built = [_sequences(tokenizer, ins, res, max_length) for ins, res in pairs]
    tail = [len(r) for _, _, r in built]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    bar = tqdm(total=2 * len(pairs), desc="quality: scoring responses", unit="seq", disable=not progress)
    cond = _tail_losses(model, [c for c, _, _ in built], tail, batch_size, pad_id, bar)
    direct = _tail_losses(model, [d for _, d, _ in built], tail, batch_size, pad_id, bar)
    bar.close()
    return cond, direct


def scores_from_losses(cond, direct) -> dict[str, np.ndarray]:
    cond, direct = np.asarray(cond, dtype=float), np.asarray(direct, dtype=float)
    return {"cond_loss": cond, "direct_loss": direct, "ifd": cond / direct, "ifd_ppl": np.exp(cond - direct),
            "ira": direct - cond}


@dataclass
class QualityScores:
    """Per-sample scores, grouped like the dataset's clients: metrics[name][client][sample]."""
    model: str
    metrics: dict[str, list[list[float]]]
    max_per_client: int | None = None  # None: every sample is scored

    def per_client(self, metric: str = "ifd") -> list[float]:
        """Each client's mean score (nan for a client with no scored sample)."""
        return [float(np.mean(v)) if v else float("nan") for v in self.metrics[metric]]

    def pooled(self, metric: str = "ifd") -> np.ndarray:
        return np.asarray([x for client in self.metrics[metric] for x in client], dtype=float)


def _cache_key(model_name: str, pairs_per_client, max_length: int, response_key) -> str:
    digest = hashlib.sha256(json.dumps([model_name, max_length, response_key, "alpaca"]).encode())
    for client in pairs_per_client:
        for ins, res in client:
            digest.update(ins.encode() + b"\0" + res.encode() + b"\1")
        digest.update(b"\2")
    return digest.hexdigest()[:16]


def score_dataset(dataset: FederatedDataset, model_name_or_path: str = "smollm2", model=None, tokenizer=None,
                  max_length: int = 512, batch_size: int = 4, max_per_client: int | None = None,
                  response_key: str | None = None, cache_dir: str | None = None,
                  progress: bool = True) -> QualityScores:
    """Score every client's samples (the first `max_per_client` of each, when given), cached on disk.

    The cache key covers the model name, max_length, the scored texts and `response_key`, so a changed
    dataset or setting is scored afresh. Pass `model`/`tokenizer` to reuse loaded objects (their name still
    keys the cache).
    """
    from utils.model import cache_root

    pairs = [[sample_pair(s, response_key) for s in client[:max_per_client]] for client in dataset.clients]
    path = Path(cache_dir or cache_root() / "quality") / f"{_cache_key(model_name_or_path, pairs, max_length, response_key)}.json"
    if path.exists():
        return QualityScores(**json.loads(path.read_text()))
    if model is None or tokenizer is None:
        from utils.model import load_base_model, load_tokenizer

        tokenizer = tokenizer or load_tokenizer(model_name_or_path)
        model = model or load_base_model(model_name_or_path)
    flat = [p for client in pairs for p in client]
    cond, direct = response_losses(model, tokenizer, flat, max_length, batch_size, progress)
    flat_scores = scores_from_losses(cond, direct)
    bounds = np.cumsum([0] + [len(c) for c in pairs])
    metrics = {name: [values[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
               for name, values in flat_scores.items()}
    scores = QualityScores(model=model_name_or_path, metrics=metrics, max_per_client=max_per_client)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scores.__dict__))
    return scores


# ---------------------------------------------------------------------------------------------------------
# What the training loop calls (FedDQC): filter low-IRA samples, train from high to low IRA
# ---------------------------------------------------------------------------------------------------------

def _ira_per_client(dataset: FederatedDataset, scores) -> list[list[float]]:
    ira = scores.metrics["ira"] if isinstance(scores, QualityScores) else scores
    if [len(v) for v in ira] != dataset.sample_counts:
        raise SystemExit(f"Quality scores do not cover {dataset.name}: every sample of every client needs an IRA "
                         "score (score the dataset without --max_per_client).")
    return ira


def apply_quality_filter(dataset: FederatedDataset, scores, threshold: float) -> FederatedDataset:
    """Drop each client's samples with IRA < threshold; clients left empty are dropped (recorded in info).

    `scores`: a QualityScores or per-client lists of IRA values aligned with dataset.clients.
    """
    return filter_with_scores(dataset, scores, threshold)[0]


def filter_with_scores(dataset: FederatedDataset, scores, threshold, metric: str = "ira") -> tuple[FederatedDataset, list]:
    """apply_quality_filter, and the scores of the kept samples aligned with the result (for ordering it
    without scoring it again).

    `threshold`: one number, or one per client (a per-client rule). `metric` names the score in the record; any
    metric but "ira" takes `scores` as per-client lists. Where samples carry a known "corrupted" mark
    (fed-synthetic-noisy), the record also holds the filter's recall and precision at finding them."""
    values_per_client = _ira_per_client(dataset, scores) if metric == "ira" else scores
    thresholds = list(threshold) if isinstance(threshold, (list, tuple)) else [threshold] * dataset.num_clients
    metadata = dataset.client_metadata or [{} for _ in dataset.clients]
    survivors, dropped_clients, dropped_samples = [], [], []  # (client id, kept samples, their scores, metadata)
    for cid, samples, values, meta, bar in zip(dataset.client_ids, dataset.clients, values_per_client, metadata,
                                               thresholds):
        kept = [(s, v) for s, v in zip(samples, values) if v >= bar]
        dropped_samples += [s for s, v in zip(samples, values) if v < bar]
        if kept:
            survivors.append((cid, [s for s, _ in kept], [v for _, v in kept], meta))
        else:
            dropped_clients.append(cid)
    if not survivors:
        raise SystemExit(f"--quality_threshold {threshold} drops every sample of {dataset.name}; lower it.")
    kept_ids, kept_clients, kept_values, kept_meta = (list(column) for column in zip(*survivors))
    record = {"metric": metric, "threshold": threshold if len(set(thresholds)) == 1 else thresholds,
              "samples_before": sum(dataset.sample_counts), "samples_after": sum(map(len, kept_clients)),
              "dropped_clients": dropped_clients, **corruption_detection(dataset, dropped_samples)}
    filtered = replace(dataset, client_ids=kept_ids, clients=kept_clients,
                       client_metadata=kept_meta if dataset.client_metadata else [],
                       info={**dataset.info, "quality_filter": record})
    return filtered, kept_values


def corruption_detection(dataset: FederatedDataset, dropped: list[dict]) -> dict:
    """Recall (corrupted samples dropped / corrupted samples) and precision (corrupted among the dropped) of a
    filter, where the samples carry a known "corrupted" mark; {} otherwise."""
    if not any("corrupted" in s for client in dataset.clients for s in client):
        return {}
    corrupted = sum(bool(s.get("corrupted")) for client in dataset.clients for s in client)
    caught = sum(bool(s.get("corrupted")) for s in dropped)
    return {"corrupted": corrupted, "corrupted_dropped": caught,
            "recall": caught / corrupted if corrupted else float("nan"),
            "precision": caught / len(dropped) if dropped else float("nan")}


def order_by_quality(dataset: FederatedDataset, scores) -> FederatedDataset:
    """Each client's samples sorted from high to low IRA (stable), for FedDQC's hierarchical training."""
    ira = _ira_per_client(dataset, scores)
    clients = [[samples[i] for i in sorted(range(len(samples)), key=lambda i: -values[i])]
               for samples, values in zip(dataset.clients, ira)]
    return replace(dataset, clients=clients, info={**dataset.info, "quality_order": "ira, high to low"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataset_args(parser)
    parser.add_argument("--model", default="smollm2", help="any causal LM (hub id or local path)")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_per_client", type=int, default=None, help="score only each client's first N")
    args = parser.parse_args(argv)
    ds = load_from_args(args)
    scores = score_dataset(ds, args.model, max_length=args.max_length, batch_size=args.batch_size,
                           max_per_client=args.max_per_client)
    for metric in ("ifd", "ifd_ppl", "ira"):
        mean, std = float(np.nanmean(scores.pooled(metric))), float(np.nanstd(scores.pooled(metric)))
        print(f"{metric}: {mean:.3f}±{std:.3f} over samples")
    for cid, ifd, ira in zip(ds.client_ids, scores.per_client("ifd"), scores.per_client("ira")):
        print(f"  {cid}: IFD {ifd:.3f}, IRA {ira:.3f}")


if __name__ == "__main__":
    main()
