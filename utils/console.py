"""What an entry script prints: one log format, the project's messages at --log_level, libraries at WARNING.

The console of a run holds its progress bars (rounds, answers), INFO lines a user wants (resumed from, checkpoint
written, DP settings), WARNINGs that ask for an action, and the results on stdout. `configure_console` is called by
main() of each entry script right after parsing, before the heavy libraries are imported.
"""
from __future__ import annotations

import logging
import sys
import warnings

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries that install their own stderr handler: records go through ours instead, once each.
LIBRARIES_WITH_HANDLERS = ("huggingface_hub", "datasets")
LIBRARIES = ("transformers", "torch", "accelerate", "peft", "trl", "bitsandbytes", "httpx", "urllib3", "filelock",
             "opacus", "sentence_transformers", *LIBRARIES_WITH_HANDLERS)


class ProgressAwareHandler(logging.StreamHandler):
    """Writes each record above the progress bars on stderr (tqdm.write) instead of through the middle of one."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise; report like any handler
            self.handleError(record)


def check_log_level(name: str) -> int:
    if name.lower() not in LOG_LEVELS:
        raise SystemExit(f"--log_level {name!r} is not one of {', '.join(LOG_LEVELS)}.")
    return getattr(logging, name.upper())


def configure_console(log_level: str = "info", quantizes: bool = False) -> None:
    """Log format and levels for the process: --log_level for the project; libraries at WARNING or above, except
    at debug, where everything is shown. `quantizes`: whether the run loads a bitsandbytes model."""
    level = check_log_level(log_level)
    library_level = level if level == logging.DEBUG else max(level, logging.WARNING)
    logging.basicConfig(level=library_level, format=LOG_FORMAT, handlers=[ProgressAwareHandler()])
    logging.getLogger().setLevel(library_level)  # basicConfig leaves an already configured root alone
    for name in ("__main__", "federated", "data", "evaluation", "utils", "kernels", "flower_app"):
        logging.getLogger(name).setLevel(level)
    for name in LIBRARIES:
        library = logging.getLogger(name)
        library.setLevel(library_level)
        if name in LIBRARIES_WITH_HANDLERS:
            for handler in [h for h in library.handlers if type(h) is logging.StreamHandler]:
                library.removeHandler(handler)
    import transformers.utils.logging as transformers_logging
    transformers_logging.set_verbosity(library_level)
    transformers_logging.disable_default_handler()  # transformers' records reach the root handler above
    transformers_logging.enable_propagation()
    if level != logging.DEBUG:
        transformers_logging.disable_progress_bar()  # "Loading weights": sub-second for the models trained here
    # peft 0.21.2 (PeftModel.__init__) and trl 1.16.0 (DPOTrainer's reference pass) read transformers' deprecated
    # `is_gradient_checkpointing` alias; the project itself uses `activation_checkpointing`. Nothing for a user to do.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if quantizes:
        from utils.model import note_bitsandbytes_hub_kernel
        note_bitsandbytes_hub_kernel()
    else:
        skip_bitsandbytes()


def skip_bitsandbytes() -> None:
    """Keep bitsandbytes out of a run that does not quantise.

    peft imports bitsandbytes whenever it is installed, and on CPUs with AVX512-BF16 bitsandbytes then asks
    Hugging Face's `kernels` hub package for an optional 4-bit CPU kernel: this project's top-level `kernels/`
    answers that import, and bitsandbytes logs a confusing failure. A run without --load_in_8bit/--load_in_4bit
    needs neither, so bitsandbytes is marked absent for this process (None in sys.modules: `find_spec` returns None,
    `import` raises ImportError), before peft is imported; peft and transformers then skip it."""
    if "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None
