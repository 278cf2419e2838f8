"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random Llama saved as a local model directory."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED_EVAL_DATA = ROOT.parent / "shared" / "eval_data"
# Real evaluation data lives beside the checkout (never copied in); a checkout elsewhere skips what needs it.
needs_eval_data = pytest.mark.skipif(not SHARED_EVAL_DATA.is_dir(),
                                     reason="../shared/eval_data (real evaluation data) is not beside this checkout")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the slow end-to-end tests (CI does)")


def pytest_collection_modifyitems(config, items):
    """Slow tests run in CI (CI set) or with --runslow; a plain local run stays fast."""
    if config.getoption("--runslow") or os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason="slow: runs in CI, or pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smol_tokenizer():
    from utils.model import load_tokenizer
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def tokenizer():
    """A fresh SmolLM2 tokenizer per test module, for tests that may change its settings."""
    from utils.model import load_tokenizer
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A tiny random Llama in eval mode, for scoring tests."""
    from utils.model import tiny_llama
    return tiny_llama(tokenizer).eval()


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model trains fastest on one thread, and the two cores are shared."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer: real code paths in seconds."""
    from utils.model import tiny_llama
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(smol_tokenizer).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return str(path)


def run_entry(module, argv: list[str]):
    """Run an entry script's main() in this process with the given command line."""
    saved = sys.argv
    sys.argv = [module.__file__, *map(str, argv)]
    try:
        return module.main()
    finally:
        sys.argv = saved
