"""Federated algorithms: each is one small class, registered by name, shared by SFT and DPO.

An algorithm has a server part and a client part:
  init_state(x, num_clients)          -> server state, a dict of tensors (checkpointed generically)
  client_hooks(k, x, state, store)    -> ClientHooks for client k's local training this round
  step(x, Y, counts, state, t, ups)   -> the new global vector, from the sampled clients' vectors Y [K, N]
Server math runs through kernels/ (Triton on CUDA, PyTorch twin otherwise). The math of each method, and where
it follows the paper's code or the original papers, is in docs/ALGORITHMS.md; options beyond the paper are
explicit flags in FedArguments.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

import kernels


class ClientHooks:
    """Trainer-agnostic hooks into local training; the default does nothing (FedAvg and the FedOpt family)."""

    def start_vector(self, x: torch.Tensor) -> torch.Tensor:
        """The vector the client loads before training, from the global one (a LoRA method's personal B or rank
        truncation: federated/lora_methods.py)."""
        return x

    def upload_vector(self, y: torch.Tensor) -> torch.Tensor:
        """What the server receives of the trained vector y, in the flat layout (personal B: not sent)."""
        return y

    def loss_term(self, flat) -> torch.Tensor | None:
        """An extra term added to the local loss (FedProx)."""
        return None

    def after_optimizer_step(self, flat, lr: float) -> None:
        """Called after every local optimizer step (SCAFFOLD's control-variate correction)."""

    def finish(self, y: torch.Tensor, steps: int, lr: float) -> tuple[dict, dict]:
        """After local training: (extra uploads for the server, state the client keeps for later rounds)."""
        return {}, {}

    def metrics(self) -> dict[str, int | float]:
        """This client's own costs of the round (FedCOG's generation: federated/fedcog.py), numbers that the
        server sums over the round's clients into its metrics row (Federation.finish_round); none here."""
        return {}


@dataclass
class Algorithm:
    """FedAvg: x <- sum_i w_i y_i with sample-count weights. The base class of every other algorithm."""
    fed_args: object
    server_rule = "fedavg"
    weighting = "samples"  # "samples": w_i = n_i / sum n_j; "uniform": w_i = 1/K
    vectors_per_transfer = 1  # vectors each sampled client downloads and uploads per round
    shared_with_clients = ()  # names of the server-state entries client_hooks reads (sent to remote clients)
    dp_mode = None  # the DP mode this name turns on (federated/privacy.py); None: only --dp_* flags do

    def init_state(self, x: torch.Tensor, num_clients: int) -> dict[str, torch.Tensor]:
        return {}

    def client_hooks(self, client: int, x: torch.Tensor, state: dict, client_store: dict) -> ClientHooks:
        return ClientHooks()

    def bind(self, model, flat, x: torch.Tensor) -> None:
        """Learn the flat layout (FlatParams) of the run's model before training on it; x is the global vector
        whose shared values a method may keep (the initial one in process, the round's on a Flower node)."""

    def transfer_bytes(self, client: int, numel: int) -> tuple[int, int]:
        """Bytes client `client` uploads and downloads in a round it is sampled (fp32 vectors of numel)."""
        return 4 * numel * self.vectors_per_transfer, 4 * numel * self.vectors_per_transfer

    def keep_client_state(self, run, client: int, state: dict, round_number: int) -> None:
        """Keep what `client` carries to its next round (hooks.finish's state) as of round `round_number` (1-based),
        in the run's client store (on disk: federated/client_store.py)."""
        run.client_store.put(client, state, round_number)

    def load_global(self, flat, run) -> None:
        """Load the global model into the trainable parameters (after every server step, and for evaluation)."""
        flat.set(run.x)

    def client_models(self, run) -> dict[int, torch.Tensor]:
        """Each client's own model vector, where the method keeps one; empty for a shared model."""
        return {}

    def weights(self, sample_counts: list[int]) -> torch.Tensor:
        counts = torch.tensor(sample_counts, dtype=torch.float32)
        if self.weighting == "uniform":
            return torch.full_like(counts, 1.0 / len(counts))
        return counts / counts.sum()

    def step(self, x, client_vectors, sample_counts, state, t, uploads=None) -> torch.Tensor:
        a = self.fed_args
        return kernels.server_update(self.server_rule, x, client_vectors, self.weights(sample_counts),
                                     state.get("m"), state.get("v"), t, eta=a.fedopt_eta, tau=a.fedopt_tau,
                                     beta1=a.fedopt_beta1, beta2=a.fedopt_beta2,
                                     bias_correction=a.fedopt_bias_correction, reddi=self.reddi)

    @property
    def reddi(self) -> bool:
        """Whether the server step is Reddi et al.'s Algorithm 2 (FedOpt rules only)."""
        return False


class FedAvgM(Algorithm):
    """Server momentum on the weighted mean delta: m <- D (t=0) else beta1 m + (1-beta1) D; x <- x + m."""
    server_rule = "fedavgm"

    def init_state(self, x, num_clients):
        return {"m": torch.zeros_like(x)}


class FedOpt(Algorithm):
    """FedAdagrad/FedYogi/FedAdam. By default as FedLLM-Bench's code runs them: unweighted mean delta D, m <- D in
    round 0 (always for FedAdagrad), v from m^2, v initialised to tau^2. --fedopt_variant reddi is Reddi et al.
    2021, Algorithm 2: m from 0 by m <- beta1 m + (1-beta1) D (FedAdagrad too), v from D^2. The other options
    are named for what they are: --fedopt_bias_correction (Adam's), --fedopt_weighted (Flower's weighting)."""

    @property
    def weighting(self):
        return "samples" if self.fed_args.fedopt_weighted else "uniform"

    @property
    def reddi(self) -> bool:
        return self.fed_args.fedopt_variant == "reddi"

    def init_state(self, x, num_clients):
        return {"m": torch.zeros_like(x), "v": torch.full_like(x, self.fed_args.fedopt_tau ** 2)}


class FedAdagrad(FedOpt):
    server_rule = "fedadagrad"


class FedYogi(FedOpt):
    server_rule = "fedyogi"


class FedAdam(FedOpt):
    server_rule = "fedadam"


class ProxHooks(ClientHooks):
    def __init__(self, x: torch.Tensor, mu: float):
        self.x, self.mu = x, mu

    def loss_term(self, flat):
        if self.x.device != flat.named[0][1].device:  # move the anchor once, not every step
            self.x = self.x.to(flat.named[0][1].device)
        return 0.5 * self.mu * flat.squared_distance(self.x)


class FedDP(Algorithm):
    """The paper's name for FedAvg with DP paper mode (Appendix D); DP itself lives in federated/privacy.py."""
    dp_mode = "paper"


class FedProx(Algorithm):
    """FedAvg with the proximal term mu/2 ||y - x||^2 added to every local loss."""

    def client_hooks(self, client, x, state, client_store):
        return ProxHooks(x, self.fed_args.prox_mu)


class ScaffoldHooks(ClientHooks):
    def __init__(self, x: torch.Tensor, c: torch.Tensor, c_i: torch.Tensor):
        self.x, self.c_i = x, c_i
        self.correction = c - c_i  # applied as y <- y - lr (c - c_i) after every optimizer step
        self._device_correction = None

    def after_optimizer_step(self, flat, lr):
        if self._device_correction is None:
            self._device_correction = self.correction.to(flat.named[0][1].device)
        flat.add_(self._device_correction, alpha=-lr)

    def finish(self, y, steps, lr):
        # Option II: c_i+ = (x - y) / (K lr) - (c - c_i); upload dc_i = c_i+ - c_i.
        c_i_new = (self.x - y) / (steps * lr) - self.correction
        return {"control_delta": c_i_new - self.c_i}, {"c": to_host(c_i_new)}


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a GPU tensor, in pinned memory so that the next upload to the GPU is asynchronous."""
    if not tensor.is_cuda:
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)


class Scaffold(Algorithm):
    """SCAFFOLD (option II as in the reference): FedAvg of the models plus control variates c and c_i.
    c lives in the server state (on the GPU when training runs there); every c_i lives on the CPU in the client
    store (pinned memory on a GPU machine), made only when first needed."""
    vectors_per_transfer = 2
    shared_with_clients = ("c",)

    def init_state(self, x, num_clients):
        return {"c": torch.zeros_like(x)}

    def client_hooks(self, client, x, state, client_store):
        c_i = client_store.get(client, {}).get("c")
        c_i = torch.zeros_like(x) if c_i is None else c_i.to(x.device, non_blocking=True)
        return ScaffoldHooks(x, state["c"], c_i)

    def step(self, x, client_vectors, sample_counts, state, t, uploads=None):
        kernels.scaffold_control_update(state["c"], uploads["control_delta"], self.num_clients, out=state["c"])
        return super().step(x, client_vectors, sample_counts, state, t)


ALGORITHMS: dict[str, type[Algorithm]] = {
    "fedavg": Algorithm, "fedprox": FedProx, "scaffold": Scaffold, "fedavgm": FedAvgM,
    "fedadagrad": FedAdagrad, "fedyogi": FedYogi, "fedadam": FedAdam, "feddp": FedDP,
}
LOCAL = re.compile(r"^local(\d+)$")


def algorithm_names() -> str:
    return ", ".join([*ALGORITHMS, "local<k>"])


def parse_local(fed_alg: str) -> int | None:
    """The client index of `local<k>` (any number of digits), or None for a federated algorithm."""
    match = LOCAL.match(fed_alg)
    return int(match.group(1)) if match else None


def check_algorithm_arguments(fed_args) -> None:
    """--fed_alg names a method, and the FedOpt options fit it (checked before any loading)."""
    name = fed_args.fed_alg
    if parse_local(name) is None and name not in ALGORITHMS:
        raise SystemExit(f"Unknown --fed_alg {name!r}: choose one of {algorithm_names()}.")
    if fed_args.fedopt_variant == "reddi":
        if not issubclass(ALGORITHMS.get(name, Algorithm), FedOpt):
            raise SystemExit(f"--fedopt_variant reddi is a FedAdagrad/FedYogi/FedAdam rule; --fed_alg {name} has no "
                             f"adaptive server step: drop the flag or pick one of those methods.")
        if fed_args.fedopt_bias_correction or fed_args.fedopt_weighted:
            raise SystemExit("--fedopt_variant reddi is Algorithm 2 exactly (unweighted, no bias correction): drop "
                             "--fedopt_bias_correction/--fedopt_weighted, or use --fedopt_variant fedllm-bench.")


def make_rule(fed_args, num_clients: int) -> Algorithm:
    """The server rule named by --fed_alg (federated.methods.make_algorithm composes it with --lora_method); local<k>
    trains client k alone and keeps its model (FedAvg of one)."""
    check_algorithm_arguments(fed_args)
    name = fed_args.fed_alg
    local = parse_local(name)
    if local is not None:
        if local >= num_clients:
            raise SystemExit(f"--fed_alg {name}: client index {local} is out of range; this run has "
                             f"{num_clients} clients (local0 ... local{num_clients - 1}).")
        algorithm = Algorithm(fed_args)
    else:
        algorithm = ALGORITHMS[name](fed_args)
    algorithm.num_clients = num_clients
    return algorithm


def server_step(algorithm: Algorithm, x: torch.Tensor, client_vectors: torch.Tensor, sample_counts: list[int],
                state: dict, round_idx: int, uploads: dict | None = None) -> torch.Tensor:
    """The public server update: global vector x [N] (fp32), the sampled clients' vectors [K, N], their sample
    counts, the server state (updated in place) and the 0-based round index -> the new global vector."""
    return algorithm.step(x, client_vectors, sample_counts, state, round_idx, uploads or {})
