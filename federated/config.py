"""Run configuration as dataclasses, parsed once in each entry script's main() (flag names as OpenFedLLM)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FedArguments:
    fed_alg: str = field(default="fedavg", metadata={"help": "fedavg, fedprox, scaffold, fedavgm, fedadagrad, "
                                                             "fedyogi, fedadam, feddp (fedavg + DP paper mode), "
                                                             "or local<k> (client k alone)"})
    lora_method: str = field(default="standard", metadata={
        "help": "how LoRA's factors are federated, with any --fed_alg that fits (federated/lora_methods.py): "
                "standard (averaged as weights), ffa (A frozen, only B trained and sent), exact (FedEx-LoRA: the "
                "mean of the products, residual folded into the base weights), hetero_rank (FlexLoRA: per-client "
                "ranks, SVD redistribution; needs --client_ranks), personal (FedSA-LoRA: A shared, B per client)"})
    client_ranks: str | None = field(default=None, metadata={
        "help": "hetero_rank: client ranks, a comma list cycled over the clients (4,8,16) or a JSON file (a list, "
                "or {client index: rank}); each at most --peft_lora_r, the model's rank"})
    num_clients: int | None = field(default=None, metadata={"help": "clients in the run (default: all of the "
                                                                      "dataset's; fewer takes the first N)"})
    sample_clients: int = field(default=2, metadata={"help": "clients sampled per round"})
    num_rounds: int = field(default=3, metadata={"help": "communication rounds"})
    prox_mu: float = field(default=0.01, metadata={"help": "FedProx mu"})
    fedopt_eta: float = field(default=1e-3, metadata={"help": "server learning rate (FedAdagrad/Yogi/Adam)"})
    fedopt_tau: float = field(default=1e-3, metadata={"help": "adaptivity (FedAdagrad/Yogi/Adam)"})
    fedopt_beta1: float = field(default=0.5, metadata={"help": "server momentum (FedAvgM, FedOpt)"})
    fedopt_beta2: float = field(default=0.99, metadata={"help": "second moment decay (FedYogi/FedAdam)"})
    fedopt_variant: str = field(default="fedllm-bench", metadata={
        "help": "fedllm-bench (the paper's code: m <- mean delta in round 0, v from m^2) or reddi (Reddi et al. "
                "2021, Algorithm 2 exactly: m from 0, v from the squared mean delta); FedAdagrad/Yogi/Adam only"})
    fedopt_bias_correction: bool = field(default=False, metadata={
        "help": "Adam-style (Kingma & Ba) bias correction of the server moments: in neither the paper's code nor "
                "Reddi et al.; with --fedopt_variant fedllm-bench only"})
    fedopt_weighted: bool = field(default=False, metadata={
        "help": "sample-weighted mean delta for FedOpt, the weighting Flower's FedOpt strategies inherit from "
                "FedAvg (the paper's code and Reddi et al. use the unweighted mean)"})
    outlier_ratio: float = field(default=1e3, metadata={"help": "log a client update whose delta norm exceeds this "
                                                                "times the median of the round's other updates"})
    drop_outliers: bool = field(default=False, metadata={"help": "drop such updates from aggregation, as NaN "
                                                                 "updates are"})
    save_model_freq: int | None = field(default=None, metadata={"help": "alias of --checkpoint_step"})
    local_epochs: int | None = field(default=None, metadata={"help": "local<k> only: train client k for this many "
                                                                        "epochs, one round per epoch (the paper's "
                                                                        "local baseline); sets --num_rounds"})
    # User-level DP on top of any server algorithm (federated/privacy.py). It is on when --dp_mode is given, with
    # --fed_alg feddp (paper mode), or when any other --dp_* flag but --dp_delta is given (clip mode).
    dp_mode: str | None = field(default=None, metadata={"help": "paper (Appendix D: noise, no clipping, "
                                                                 "unaccounted) or clip (clipped DP-FedAvg, "
                                                                 "RDP-accounted; the default)"})
    dp_epsilon: float | None = field(default=None, metadata={"help": "paper: the epsilon of the sigma formula; "
                                                                      "clip: alias of --dp_target_epsilon"})
    dp_delta: float = field(default=1e-5, metadata={"help": "the delta of (epsilon, delta)"})
    dp_clip: float | None = field(default=None, metadata={"help": "C: clip mode clips each client's delta to "
                                                                   "this L2 norm; paper mode's formula uses it "
                                                                   "(default 1.0)"})
    dp_max_grad_norm: float | None = field(default=None, metadata={"help": "alias of --dp_clip (paper's name)"})
    dp_sigma: float | None = field(default=None, metadata={"help": "paper mode: noise std, overriding the formula"})
    dp_noise_multiplier: float | None = field(default=None, metadata={"help": "clip mode: z, noise std z C / K"})
    dp_target_epsilon: float | None = field(default=None, metadata={"help": "clip mode: calibrate z so that "
                                                                             "epsilon after --num_rounds is this"})
    # FedCOG (federated/fedcog.py): consensus generation and distillation in local training, with any --fed_alg.
    fedcog: bool = field(default=False, metadata={"help": "FedCOG: each sampled client answers prompts with the "
                                                         "global model, keeps those its own last model disagrees "
                                                         "with most (token KL) and distils them while training "
                                                         "(main_sft.py)"})
    cog_kd_weight: float = field(default=1.0, metadata={"help": "FedCOG: weight of KL(global || local) on the kept "
                                                               "generations in the local loss"})
    cog_num_generate: int = field(default=8, metadata={"help": "FedCOG: prompts answered per client per round"})
    cog_num_keep: int = field(default=4, metadata={"help": "FedCOG: generations kept (largest KL) per client"})
    cog_max_new_tokens: int = field(default=32, metadata={"help": "FedCOG: answer length limit"})
    cog_prompts: str = field(default="own", metadata={"help": "FedCOG prompt source: own (the client's "
                                                             "instructions), public (--cog_public_prompts; "
                                                             "fed-synthetic: generated, disjoint from the test "
                                                             "set) or model (instructions the global model "
                                                             "samples itself, seeded per client and round)"})
    cog_public_prompts: str | None = field(default=None, metadata={"help": "FedCOG: a JSON list of samples (or "
                                                                          "strings) whose instructions are the "
                                                                          "public prompts"})

    def __post_init__(self):
        if self.local_epochs is not None:  # checked with every other flag in check_arguments
            self.num_rounds = self.local_epochs  # each round is one pass over the client's data (local_steps)


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default="smollm2", metadata={"help": "HF id or local path; 'smollm2' is the "
                                                                          "embedded SmolLM2-135M-Instruct"})
    dataset: str = field(default="fed-synthetic", metadata={"help": "dataset name in the registry"})
    dataset_name: str | None = field(default=None, metadata={"help": "alias of --dataset (FedLLM-Bench name)"})
    local_data_dir: str | None = field(default=None, metadata={"help": "released-format JSON file (client id "
                                                                        "-> list of samples)"})
    template: str = field(default="alpaca", metadata={"help": "alpaca, vicuna_v1.1 or chat (the model's own)"})
    learning_rate: float = field(default=2e-5, metadata={"help": "peak local learning rate (cosine over rounds)"})
    batch_size: int = field(default=16, metadata={"help": "local batch size per step"})
    gradient_accumulation_steps: int = field(default=1)
    max_steps: int = field(default=10, metadata={"help": "local steps per client per round"})
    dynamic_local_step: bool = field(default=False, metadata={"help": "steps from client size (ChatbotPA)"})
    seq_length: int = field(default=512, metadata={"help": "maximum tokens per sample"})
    peft_lora_r: int = field(default=16)
    peft_lora_alpha: int = field(default=32)
    peft_lora_dropout: float = field(default=0.05)
    padding_free: bool = field(default=True, metadata={"help": "concatenate each micro-batch's samples into one row "
                                                              "(same loss and gradient as padding, no padding "
                                                              "computed); false pads to the longest sample"})
    token_budget: int | None = field(default=None, metadata={"help": "fill micro-batches up to this many tokens "
                                                                      "instead of batch_size samples; a step still "
                                                                      "takes batch_size x grad. accum. samples"})
    load_in_8bit: bool = field(default=False)
    load_in_4bit: bool = field(default=False)
    gradient_checkpointing: bool = field(default=False)
    output_dir: str = field(default="output")
    checkpoint_step: int = field(default=50, metadata={"help": "save a checkpoint every N rounds (and the last)"})
    seed: int = field(default=2023)
    resume: bool = field(default=False, metadata={"help": "continue the run in --output_dir from its last good "
                                                         "checkpoint (the run-defining settings must match)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "delete an earlier run's checkpoints and "
                                                                       "files in --output_dir and start anew"})
    synthetic_num_clients: int = field(default=20, metadata={"help": "fed-synthetic: number of clients"})
    synthetic_alpha: float = field(default=0.3, metadata={"help": "fed-synthetic: Dirichlet skew of task mixtures"})
    synthetic_seed: int = field(default=0)
    synthetic_mean_samples: int = field(default=64)
    eval_data_dir: str | None = field(default=None, metadata={"help": "evaluation data (same layout as the public "
                                                                       "sources); test sets for leakage removal"})
    source_path: str | None = field(default=None, metadata={"help": "local copy of a FedLLM-Bench source dataset"})
    hf_token: str | None = field(default=None, metadata={"help": "token for gated sources (default: HF_TOKEN)"})
    quality_filter: str | None = field(default=None, metadata={
        "help": "'ira': drop each client's low-IRA samples (FedDQC); 'anchor': drop samples whose influence on a "
                "public anchor set is below one global threshold (CLUES); 'anchor_per_client': each client keeps "
                "its own top share by the same score (data/anchor_quality.py)"})
    quality_threshold: float = field(default=0.0, metadata={"help": "keep samples with IRA >= this"})
    quality_threshold_quantile: float = field(default=0.1, metadata={
        "help": "anchor: the global threshold is this quantile of the anchors' own scores; anchor_per_client: "
                "each client drops this share of its samples"})
    quality_anchor_data: str | None = field(default=None, metadata={
        "help": "anchor filters: a JSON list of good {instruction, response} samples (fed-synthetic datasets: "
                "generated clean, disjoint from the test set, when not given)"})
    quality_anchor_size: int = field(default=48, metadata={"help": "anchors generated for fed-synthetic datasets"})
    quality_checkpoints: int = field(default=3, metadata={"help": "anchor filters: warm-up checkpoints summed in "
                                                                  "the TracIn score"})
    quality_warmup_lr: float = field(default=0.05, metadata={"help": "anchor filters: step size of the warm-up's "
                                                                     "gradient steps on the anchors"})
    quality_order: bool = field(default=False, metadata={"help": "train each client from high to low IRA"})
    quality_model: str | None = field(default=None, metadata={"help": "model scoring IRA (default: the trained one)"})
    feddca: bool = field(default=False, metadata={"help": "FedDCA: each client sends k-means centres of its "
                                                           "instruction embeddings; the server picks one per client "
                                                           "for coverage and returns the nearest public samples, "
                                                           "added to the client's data (data/feddca.py)"})
    dca_clusters: int = field(default=4, metadata={"help": "FedDCA: k-means centres per client"})
    dca_retrieve: int = field(default=16, metadata={"help": "FedDCA: public samples retrieved per chosen centre"})
    dca_public_data: str | None = field(default=None, metadata={"help": "FedDCA: the public pool, a JSON list of "
                                                                       "samples (fed-synthetic: generated over "
                                                                       "every task, disjoint from the test set)"})
    dca_pool_size: int = field(default=480, metadata={"help": "FedDCA: size of the generated fed-synthetic pool"})
    dca_client_encoder: str = field(default="server", metadata={"help": "FedDCA: the clients' encoder: server (the "
                                                                       "server's MiniLM), or FedDCA*'s own cheaper "
                                                                       "one: minilm_l2, hashing, or a Hugging Face "
                                                                       "encoder id, mapped into the server's space"})
    dca_align_ridge: float = field(default=1.0, metadata={"help": "FedDCA*: ridge penalty of the client-to-server "
                                                                   "embedding map fitted on the public pool"})
    client_groups: str | None = field(default=None, metadata={"help": "same_language or similar_language: one "
                                                                      "federation (adapter) per language group"})
    skip_groups: str | None = field(default=None, metadata={"help": "--client_groups: comma-separated groups that "
                                                                    "train no federation, e.g. Telugu"})
    eval_per_task: int | None = field(default=None, metadata={"help": "score the first N held-out samples of "
                                                                        "each task (default: all)"})
    eval_after: bool = field(default=True, metadata={"help": "score the final adapter on the dataset's held-out "
                                                            "test set when it has one (fed-synthetic)"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error: the project's "
                                                            "messages from this level up; libraries log warnings "
                                                            "and errors only, except at debug"})

    def __post_init__(self):
        if self.dataset_name:
            self.dataset = self.dataset_name


@dataclass
class EntryArguments:
    """How an entry script runs, not what it trains: never recorded in args.json, never compared on resume."""
    dry_run: bool = field(default=False, metadata={"help": "check every flag and exit before loading data or a "
                                                           "model; nothing is written (the docs' commands test)"})


DRY_RUN_DONE = "--dry_run: every flag is valid; nothing was loaded or written."


def parse_flags(parser, entry: str) -> list:
    """The dataclasses of an entry script's command line; a flag it does not know (a typo, or an abbreviation:
    the parsers are built with allow_abbrev=False) stops it with one line instead of a traceback."""
    *parsed, unknown = parser.parse_args_into_dataclasses(return_remaining_strings=True)
    if unknown:
        raise SystemExit(f"{entry} does not know {' '.join(unknown)}: `python {entry} --help` lists its flags.")
    return parsed


def dataset_options(script_args: ScriptArguments) -> dict:
    """Keyword options every dataset builder receives (builders ignore the ones they do not use)."""
    options = {k: v for k, v in vars(script_args).items() if k.startswith("synthetic_")}
    options.update({k: getattr(script_args, k) for k in ("eval_data_dir", "source_path", "hf_token")
                    if getattr(script_args, k)})
    return options


FEDOPT_VARIANTS = ("fedllm-bench", "reddi")
QUALITY_FILTERS = ("ira", "anchor", "anchor_per_client")


DCA_CLIENT_ENCODERS = ("server", "minilm_l2", "hashing")  # data.feddca.client_embedder's names


def _known_encoder(name) -> bool:
    """A named client encoder, an existing folder, or a hub id: a mistyped name fails here, not after the data."""
    if not isinstance(name, str):
        return False
    return name in DCA_CLIENT_ENCODERS or Path(name).expanduser().is_dir() or \
        re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith((".", "/"))


def _fail(flag: str, value, requirement: str, fix: str):
    raise SystemExit(f"{flag} {value!r} is invalid: it must be {requirement}; {fix}.")


def _check_number(flag: str, value, *, integer=False, low=None, low_open=True, high=None, optional=False):
    """value is a finite number (an integer if asked) above `low` (or at least it) and below `high`."""
    if value is None and optional:
        return
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if integer:
        finite = finite and float(value).is_integer()
    bound = "" if low is None else (f" > {low:g}" if low_open else f" >= {low:g}")
    bound += "" if high is None else f" and < {high:g}"
    kind = "an integer" if integer else "a finite number"
    if not finite or (low is not None and (value <= low if low_open else value < low)) \
            or (high is not None and value >= high):
        raise SystemExit(f"{flag} {value!r} is invalid: it must be {kind}{bound}; pass such a value, or omit {flag} "
                         f"for its default.")


def check_arguments(script_args: ScriptArguments, fed_args: FedArguments) -> None:
    """Every flag checked before any data or model is loaded: each failure one line naming the flag and the fix."""
    from federated.algorithms import check_algorithm_arguments, parse_local
    from federated.fedcog import check_fedcog_arguments
    from federated.lora_methods import check_lora_arguments
    from federated.privacy import check_privacy_arguments
    from utils.model import check_quantization
    from utils.templates import check_template

    if fed_args.local_epochs is not None and (parse_local(fed_args.fed_alg) is None or fed_args.local_epochs < 1):
        raise SystemExit(f"--local_epochs {fed_args.local_epochs} needs --fed_alg local<k> (one client alone) and "
                         "a positive number of epochs.")
    for flag, value in [("--num_rounds", fed_args.num_rounds), ("--sample_clients", fed_args.sample_clients),
                        ("--max_steps", script_args.max_steps), ("--batch_size", script_args.batch_size),
                        ("--gradient_accumulation_steps", script_args.gradient_accumulation_steps),
                        ("--seq_length", script_args.seq_length), ("--checkpoint_step", script_args.checkpoint_step),
                        ("--peft_lora_r", script_args.peft_lora_r), ("--peft_lora_alpha", script_args.peft_lora_alpha),
                        ("--synthetic_num_clients", script_args.synthetic_num_clients),
                        ("--synthetic_mean_samples", script_args.synthetic_mean_samples)]:
        _check_number(flag, value, integer=True, low=0)
    for flag, value in [("--num_clients", fed_args.num_clients), ("--save_model_freq", fed_args.save_model_freq),
                        ("--eval_per_task", script_args.eval_per_task)]:
        _check_number(flag, value, integer=True, low=0, optional=True)
    _check_number("--token_budget", script_args.token_budget, integer=True, low=0, optional=True)
    _check_number("--learning_rate", script_args.learning_rate, low=0)
    _check_number("--peft_lora_dropout", script_args.peft_lora_dropout, low=0, low_open=False, high=1)
    _check_number("--prox_mu", fed_args.prox_mu, low=0, low_open=False)
    _check_number("--fedopt_eta", fed_args.fedopt_eta, low=0)
    _check_number("--fedopt_tau", fed_args.fedopt_tau, low=0)
    _check_number("--fedopt_beta1", fed_args.fedopt_beta1, low=0, low_open=False, high=1)
    _check_number("--fedopt_beta2", fed_args.fedopt_beta2, low=0, low_open=False, high=1)
    _check_number("--outlier_ratio", fed_args.outlier_ratio, low=1)
    _check_number("--synthetic_alpha", script_args.synthetic_alpha, low=0)
    if fed_args.fedopt_variant not in FEDOPT_VARIANTS:
        _fail("--fedopt_variant", fed_args.fedopt_variant, f"one of {', '.join(FEDOPT_VARIANTS)}",
              "pass --fedopt_variant reddi for Reddi et al.'s Algorithm 2")
    if script_args.quality_filter is not None and script_args.quality_filter not in QUALITY_FILTERS:
        _fail("--quality_filter", script_args.quality_filter, f"one of {', '.join(QUALITY_FILTERS)}",
              "or omit it for no filter")
    _check_number("--quality_threshold_quantile", script_args.quality_threshold_quantile, low=0, high=1)
    _check_number("--quality_anchor_size", script_args.quality_anchor_size, integer=True, low=1)
    _check_number("--quality_checkpoints", script_args.quality_checkpoints, integer=True, low=0)
    _check_number("--quality_warmup_lr", script_args.quality_warmup_lr, low=0)
    for flag, value in [("--dca_clusters", script_args.dca_clusters), ("--dca_retrieve", script_args.dca_retrieve),
                        ("--dca_pool_size", script_args.dca_pool_size)]:
        _check_number(flag, value, integer=True, low=0)
    _check_number("--dca_align_ridge", script_args.dca_align_ridge, low=0)
    if not _known_encoder(script_args.dca_client_encoder):
        _fail("--dca_client_encoder", script_args.dca_client_encoder,
              f"{', '.join(DCA_CLIENT_ENCODERS)}, a local encoder folder or a Hugging Face id (org/name)",
              "or omit it for the server's encoder")
    if script_args.client_groups is not None:
        from data.groups import GROUP_MODES
        if script_args.client_groups not in GROUP_MODES:
            _fail("--client_groups", script_args.client_groups, f"one of {', '.join(GROUP_MODES)}",
                  "or omit it for one federation")
    if script_args.resume and script_args.overwrite_output_dir:
        raise SystemExit("--resume and --overwrite_output_dir contradict each other: pass one of them.")
    check_template(script_args.template)
    check_algorithm_arguments(fed_args)
    check_privacy_arguments(fed_args)
    check_lora_arguments(fed_args, script_args)
    check_fedcog_arguments(fed_args)
    check_quantization(script_args.load_in_8bit, script_args.load_in_4bit)
