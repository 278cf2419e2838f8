"""What a node and the server build for a run, from the entry scripts' own functions: a node loads its client's
samples (a partition of the run's dataset, or the silo's own file), tokenises them once, and builds the model,
the trainer and its LocalTrainer once per run; the server builds the LoRA layout (the initial global vector, and
the adapter its checkpoints save) without the base model's weights.

At scale (hundreds of nodes in simulation, a few Ray actors serving them in turn) a worker loads the run's
dataset once and keeps it, and keeps the tokenised samples of the last TOKENISED_PER_WORKER nodes it served
(least recently used dropped): its memory is bounded whatever the number of nodes.
"""
from __future__ import annotations

import logging
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from flower_app.config import NodeData, RunSettings

logger = logging.getLogger(__name__)

KINDS = {"sft": ("sft", "multiturn"), "dpo": ("preference",)}
TOKENISED_PER_WORKER = 16  # nodes whose tokenised samples a worker keeps (a simulation actor serves many)
ENTRY = {"sft": "main_sft.py", "dpo": "main_dpo.py"}


def lr_min(task: str) -> float:
    return _entry(task).LR_MIN


@dataclass
class NodeClient:
    """One node's client for the whole run: its partition, raw and tokenised samples."""
    partition_id: int
    client_id: str
    data: object  # the tokenised datasets.Dataset
    samples: list[dict]  # the raw samples (FedCOG's own prompts; DPOTrainer is built with the first text pair)


class Worker:
    """A process that trains clients for one run: one tokenizer, model, trainer and LocalTrainer, whichever client
    it trains (as main_sft.py trains every client on one trainer), the run's dataset (loaded on first need) and
    the tokenised data of its last TOKENISED_PER_WORKER nodes. In simulation one Ray actor process serves many
    virtual nodes in turn; a SuperNode serves one."""

    def __init__(self, settings: RunSettings):
        from utils.model import load_tokenizer

        self.settings = settings
        # The trainer's scratch folder stays on the node (removed with the process), never in the server's folder.
        self.scratch = tempfile.TemporaryDirectory(prefix="fedllm-node-")
        self.script_args = replace(settings.script_args, output_dir=self.scratch.name)
        self.tokenizer = load_tokenizer(self.script_args.model_name_or_path, self.script_args.seq_length)
        self.local_trainer = None
        self.dataset = None  # the run's dataset, loaded on first need
        self.partitions = None  # (client ids, each client's raw samples) of the run's dataset, once loaded
        self.clients: OrderedDict[int, NodeClient | None] = OrderedDict()  # node id -> its client, recent last

    def client(self, node_id: int, node: NodeData) -> NodeClient | None:
        if node_id in self.clients:
            self.clients.move_to_end(node_id)
        else:
            self.clients[node_id] = self._load_client(node)
            while len(self.clients) > TOKENISED_PER_WORKER:
                self.clients.popitem(last=False)
        return self.clients[node_id]

    def _load_client(self, node: NodeData) -> NodeClient | None:
        found = self._samples(node)
        if found is None:
            logger.info("Partition %d has no client in this run's dataset: the node stays idle", node.partition_id)
            return None
        client_id, samples = found
        s = self.script_args
        tokenize = _entry(self.settings.task).tokenize_clients
        data = tokenize([samples], self.tokenizer, s.template, s.seq_length, [client_id])[0]
        return NodeClient(node.partition_id, client_id, data, samples)

    def _samples(self, node: NodeData):
        """(client id, raw samples) of this node, or None when the run's dataset has no client at its partition."""
        if node.data_file:
            return silo_samples(self.settings, node.data_file)
        if self.partitions is None:
            self.partitions = run_partitions(self.settings, self.run_dataset())
        client_ids, clients = self.partitions
        if node.partition_id >= len(clients):
            return None
        return client_ids[node.partition_id], clients[node.partition_id]

    def run_dataset(self):
        """The run's dataset as main_sft.py/main_dpo.py load it, loaded once."""
        if self.dataset is None:
            from federated.setup import load_dataset_for

            task = self.settings.task
            self.dataset = load_dataset_for(self.settings.script_args, kinds=KINDS[task], entry=ENTRY[task])
        return self.dataset

    def fedcog_dataset(self):
        """The run's dataset when FedCOG's public prompts come from it (--cog_prompts public without
        --cog_public_prompts: fed-synthetic's, disjoint from its test set), else None: a node with its own data
        file loads the run's dataset only then."""
        f = self.settings.fed_args
        if f.fedcog and f.cog_prompts == "public" and not f.cog_public_prompts:
            return self.run_dataset()
        return None

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
                                                          pair_texts(s.template, self.tokenizer, client.samples[0]))
            self.local_trainer = local_trainer(trainer, model, s)
        return self.local_trainer


def silo_samples(settings: RunSettings, data_file: str):
    """(client id, samples) of a silo's own file, which holds one client."""
    from federated.setup import load_dataset_for

    s, task = settings.script_args, settings.task
    dataset = load_dataset_for(replace(s, local_data_dir=data_file), kinds=KINDS[task], entry=ENTRY[task])
    if dataset.num_clients != 1:
        raise SystemExit(f"node-config data-file {data_file} holds {dataset.num_clients} clients; a silo's file "
                         f"holds one (client id -> its samples): write one with python -m flower_app.split.")
    return dataset.client_ids[0], dataset.clients[0]


def run_partitions(settings: RunSettings, dataset) -> tuple[list[str], list[list[dict]]]:
    """The run's clients as main_sft.py/main_dpo.py choose them: (client ids, each client's raw samples)."""
    from federated.setup import select_clients

    clients = select_clients(dataset, replace(settings.fed_args))
    return dataset.client_ids[:len(clients)], clients


def _entry(task: str):
    import main_dpo
    import main_sft
    return {"sft": main_sft, "dpo": main_dpo}[task]


def adapter_dtype(script_args) -> torch.dtype:
    """The dtype the LoRA weights pass through when peft creates them next to the base layer as the entry scripts
    load it (peft casts to the base layer's float dtype, then back to fp32): the same initial values."""
    if script_args.load_in_8bit:
        return torch.float32  # int8 base weights: peft does not cast
    if script_args.load_in_4bit or torch.cuda.is_available():
        return torch.bfloat16  # 4-bit's compute dtype; bf16 base weights on a GPU
    return torch.float32


def layout_model(script_args, fed_args):
    """The LoRA-wrapped model without the base model's weights: the architecture from the model's config on the
    meta device, every Linear's weight a one-element CPU stand-in of the right shape and dtype (peft puts each
    adapter next to its base layer's weight), LoRA seeded and prepared as federated.setup.load_lora_model does:
    the same initial adapter, bit for bit, in the memory of the adapter alone, and never on an accelerator."""
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    from federated.lora_methods import make_lora_method
    from utils.model import resolve_model_path, wrap_with_lora

    s = script_args
    set_seed(s.seed)
    dtype = adapter_dtype(s)
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(s.model_name_or_path))
    except OSError as err:
        raise SystemExit(f"Could not read the config of model {s.model_name_or_path!r}: {err}. Pass a local "
                         f"directory or omit model-name-or-path for the embedded SmolLM2.") from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            stand_in = torch.empty((), dtype=dtype).expand(module.weight.shape)
            module.weight = torch.nn.Parameter(stand_in, requires_grad=False)
    model = wrap_with_lora(model, r=s.peft_lora_r, alpha=s.peft_lora_alpha, dropout=s.peft_lora_dropout)
    make_lora_method(fed_args).prepare_model(model)
    return model


def load_server_model(settings: RunSettings):
    """The server's LoRA model (layout_model: no base weights) and its flat view, on the CPU."""
    from federated.flat import FlatParams

    model = layout_model(settings.script_args, settings.fed_args)
    return model, FlatParams(model)
