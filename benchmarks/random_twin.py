"""Write a model with the same architecture and tokenizer as SRC but seeded random weights, into DST.

For timing on a machine that cannot receive the real weights (e.g. an offline GPU box whose transfer limit is below
SmolLM2's 98 MB GGUF): tokens/s, MFU, kernel and round timings depend on the shapes, not on the weights' values.
Accuracy figures must never come from such a twin. Pointing FEDLLM_CACHE at a folder whose
models/SmolLM2-135M-Instruct is DST makes the embedded default load it:

    python benchmarks/random_twin.py ~/.cache/fedllm_bench/models/SmolLM2-135M-Instruct \
        /tmp/cache/models/SmolLM2-135M-Instruct --skip_weights      # here: config + tokenizer only (3.5 MB)
    python benchmarks/random_twin.py SRC /tmp/cache/models/SmolLM2-135M-Instruct   # there: the random weights
    FEDLLM_CACHE=/tmp/cache bash benchmarks/gpu_check.sh
"""
import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="a model folder with config.json and tokenizer files")
    parser.add_argument("dst", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_weights", action="store_true", help="copy config and tokenizer only")
    args = parser.parse_args()
    if not (args.src / "config.json").exists():
        raise SystemExit(f"{args.src} has no config.json: pass a model folder (config.json + tokenizer files).")
    args.dst.mkdir(parents=True, exist_ok=True)
    for f in args.src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".gguf")):
            shutil.copy(f, args.dst / f.name)
    if args.skip_weights:
        return
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.src), dtype=torch.float32)
    model.save_pretrained(args.dst)
    print(f"{args.dst}: {sum(p.numel() for p in model.parameters()):,} parameters, random (seed {args.seed})")


if __name__ == "__main__":
    main()
