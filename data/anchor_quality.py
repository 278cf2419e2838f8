"""Anchor-scored data quality control with a global threshold (CLUES: Zhao, Du, Lane, Chen, Wang 2024,
"Enhancing Data Quality in Federated Fine-Tuning of Foundation Models", arXiv 2403.04529).

The server holds a small public anchor set of good samples. A sample's score is its TracIn influence on the
anchor set, measured on the LoRA parameters over a short warm-up on the anchors:

    ḡ_c       = mean over anchors a of grad_LoRA loss(a; θ_c)                (the mean anchor gradient)
    θ_{c+1}   = θ_c - η ḡ_c                                                    (warm-up: full-batch gradient steps)
    score(z)  = Σ_{c<C} η <grad_LoRA loss(z; θ_c), ḡ_c>                       (a client sample z)
    score(a)  = Σ_{c<C} η <grad_LoRA loss(a; θ_c), (n ḡ_c - grad loss(a; θ_c)) / (n - 1)>   (anchor a, leave-one-out)

loss is the mean cross-entropy of the response tokens (the SFT loss); for preference pairs (main_dpo.py) it is the
DPO loss, -log σ(β [(log π_θ(chosen) - log π_θ(rejected)) - (log π_ref(chosen) - log π_ref(rejected))]), log π
summed over the answer tokens, the reference the base model (the adapter switched off, as in local DPO training)
and β = DPO_BETA: the anchors and the client pairs are scored alike. The anchors score themselves leave-one-out
so that no anchor counts its own gradient; the global threshold is the `quantile` of those anchor scores. The
server sends the threshold and the C checkpoints with their mean anchor gradients (or a node holding the public
anchors recomputes them, identically); each client scores its own samples and keeps those at or above the
threshold. No sample leaves a client. `per_client` is the comparison: each client keeps its own top share
(1 - quantile) of its samples, whatever their absolute scores.

Per-sample gradients are batched with torch.func (vmap over grad of a functional call): one backward pass per
batch, not one per sample. Samples of a batch are right-padded and run without an attention mask: the model is
causal, so the padding after a sample's last token cannot change that sample's logits, and padded positions carry
no label.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """One warm-up checkpoint: the LoRA parameters θ_c, the mean anchor gradient ḡ_c there, and the step size."""
    params: dict[str, torch.Tensor]
    mean_anchor_gradient: torch.Tensor  # flat, in the order of params
    lr: float


def lora_parameters(model) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters by name, detached: the point at which gradients are taken."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


DPO_BETA = 0.1  # TRL's default; at the warm-up's start (policy = reference) it only scales every score alike


def tokenize_samples(samples: list[dict], tokenizer, template: str, max_length: int) -> list[dict]:
    """input_ids and labels (-100 outside the response) per sample, as local training tokenises them; a
    preference pair becomes {"chosen": ..., "rejected": ...}, each such a sequence (prompt + that answer)."""
    from utils.preference import tokenize_pair
    from utils.templates import tokenize_sft_sample

    def sequence(prompt_ids: list[int], answer_ids: list[int]) -> dict:
        ids = (prompt_ids + answer_ids)[:max_length]
        return {"input_ids": ids, "labels": ([-100] * len(prompt_ids) + answer_ids)[:max_length]}

    def tokenized(sample: dict) -> dict:
        if "prompt" not in sample:
            return tokenize_sft_sample(tokenizer, template, sample, max_length)
        pair = tokenize_pair(tokenizer, template, sample, max_length)
        return {"chosen": sequence(pair["prompt_ids"], pair["chosen_ids"]),
                "rejected": sequence(pair["prompt_ids"], pair["rejected_ids"])}
    return [tokenized(s) for s in samples]


def _length(sample: dict) -> int:
    return len(sample["input_ids"]) if "input_ids" in sample else max(len(sample[k]["input_ids"])
                                                                      for k in ("chosen", "rejected"))


def _answer_log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over the answer tokens of log p(token): logits [L, V] of one sequence, labels [L] (-100 elsewhere)."""
    targets = labels[1:]
    logp = torch.log_softmax(logits[:-1].float(), dim=-1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
    return (logp * (targets != -100)).sum()


@torch.no_grad()
def add_reference_margins(model, pairs: list[dict], pad_id: int) -> list[dict]:
    """Each tokenised pair with "ref_margin" = log π_ref(chosen) - log π_ref(rejected), the base model's (the
    LoRA adapter switched off)."""
    device = next(model.parameters()).device
    with model.disable_adapter():
        for pair in pairs:
            log_probs = []
            for answer in (pair["chosen"], pair["rejected"]):
                logits = model(input_ids=torch.tensor([answer["input_ids"]], device=device), use_cache=False).logits
                log_probs.append(_answer_log_prob(logits[0], torch.tensor(answer["labels"], device=device)))
            pair["ref_margin"] = float(log_probs[0] - log_probs[1])
    return pairs


def _padded(batch: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s["input_ids"]) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, s in enumerate(batch):
        ids[row, :len(s["input_ids"])] = torch.tensor(s["input_ids"])
        labels[row, :len(s["labels"])] = torch.tensor(s["labels"])
    return ids, labels


def per_sample_gradients(model, params: dict[str, torch.Tensor], batch: list[dict], pad_id: int) -> torch.Tensor:
    """[B, P]: each sample's gradient of its loss (SFT: mean response-token cross-entropy; a pair: DPO) w.r.t.
    the LoRA parameters `params` (flattened in the order of `params`), from one batched backward pass."""
    from torch.func import functional_call, grad, vmap

    device = next(iter(params.values())).device
    logits_of = lambda p, ids: functional_call(  # noqa: E731
        model, p, args=(), kwargs={"input_ids": ids[None], "use_cache": False}).logits[0]

    def sft_loss(p, ids, labels):
        return torch.nn.functional.cross_entropy(logits_of(p, ids)[:-1].float(), labels[1:], ignore_index=-100)

    def dpo_loss(p, chosen_ids, chosen_labels, rejected_ids, rejected_labels, ref_margin):
        margin = (_answer_log_prob(logits_of(p, chosen_ids), chosen_labels)
                  - _answer_log_prob(logits_of(p, rejected_ids), rejected_labels))
        return -torch.nn.functional.logsigmoid(DPO_BETA * (margin - ref_margin))

    if "input_ids" in batch[0]:
        loss, inputs = sft_loss, _padded(batch, pad_id)
    else:
        loss = dpo_loss
        inputs = (*_padded([s["chosen"] for s in batch], pad_id), *_padded([s["rejected"] for s in batch], pad_id),
                  torch.tensor([s["ref_margin"] for s in batch]))
    inputs = [t.to(device) for t in inputs]
    grads = vmap(grad(loss), in_dims=(None, *[0] * len(inputs)))(params, *inputs)
    return torch.cat([grads[name].reshape(len(batch), -1).float() for name in params], dim=1)


def _batches(samples: list[dict], batch_size: int):
    order = sorted(range(len(samples)), key=lambda i: _length(samples[i]))  # similar lengths together
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def anchor_checkpoints(model, anchors: list[dict], num_checkpoints: int, lr: float, pad_id: int,
                       batch_size: int = 8) -> tuple[list[Checkpoint], np.ndarray]:
    """The server part: the warm-up on the tokenised anchors from the model's current LoRA parameters, and the
    anchors' own leave-one-out scores summed over the checkpoints. The model's parameters are left unchanged."""
    if len(anchors) < 2:
        raise SystemExit(f"Anchor scoring needs at least 2 anchor samples (it scores each against the others); got "
                         f"{len(anchors)}: pass more with --quality_anchor_data or --quality_anchor_size.")
    params = lora_parameters(model)
    names = list(params)
    n = len(anchors)
    checkpoints, scores = [], np.zeros(n)
    for _ in range(num_checkpoints):
        total, own_norms = 0.0, np.zeros(n)
        for idx in _batches(anchors, batch_size):  # pass 1: the mean gradient and each anchor's squared norm
            g = per_sample_gradients(model, params, [anchors[i] for i in idx], pad_id)
            total = total + g.sum(0)
            own_norms[idx] = (g * g).sum(1).double().cpu().numpy()
        mean = total / n
        for idx in _batches(anchors, batch_size):  # pass 2: <g_a, n ḡ - g_a> / (n - 1), leave-one-out
            g = per_sample_gradients(model, params, [anchors[i] for i in idx], pad_id)
            dots = (g @ mean).double().cpu().numpy() * n
            scores[idx] += lr * (dots - own_norms[idx]) / (n - 1)
        checkpoints.append(Checkpoint({k: v.clone() for k, v in params.items()}, mean, lr))
        offset = 0
        for name in names:  # θ <- θ - η ḡ: one full-batch gradient step on the anchors
            size = params[name].numel()
            params[name] = params[name] - lr * mean[offset:offset + size].view_as(params[name]).to(params[name])
            offset += size
    return checkpoints, scores


def sample_scores(model, checkpoints: list[Checkpoint], samples: list[dict], pad_id: int,
                  batch_size: int = 8) -> np.ndarray:
    """The client part: Σ_c η_c <g_z(θ_c), ḡ_c> for each tokenised sample z."""
    scores = np.zeros(len(samples))
    for checkpoint in checkpoints:
        for idx in _batches(samples, batch_size):
            g = per_sample_gradients(model, checkpoint.params, [samples[i] for i in idx], pad_id)
            scores[idx] += checkpoint.lr * (g @ checkpoint.mean_anchor_gradient).double().cpu().numpy()
    return scores


def global_threshold(anchor_scores, quantile: float) -> float:
    """The server's one number: the `quantile` of the anchors' own scores."""
    return float(np.quantile(np.asarray(anchor_scores, dtype=float), quantile))


def per_client_thresholds(scores: list[list[float]], quantile: float) -> list[float]:
    """The comparison rule: each client's own `quantile` of its scores (it keeps its top 1 - quantile)."""
    return [float(np.quantile(values, quantile)) if len(values) else 0.0 for values in scores]


# ---------------------------------------------------------------------------------------------------------
# Anchors: a file of samples, or for fed-synthetic datasets clean samples generated beside the test set
# ---------------------------------------------------------------------------------------------------------

def load_anchors(dataset, anchor_file: str | None, size: int, seed: int) -> list[dict]:
    """The public anchor set: `anchor_file` (a JSON list of samples of the dataset's kind: {instruction, response},
    or {prompt, chosen, rejected} for preference data) when given; for a fed-synthetic dataset `size` clean
    samples balanced over its tasks (pairs for fed-synthetic-pref), disjoint from its test set and its clients'
    samples."""
    from data.dataset import REQUIRED_KEYS
    keys = REQUIRED_KEYS["preference" if dataset.kind == "preference" else "sft"]
    wanted = "a JSON list of good {" + ", ".join(keys) + "} samples"
    if anchor_file:
        path = Path(anchor_file)
        if not path.is_file():
            raise SystemExit(f"--quality_anchor_data {anchor_file}: no such file; pass {wanted}.")
        anchors = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(anchors, list) and all(isinstance(a, dict) and set(keys) <= set(a) for a in anchors)):
            raise SystemExit(f"--quality_anchor_data {anchor_file} must hold {wanted} ({dataset.described} holds "
                             f"{dataset.kind} samples).")
        return anchors
    if not dataset.name.startswith("fed-synthetic"):
        raise SystemExit(f"--quality_filter anchor needs an anchor set for {dataset.described}: pass "
                         f"--quality_anchor_data FILE ({wanted}).")
    from data.synthetic_pref import clean_samples_beside
    return clean_samples_beside(dataset, size, seed)


def score_with_anchors(dataset, anchors: list[dict], model, tokenizer, template: str, max_length: int,
                       num_checkpoints: int, lr: float, batch_size: int = 8) -> tuple[list[list[float]], np.ndarray]:
    """Every client's sample scores and the anchors' own scores, with `model` (LoRA-wrapped, at its initial
    adapter) as the starting point of the warm-up."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()  # no dropout: a sample's gradient is a function of the sample and θ only
    def tokenized(samples):
        out = tokenize_samples(samples, tokenizer, template, max_length)
        return add_reference_margins(model, out, pad_id) if dataset.kind == "preference" else out
    checkpoints, anchor_scores = anchor_checkpoints(model, tokenized(anchors), num_checkpoints, lr, pad_id, batch_size)
    scores = [sample_scores(model, checkpoints, tokenized(client), pad_id, batch_size).tolist()
              for client in dataset.clients]
    return scores, anchor_scores


def cached_scores(dataset, anchors: list[dict], settings: dict, compute) -> tuple[list[list[float]], np.ndarray]:
    """score_with_anchors' result from the disk cache, or `compute()` stored there. The key covers `settings`
    (model, LoRA shape, seed, template, length, checkpoints, step size), the anchors and every client's samples."""
    import hashlib

    from utils.model import cache_root
    digest = hashlib.sha256(json.dumps([settings, anchors, dataset.clients], sort_keys=True, default=str).encode())
    path = cache_root() / "anchor_quality" / f"{digest.hexdigest()[:16]}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        return saved["scores"], np.asarray(saved["anchor_scores"])
    scores, anchor_scores = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"scores": scores, "anchor_scores": [float(v) for v in anchor_scores]}))
    return scores, anchor_scores

