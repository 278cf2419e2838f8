"""How much of --lora_method exact's base delta E a bf16 base weight holds: E's share that is not in W - W0,
for the old fold (each round's residual added to the bf16 W) and the current one (W = W0 + E rounded once, from an
untouched W0; federated/lora_methods.py ExactProduct). SmolLM2's layer-0 q_proj in bf16, random residuals of
std --residual per round (docs/ALGORITHMS.md quotes the default run).

    OMP_NUM_THREADS=1 python benchmarks/bench_exact_bf16.py
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.model import load_base_model  # noqa: E402


def share_lost(applied: torch.Tensor, delta: torch.Tensor) -> float:
    return 1 - float((applied * delta).sum() / (delta * delta).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--residual", type=float, default=8.75e-6, help="std of one round's residual")
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    w0 = load_base_model("smollm2", dtype=torch.bfloat16).model.layers[0].self_attn.q_proj.weight.detach()
    delta, folded = torch.zeros(w0.shape), w0.clone()
    for t in range(1, args.rounds + 1):
        residual = torch.randn(w0.shape) * args.residual
        delta += residual
        folded = folded + residual.to(torch.bfloat16)
        if t in (1, 10, 100, args.rounds):
            from_w0 = (w0.float() + delta).to(torch.bfloat16).float() - w0.float()
            print(f"after {t} rounds: share of E not in W: added to bf16 W {share_lost(folded.float() - w0.float(), delta):.3f}, "
                  f"W0 + E rounded once {share_lost(from_w0, delta):.3f}")


if __name__ == "__main__":
    main()
