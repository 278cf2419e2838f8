"""What a node and the server build for a run, from the entry scripts' own functions: a node loads its client's
samples (a partition of the run's dataset, or the silo's own file), tokenises them once, and builds the model,
the trainer and its LocalTrainer once per run; the server loads the LoRA model (the initial global vector, and
the adapter its checkpoints save)."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, replace

from flower_app.config import NodeData, RunSettings

logger = logging.getLogger(__name__)

KINDS = {"sft": ("sft", "multiturn"), "dpo": ("preference",)}
ENTRY = {"sft": "main_sft.py", "dpo": "main_dpo.py"}


def lr_min(task: str) -> float:
    return _entry(task).LR_MIN


@dataclass
class NodeClient:
    """One node's client for the whole run: its partition and tokenised samples."""
    partition_id: int
    client_id: str
    data: object  # the tokenised datasets.Dataset
    first_sample: dict  # a raw sample (DPOTrainer is built with one text pair)


class Worker:
    """A process that trains clients for one run: one tokenizer, model, trainer and LocalTrainer, whichever client
    it trains (as main_sft.py trains every client on one trainer), and each of its nodes' tokenised data. In
    simulation one Ray actor process serves many virtual nodes in turn; a SuperNode serves one."""

    def __init__(self, settings: RunSettings):
        from utils.model import load_tokenizer

        self.settings = settings
        # The trainer's scratch folder stays on the node (removed with the process), never in the server's folder.
        self.scratch = tempfile.TemporaryDirectory(prefix="fedllm-node-")
        self.script_args = replace(settings.script_args, output_dir=self.scratch.name)
        self.tokenizer = load_tokenizer(self.script_args.model_name_or_path, self.script_args.seq_length)
        self.local_trainer = None
        self.clients: dict[int, NodeClient | None] = {}  # node id -> its client (None: no data in this run)

    def client(self, node_id: int, node: NodeData) -> NodeClient | None:
        if node_id not in self.clients:
            self.clients[node_id] = self._load_client(node)
        return self.clients[node_id]

    def _load_client(self, node: NodeData) -> NodeClient | None:
        found = node_samples(self.settings, node)
        if found is None:
            logger.info("Partition %d has no client in this run's dataset: the node stays idle", node.partition_id)
            return None
        client_id, samples = found
        s = self.script_args
        tokenize = _entry(self.settings.task).tokenize_clients
        data = tokenize([samples], self.tokenizer, s.template, s.seq_length, [client_id])[0]
        return NodeClient(node.partition_id, client_id, data, samples[0])

    def trainer_for(self, client: NodeClient):
        """The LocalTrainer, built on first use exactly as the entry script builds it."""
        if self.local_trainer is None:
            from federated.setup import load_lora_model, local_trainer

            s = self.script_args
            model = load_lora_model(s, self.settings.fed_args)  # ffa freezes A before the flat view
            if self.settings.task == "sft":
                trainer = _entry("sft").build_sft_trainer(model, self.tokenizer, s, client.data)
            else:
                from utils.preference import pair_texts
                trainer = _entry("dpo").build_dpo_trainer(model, self.tokenizer, s, self.settings.dpo_args,
                                                          pair_texts(s.template, self.tokenizer, client.first_sample))
            self.local_trainer = local_trainer(trainer, model, s)
        return self.local_trainer


def node_samples(settings: RunSettings, node: NodeData):
    """(client id, raw samples) of this node, or None when the run's dataset has no client at its partition."""
    from federated.setup import load_dataset_for, select_clients

    s, task = settings.script_args, settings.task
    if node.data_file:  # a silo: its own file, one client
        dataset = load_dataset_for(replace(s, local_data_dir=node.data_file), kinds=KINDS[task], entry=ENTRY[task])
        if dataset.num_clients != 1:
            raise SystemExit(f"node-config data-file {node.data_file} holds {dataset.num_clients} clients; a silo's "
                             f"file holds one (client id -> its samples).")
        return dataset.client_ids[0], dataset.clients[0]
    dataset = load_dataset_for(s, kinds=KINDS[task], entry=ENTRY[task])
    clients = select_clients(dataset, replace(settings.fed_args))
    if node.partition_id >= len(clients):
        return None
    return dataset.client_ids[node.partition_id], clients[node.partition_id]


def _entry(task: str):
    import main_dpo
    import main_sft
    return {"sft": main_sft, "dpo": main_dpo}[task]


def load_server_model(settings: RunSettings):
    """The LoRA model as the entry scripts build it (seeded: the same initial adapter), and its flat view."""
    from federated.flat import FlatParams
    from federated.setup import load_lora_model

    model = load_lora_model(settings.script_args, settings.fed_args)
    return model, FlatParams(model)
