"""The federated dataset every builder returns, and the checks every one passes before training.

A FederatedDataset holds raw samples per client in the released format:
  sft:        {"instruction": str, "response": str}
  multiturn:  {"conversations": [{"from": "human"|"gpt", "value": str}, ...]}
  preference: {"prompt": str, "chosen": str, "rejected": str}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("sft", "multiturn", "preference")
REQUIRED_KEYS = {"sft": ("instruction", "response"), "preference": ("prompt", "chosen", "rejected")}


@dataclass
class FederatedDataset:
    name: str
    kind: str
    client_ids: list[str]
    clients: list[list[dict]]
    test: list[dict] = field(default_factory=list)  # held-out samples, where the dataset has them
    client_metadata: list[dict] = field(default_factory=list)  # e.g. {"language": ...} per client
    info: dict = field(default_factory=dict)  # provenance: source, revision, rule parameters

    @property
    def described(self) -> str:
        """How messages name it: a local file as the file it is, a built dataset by its name."""
        if self.info.get("local_file"):
            return f"Local file {self.info['local_file']}"
        return f"Dataset {self.name}"

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def sample_counts(self) -> list[int]:
        return [len(c) for c in self.clients]


def read_utf8(path, what: str) -> str:
    """The text of a UTF-8 file, or a one-line error naming the file and the byte offset of the first bad byte."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SystemExit(f"{what} {path} is not UTF-8: byte offset {err.start} (0x{raw[err.start]:02x}) "
                         f"{err.reason}; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None


def validate(ds: FederatedDataset) -> FederatedDataset:
    """Clear errors naming the client for every malformed input the training loop would otherwise trip on."""
    if ds.kind not in KINDS:
        raise SystemExit(f"{ds.described}: kind {ds.kind!r} is not one of {KINDS}.")
    if not ds.clients:
        raise SystemExit(f"{ds.described} has no clients: check the source or the file.")
    for cid, samples in zip(ds.client_ids, ds.clients):
        if not samples:
            raise SystemExit(f"{ds.described}: client {cid!r} has no samples; remove it from the file.")
        for j, sample in enumerate(samples):
            _check_sample(ds, cid, j, sample)
    return ds


def _check_sample(ds: FederatedDataset, cid: str, j: int, sample) -> None:
    where = f"{ds.described}: client {cid!r}, sample {j}"
    if not isinstance(sample, dict):
        raise SystemExit(f"{where} is a {type(sample).__name__}, not an object with the keys of a {ds.kind} sample.")
    if ds.kind == "multiturn":
        conv = sample.get("conversations")
        if not isinstance(conv, list) or len(conv) < 2:
            raise SystemExit(f"{where} lacks 'conversations' (a list of at least one human and one gpt turn).")
        return
    missing = [k for k in REQUIRED_KEYS[ds.kind] if not isinstance(sample.get(k), str)]
    if missing:
        raise SystemExit(f"{where} lacks {', '.join(repr(k) for k in missing)} (text fields of a {ds.kind} "
                         f"sample: {', '.join(REQUIRED_KEYS[ds.kind])}); fix or drop that sample.")
    if ds.kind == "preference" and sample["chosen"] == sample["rejected"]:
        raise SystemExit(f"{where} has chosen == rejected, which carries no preference; drop that pair.")
