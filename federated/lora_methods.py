"""LoRA-native federated methods, orthogonal to the server rule: --lora_method with any --fed_alg that fits.

Every server rule (federated/algorithms.py) treats the flat vector of LoRA factors as ordinary weights. A LoRA
method says what a client starts from, what it uploads, what it keeps, how the factors become the new global
ones, and what crosses the network:

  standard     the factors averaged as weights (no wrapping: the server rule alone)
  ffa          FFA-LoRA (Sun et al., ICLR 2024): every A frozen at its shared random init, only B trained and sent
  exact        FedEx-LoRA (Singhal et al., 2024): factors averaged, and the residual
               mean(s B_i A_i) - s mean(B) mean(A) folded into the frozen base weights: the model is exactly the
               mean of the clients' models
  hetero_rank  FlexLoRA (Bai et al., NeurIPS 2024): client k trains rank r_k (--client_ranks); the server averages
               the full-size products s B_i A_i and refactors the mean by truncated SVD; each client gets its
               first r_k components
  personal     FedSA-LoRA (Guo et al., ICLR 2025): A shared and aggregated, every client's B its own (kept in the
               client store on the CPU, checkpointed)

A method is one class; LoraAlgorithm composes it with the server rule (client part in LoraClientHooks, server part
in LoraAlgorithm), so the round loop, and a remote client that goes through algorithm.client_hooks, need no
per-method code. The maths, and which rules and DP modes each method composes with, are in docs/ALGORITHMS.md.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.weak import WeakIdKeyDictionary

from federated.algorithms import ALGORITHMS, Algorithm, ClientHooks, FedAvgM, FedOpt, Scaffold, parse_local, to_host
from federated.privacy import resolve_mode

logger = logging.getLogger(__name__)

AVERAGING_RULES_ONLY = (FedAvgM, FedOpt)  # their server step is not a mean of the clients' models


@dataclass
class LoraModule:
    """One LoRA-wrapped layer: where its A [r, k] and B [d, r] lie in the flat vector, and its scaling s."""
    name: str
    a: slice
    a_shape: tuple[int, int]
    b: slice
    b_shape: tuple[int, int]
    scaling: float
    base_weight: torch.Tensor | None  # the frozen W [d, k] that s B A is added to

    @property
    def rank(self) -> int:
        return self.a_shape[0]

    @property
    def dense_numel(self) -> int:
        return self.b_shape[0] * self.a_shape[1]

    def factors(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [K, d, r], A [K, r, k]) views of a stack of flat vectors [K, N]."""
        return (vectors[:, self.b].reshape(-1, *self.b_shape), vectors[:, self.a].reshape(-1, *self.a_shape))


class LoraLayout:
    """The flat vector's LoRA structure, from FlatParams' names and shapes (peft's lora_A/lora_B pairs)."""

    def __init__(self, flat, model):
        offsets, offset = {}, 0
        for name, p in flat.named:
            offsets[name] = (slice(offset, offset + p.numel()), tuple(p.shape))
            offset += p.numel()
        self.numel = offset
        self.modules: list[LoraModule] = []
        for name, (a, a_shape) in offsets.items():
            if ".lora_A." not in name:
                continue
            module_name, rest = name.split(".lora_A.")
            adapter = rest.split(".")[0]
            b, b_shape = offsets.get(name.replace(".lora_A.", ".lora_B."), (None, None))
            if b is None:
                raise ValueError(f"{name} has no trainable lora_B partner: this LoRA method needs both factors")
            module = model.get_submodule(module_name)
            self.modules.append(LoraModule(module_name, a, a_shape, b, b_shape, float(module.scaling[adapter]),
                                           module.get_base_layer().weight))
        self.b_mask = torch.zeros(self.numel, dtype=torch.bool)
        for m in self.modules:
            self.b_mask[m.b] = True

    def rank_mask(self, rank: int) -> torch.Tensor:
        """True on the coordinates a client of `rank` trains: A's first `rank` rows, B's first `rank` columns,
        and every non-LoRA coordinate."""
        mask = torch.ones(self.numel, dtype=torch.bool)
        for m in self.modules:
            mask[m.a] = (torch.arange(m.rank)[:, None] < rank).expand(*m.a_shape).reshape(-1)
            mask[m.b] = (torch.arange(m.rank)[None, :] < rank).expand(*m.b_shape).reshape(-1)
        return mask

    def numel_at_rank(self, rank: int) -> int:
        """Coordinates a client of `rank` really holds (its factors at that rank, plus non-LoRA ones)."""
        lora = sum(m.a_shape[0] * m.a_shape[1] + m.b_shape[0] * m.b_shape[1] for m in self.modules)
        return self.numel - lora + sum(rank * (m.a_shape[1] + m.b_shape[0]) for m in self.modules)


def weighted_mean_product(module: LoraModule, vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i B_i A_i [d, k] (without the scaling s)."""
    b, a = module.factors(vectors)
    return torch.einsum("i,idr,irk->dk", weights.to(vectors), b, a)


class LoraMethod:
    """standard: the factors are ordinary weights; the server rule alone. The base of every LoRA method."""
    name = "standard"
    refused_rules: tuple[type, ...] = ()  # server rules this method is not defined with
    refusal = ""  # why, for the message
    needs_client_factors = False  # the server step needs every client's own factors: no DP aggregation
    folds_into_base = False  # changes the frozen base weights (DPO's reference model is the base)

    def __init__(self, fed_args, script_args=None):
        self.fed_args = fed_args
        self.layout: LoraLayout | None = None

    def prepare_model(self, model) -> None:
        """Called on the LoRA-wrapped model before any optimizer or FlatParams is built."""

    def bind(self, layout: LoraLayout, x: torch.Tensor) -> None:
        self.layout = layout

    def init_state(self, x: torch.Tensor) -> dict:
        return {}

    def start_vector(self, client: int, x: torch.Tensor, state: dict, client_store: dict) -> torch.Tensor:
        return x

    def after_optimizer_step(self, client: int, flat) -> None:
        pass

    def upload(self, client: int, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y

    def client_state(self, client: int, y: torch.Tensor) -> dict:
        return {}

    def aggregate(self, rule: Algorithm, x, client_vectors, sample_counts, state, t, uploads) -> torch.Tensor:
        return rule.step(x, client_vectors, sample_counts, state, t, uploads)

    def transfer_numel(self, client: int, numel: int) -> tuple[int, int]:
        """Coordinates client `client` uploads and downloads per round (fp32, excluding a rule's extra vectors)."""
        return numel, numel

    def keep_client_state(self, state: dict, client_store, client: int, kept: dict, round_number: int) -> None:
        """Store what `client` keeps (the rule's state and client_state's) as of round `round_number`."""
        client_store.put(client, kept, round_number)

    def load_global(self, flat, x: torch.Tensor, state: dict, client_store: dict) -> None:
        flat.set(x)

    def client_models(self, x, state, client_store) -> Mapping[int, torch.Tensor]:
        """Each client's own model, where the method keeps one (personalised adapters)."""
        return {}


class FrozenA(LoraMethod):
    """FFA-LoRA: every lora_A keeps its shared random init (requires_grad off before the optimizer and FlatParams
    exist), so the flat vector, the uploads, the server rule and DP noise are B's coordinates only."""
    name = "ffa"

    def prepare_model(self, model):
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)

    def bind(self, layout, x):
        super().bind(layout, x)
        if layout.modules:  # a lora_A in the flat vector: prepare_model was not called on this model
            raise RuntimeError("--lora_method ffa: lora_A is still trainable; load the model with "
                               "federated.setup.load_lora_model(script_args, fed_args)")


_ORIGINAL_WEIGHTS = WeakIdKeyDictionary()  # base weight -> a copy of it as first bound, for ExactProduct


def original_weight(weight: torch.Tensor) -> torch.Tensor:
    """A copy of `weight` as it was the first time any run in this process bound to it (in its own dtype: the
    conversion to fp32 is exact), so that a later federation on the same model starts from the same W0."""
    if weight not in _ORIGINAL_WEIGHTS:
        _ORIGINAL_WEIGHTS[weight] = weight.detach().clone()
    return _ORIGINAL_WEIGHTS[weight]


class ExactProduct(LoraMethod):
    """FedEx-LoRA: the rule averages A and B; the residual s (sum w_i B_i A_i - B_mean A_mean) of every module is
    added to a dense base delta E (fp32 server state, checkpointed), and every module's frozen weight is set to
    (W0 + E) rounded once to W's dtype, from an untouched copy of the original W0. The residuals are never added to
    W itself: in bf16 a round's small residual would be rounded away (the method would silently become FedAvg),
    and a resumed run would round differently from an uninterrupted one. Every federation on the same model
    (--client_groups) starts from the same W0."""
    name = "exact"
    refused_rules = AVERAGING_RULES_ONLY
    refusal = "its server step is not a weighted mean of the clients' models, so no residual makes it exact"
    needs_client_factors = True
    folds_into_base = True

    def bind(self, layout, x):
        super().bind(layout, x)
        self.dense = []
        offset = 0
        for m in layout.modules:
            self.dense.append(slice(offset, offset + m.dense_numel))
            offset += m.dense_numel
        self.dense_numel = offset
        self.w0 = [original_weight(m.base_weight) for m in layout.modules]
        self.applied_rounds = None  # the base delta's age that the model's W holds; None: not set by this run yet

    def init_state(self, x):
        return {"base_delta": torch.zeros(self.dense_numel, device=x.device, dtype=torch.float32),
                "base_rounds": torch.zeros((), dtype=torch.int64)}  # residuals folded into base_delta so far

    @torch.no_grad()
    def sync_base(self, state: dict) -> None:
        """Set every module's frozen W to W0 + E (E the server's base delta) when E has changed since this run
        last set it: a function of E alone, so the same after a resume, in any dtype."""
        rounds = int(state["base_rounds"])
        if rounds == self.applied_rounds:
            return
        delta = state["base_delta"]
        for m, dense, w0 in zip(self.layout.modules, self.dense, self.w0):
            e = delta[dense].view(m.b_shape[0], m.a_shape[1]).to(w0.device, torch.float32)
            m.base_weight.copy_((w0.to(torch.float32) + e).to(m.base_weight.dtype))
        self.applied_rounds = rounds

    def start_vector(self, client, x, state, client_store):
        self.sync_base(state)
        return x

    def aggregate(self, rule, x, client_vectors, sample_counts, state, t, uploads):
        new = rule.step(x, client_vectors, sample_counts, state, t, uploads)
        weights = rule.weights(sample_counts)
        mean = (weights.to(client_vectors) @ client_vectors).unsqueeze(0)
        for m, dense in zip(self.layout.modules, self.dense):
            b_mean, a_mean = m.factors(mean)
            residual = weighted_mean_product(m, client_vectors, weights) - b_mean[0] @ a_mean[0]
            state["base_delta"][dense] += m.scaling * residual.reshape(-1)
        state["base_rounds"] += 1
        return new

    def transfer_numel(self, client, numel):
        # Download: the factors and the base delta since the client's last round, one dense [d, k] per module
        # (an upper bound: a client sampled in consecutive rounds could receive only the newest residual).
        return numel, numel + self.dense_numel

    def load_global(self, flat, x, state, client_store):
        self.sync_base(state)
        flat.set(x)


def parse_client_ranks(spec: str, num_clients: int | None = None) -> list[int] | dict[int, int]:
    """--client_ranks: a comma list cycled over the clients ("4,8,16": client k gets the (k mod 3)-th), or a JSON
    file holding such a list or an object {client index: rank}."""
    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise SystemExit(f"--client_ranks {spec}: no such file; give a JSON list or object, or a comma list.")
        loaded = json.loads(path.read_text())
        ranks = {int(k): v for k, v in loaded.items()} if isinstance(loaded, dict) else list(loaded)
    else:
        try:
            ranks = [int(r) for r in spec.split(",")]
        except ValueError:
            raise SystemExit(f"--client_ranks {spec!r}: give comma-separated integers (4,8,16) or a .json file.")
    values = ranks.values() if isinstance(ranks, dict) else ranks
    if not values or any(not isinstance(r, int) or r < 1 for r in values):
        raise SystemExit(f"--client_ranks {spec!r}: every rank must be a positive integer.")
    return ranks


def client_rank(ranks: list[int] | dict[int, int], client: int, default: int) -> int:
    if isinstance(ranks, dict):
        return ranks.get(client, default)
    return ranks[client % len(ranks)]


class HeteroRank(LoraMethod):
    """FlexLoRA: the model stays at r_max = --peft_lora_r; client k trains its first r_k components (A's other rows
    and B's other columns are zero and stay zero); the server refactors sum w_i s B_i A_i by truncated SVD.
    The scaling s = alpha / r_max is the same for every client, so the products are averaged as they are."""
    name = "hetero_rank"
    refused_rules = (*AVERAGING_RULES_ONLY, Scaffold)
    refusal = ("the new global factors are an SVD of the mean product, not a step of the rule on the factors "
               "(SCAFFOLD's control variates would also move the coordinates a low-rank client must keep at zero)")
    needs_client_factors = True

    def __init__(self, fed_args, script_args=None):
        super().__init__(fed_args, script_args)
        self.ranks = parse_client_ranks(fed_args.client_ranks or "")
        self.masks: dict[int, torch.Tensor] = {}

    def bind(self, layout, x):
        super().bind(layout, x)
        self.r_max = max((m.rank for m in layout.modules), default=0)

    def rank_of(self, client: int) -> int:
        return client_rank(self.ranks, client, self.r_max)

    def mask(self, client: int, device) -> torch.Tensor:
        rank = self.rank_of(client)
        if rank not in self.masks:
            self.masks[rank] = self.layout.rank_mask(rank).to(device)
        return self.masks[rank]

    def start_vector(self, client, x, state, client_store):
        return x * self.mask(client, x.device)  # the first r_k SVD components: the best rank-r_k approximation

    @torch.no_grad()
    def after_optimizer_step(self, client, flat):
        # Zero rows and columns get zero gradients, so AdamW leaves them at zero; re-zeroing guards against any
        # optimizer that would not (weight decay on a nonzero value, numerical noise).
        offset, mask = 0, None
        for _, p in flat.named:
            n = p.numel()
            if mask is None:
                mask = self.mask(client, p.device)
            p.mul_(mask[offset:offset + n].view_as(p).to(p.dtype))
            offset += n

    def aggregate(self, rule, x, client_vectors, sample_counts, state, t, uploads):
        new = rule.step(x, client_vectors, sample_counts, state, t, uploads)  # non-LoRA coordinates: the rule
        weights = rule.weights(sample_counts)
        for m in self.layout.modules:
            product = weighted_mean_product(m, client_vectors, weights)
            u, s, vh = torch.linalg.svd(product, full_matrices=False)
            c = min(m.rank, s.numel())  # a layer narrower than r_max has fewer components; the rest stay zero
            root = s[:c].sqrt()  # sqrt(S) into both factors: balanced norms for the next round's training
            b_new, a_new = torch.zeros(m.b_shape, device=x.device), torch.zeros(m.a_shape, device=x.device)
            b_new[:, :c], a_new[:c] = u[:, :c] * root, root[:, None] * vh[:c]
            new[m.b], new[m.a] = b_new.reshape(-1), a_new.reshape(-1)
        return new

    def transfer_numel(self, client, numel):
        n = self.layout.numel_at_rank(self.rank_of(client))
        return n, n


class PersonalB(LoraMethod):
    """FedSA-LoRA: clients upload only A (and non-LoRA coordinates); each keeps its B in the client store. The
    global vector's B stays at the shared init, so the rule moves only what is shared; the 'global model' scored
    after training is the shared A with the mean of the clients' B's (a simulation device: never sent)."""
    name = "personal"
    refused_rules = (Scaffold,)
    refusal = "its control variates would correct each client's own B with the other clients' drift"

    def bind(self, layout, x):
        super().bind(layout, x)
        self.b_mask = layout.b_mask.to(x.device)
        self.b0 = x[self.b_mask].clone()  # the shared LoRA init of B (peft: zeros), a function of the seed

    def init_state(self, x):
        # The scored global B is the mean of the clients' own B's. It is kept as a running sum (fp64) and a count,
        # updated as a client's B changes, so it costs O(sampled clients) per round, whatever the number of clients.
        return {"b_sum": torch.zeros(int(self.b_mask.sum()), dtype=torch.float64, device=x.device),
                "b_clients": torch.zeros((), dtype=torch.int64)}

    def start_vector(self, client, x, state, client_store):
        own = client_store.get(client, {}).get("lora_B")
        start = x.clone()
        start[self.b_mask] = self.b0 if own is None else own.to(x.device, non_blocking=True)
        return start

    def upload(self, client, y, x):
        sent = y.clone()
        sent[self.b_mask] = x[self.b_mask]  # B is not sent: the server sees no change there
        return sent

    def client_state(self, client, y):
        return {"lora_B": to_host(y[self.b_mask])}

    def keep_client_state(self, state, client_store, client, kept, round_number):
        change = kept["lora_B"].to(state["b_sum"].device, torch.float64)
        old = client_store.get(client, {}).get("lora_B")
        if old is None:
            state["b_clients"] += 1
        else:
            change = change - old.to(change.device, torch.float64)
        state["b_sum"] += change
        client_store.put(client, kept, round_number)

    def aggregate(self, rule, x, client_vectors, sample_counts, state, t, uploads):
        new = rule.step(x, client_vectors, sample_counts, state, t, uploads)
        new[self.b_mask] = self.b0  # DP noise on the unsent coordinates is dropped, not applied to anyone's B
        return new

    def transfer_numel(self, client, numel):
        n = numel - int(self.b_mask.sum())
        return n, n

    def load_global(self, flat, x, state, client_store):
        model = x.clone()
        clients = int(state["b_clients"])
        if clients:
            model[self.b_mask] = (state["b_sum"] / clients).to(x.device, torch.float32)
        flat.set(model)

    def client_models(self, x, state, client_store):
        return ClientModels(self, x, state, client_store)


class ClientModels(Mapping):
    """client -> its own model vector, built when asked for: one vector at a time, never one per client in RAM."""

    def __init__(self, method: LoraMethod, x: torch.Tensor, state: dict, client_store):
        self.method, self.x, self.state, self.client_store = method, x, state, client_store

    def __getitem__(self, client: int) -> torch.Tensor:
        if client not in self.client_store:
            raise KeyError(client)
        return self.method.start_vector(client, self.x, self.state, self.client_store)

    def __iter__(self):
        return iter(sorted(self.client_store))

    def __len__(self) -> int:
        return len(self.client_store)


LORA_METHODS: dict[str, type[LoraMethod]] = {
    m.name: m for m in (LoraMethod, FrozenA, ExactProduct, HeteroRank, PersonalB)}


class LoraClientHooks(ClientHooks):
    """The server rule's client hooks, with the LoRA method's start vector, per-step masking, upload and state."""

    def __init__(self, inner: ClientHooks, method: LoraMethod, client: int, x: torch.Tensor, start: torch.Tensor):
        self.inner, self.method, self.client, self.x, self.start = inner, method, client, x, start

    def start_vector(self, x):
        return self.start

    def loss_term(self, flat):
        return self.inner.loss_term(flat)

    def after_optimizer_step(self, flat, lr):
        self.inner.after_optimizer_step(flat, lr)
        self.method.after_optimizer_step(self.client, flat)

    def finish(self, y, steps, lr):
        uploads, state = self.inner.finish(y, steps, lr)
        return uploads, {**state, **self.method.client_state(self.client, y)}

    def upload_vector(self, y):
        return self.method.upload(self.client, y, self.x)

    def metrics(self):
        return self.inner.metrics()


class LoraAlgorithm:
    """A server rule composed with a LoRA method: the Algorithm interface, the rule's attributes passed through."""

    def __init__(self, rule: Algorithm, method: LoraMethod):
        self.rule, self.method = rule, method

    def __getattr__(self, name):  # weights, vectors_per_transfer, fed_args, num_clients, dp_mode, ...
        return getattr(self.rule, name)

    def bind(self, model, flat, x) -> None:
        self.method.bind(LoraLayout(flat, model), x)

    def init_state(self, x, num_clients):
        return {**self.rule.init_state(x, num_clients), **self.method.init_state(x)}

    def client_hooks(self, client, x, state, client_store):
        start = self.method.start_vector(client, x, state, client_store)
        return LoraClientHooks(self.rule.client_hooks(client, start, state, client_store), self.method, client, x,
                               start)

    def step(self, x, client_vectors, sample_counts, state, t, uploads=None):
        return self.method.aggregate(self.rule, x, client_vectors, sample_counts, state, t, uploads or {})

    def transfer_bytes(self, client: int, numel: int) -> tuple[int, int]:
        up, down = self.method.transfer_numel(client, numel)
        extra = (self.rule.vectors_per_transfer - 1) * numel  # e.g. SCAFFOLD's control variates, full size
        return 4 * (up + extra), 4 * (down + extra)

    def keep_client_state(self, run, client: int, state: dict, round_number: int) -> None:
        self.method.keep_client_state(run.server_state, run.client_store, client, state, round_number)

    def load_global(self, flat, run) -> None:
        self.method.load_global(flat, run.x, run.server_state, run.client_store)

    def client_models(self, run) -> dict[int, torch.Tensor]:
        return self.method.client_models(run.x, run.server_state, run.client_store)


def make_lora_method(fed_args) -> LoraMethod:
    return LORA_METHODS[fed_args.lora_method](fed_args)


def compose(rule: Algorithm, fed_args):
    """The rule itself for --lora_method standard, else the rule composed with the method."""
    if fed_args.lora_method == LoraMethod.name:
        return rule
    return LoraAlgorithm(rule, make_lora_method(fed_args))


def check_lora_arguments(fed_args, script_args) -> None:
    """--lora_method and --client_ranks, and the method's fit with the rule, DP and quantisation (before loading)."""
    name = fed_args.lora_method
    if name not in LORA_METHODS:
        raise SystemExit(f"Unknown --lora_method {name!r}: choose one of {', '.join(LORA_METHODS)}.")
    method = LORA_METHODS[name]
    if (fed_args.client_ranks is not None) != (method is HeteroRank):
        raise SystemExit("--client_ranks goes with --lora_method hetero_rank (and it needs them): give both or "
                         "neither.")
    if method is HeteroRank:
        ranks = parse_client_ranks(fed_args.client_ranks)
        values = ranks.values() if isinstance(ranks, dict) else ranks
        if max(values) > script_args.peft_lora_r:
            raise SystemExit(f"--client_ranks {fed_args.client_ranks}: rank {max(values)} exceeds --peft_lora_r "
                             f"{script_args.peft_lora_r}, the model's (largest) rank; raise --peft_lora_r to it.")
    if method is LoraMethod:
        return
    if parse_local(fed_args.fed_alg) is not None and method is not FrozenA:
        raise SystemExit(f"--fed_alg {fed_args.fed_alg} trains one client alone: --lora_method {name} needs a "
                         f"federation (ffa or standard fit local training).")
    rule = ALGORITHMS.get(fed_args.fed_alg, Algorithm)
    if issubclass(rule, method.refused_rules):
        raise SystemExit(f"--lora_method {name} with --fed_alg {fed_args.fed_alg} is not defined: {method.refusal}; "
                         f"use it with fedavg or fedprox.")
    if method.needs_client_factors and resolve_mode(fed_args) is not None:
        raise SystemExit(f"--lora_method {name} needs every client's own factors at the server, and DP releases only "
                         f"their noised mean: drop the --dp_* flags, or use --lora_method ffa or personal with DP.")
    if method.folds_into_base and (script_args.load_in_8bit or script_args.load_in_4bit):
        raise SystemExit(f"--lora_method {name} adds a residual to the frozen base weights, which a quantised model "
                         f"cannot hold exactly: drop --load_in_8bit/--load_in_4bit.")


def check_reference_model(fed_args) -> None:
    """DPO's reference model is the base model with the adapter off: a method that changes the base weights
    would change the reference too. Called by main_dpo.py with check_arguments."""
    if LORA_METHODS[fed_args.lora_method].folds_into_base:
        raise SystemExit(f"--lora_method {fed_args.lora_method} folds a residual into the base weights, which are "
                         f"also DPO's reference model: use another --lora_method with main_dpo.py.")
