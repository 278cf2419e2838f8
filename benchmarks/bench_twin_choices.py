"""The measurements behind two choices in kernels/reference.py, side by side in one process (CPU).

1. Weighted sum of the K client rows: torch.mv over the whole [K, N] stack, or an axpy chain
   (out.add_(y_k, alpha=w_k)) over cache-sized slices. On the CPU torch.mv here runs on one thread.
2. The server delta D: sum_k w_k y_k - x (one fewer pass, but it cancels: D keeps only the precision of x) or
   sum_k w_k (y_k - x) (ALGORITHMS.md's definition, K extra subtractions). Time, and relative error against float64.

3. With --previous FILE (an older kernels/reference.py, e.g. from `git show REV:kernels/reference.py`): the server
   step of that twin and of this one, on the same vectors.

    python benchmarks/bench_twin_choices.py [--threads 2] [--slice 524288] [--previous /tmp/old_reference.py]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_kernels import timed  # noqa: E402  (this script's folder is on sys.path)
from kernels import reference  # noqa: E402


def best_ms(fn) -> float:
    return timed(fn, repeats=7, device=torch.device("cpu"))


def sliced(n: int, size: int):
    return [slice(start, start + size) for start in range(0, n, size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--slice", type=int, default=1 << 19)
    parser.add_argument("--n", type=int, default=8_388_608, help="coordinates (Llama-2-7B LoRA r=16 q/v: 8.4M)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--previous", default=None, help="an older kernels/reference.py to time beside this one")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = 0.02 * torch.randn(args.n, generator=g)  # LoRA-scale weights
    y = x + 1e-4 * torch.randn(args.k, args.n, generator=g)  # one round of local training moves them a little
    w = torch.rand(args.k, generator=g)
    w /= w.sum()
    wl, out, scratch = w.tolist(), torch.empty(args.n), torch.empty(args.slice)
    parts = sliced(args.n, args.slice)

    def axpy_chain(with_x: bool):
        for p in parts:
            o, xp, sc = out[p], x[p], scratch[:out[p].numel()]
            if with_x:  # sum_k w_k (y_k - x)
                torch.sub(y[0, p], xp, out=o).mul_(wl[0])
                for k in range(1, args.k):
                    o.add_(torch.sub(y[k, p], xp, out=sc), alpha=wl[k])
            else:
                torch.mul(y[0, p], wl[0], out=o)
                for k in range(1, args.k):
                    o.add_(y[k, p], alpha=wl[k])

    def cancelling():
        axpy_chain(False)
        for p in parts:
            out[p].sub_(x[p])

    print(f"CPU, {torch.get_num_threads()} threads; N={args.n}, K={args.k}, slice={args.slice}; best of 7")
    print(f"weighted sum: torch.mv {best_ms(lambda: torch.mv(y.t(), w, out=out)):.1f} ms, "
          f"sliced axpy chain {best_ms(lambda: axpy_chain(False)):.1f} ms")
    exact = (w.double()[:, None] * (y.double() - x.double())).sum(0)
    for name, fn in (("sum_k w_k y_k - x", cancelling), ("sum_k w_k (y_k - x)", lambda: axpy_chain(True))):
        ms = best_ms(fn)
        err = ((out.double() - exact).abs() / exact.abs().clamp_min(1e-30))[::max(1, args.n // 2_000_000)]
        print(f"delta {name}: {ms:.1f} ms; relative error median {err.median():.1e}, "
              f"99th percentile {err.quantile(0.99):.1e}")
    if args.previous:
        compare_twins(args.previous, x, y, w, out)


def compare_twins(previous_path: str, x, y, w, out) -> None:
    """The server step of an older twin and of this one, same vectors, results into a reused buffer."""
    spec = importlib.util.spec_from_file_location("previous_reference", previous_path)
    previous = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(previous)
    for rule in ("fedavg", "fedavgm", "fedadam"):
        times = []
        for twin in (previous, reference):
            m, v = torch.zeros_like(x), torch.full_like(x, 1e-6)
            times.append(best_ms(lambda: twin.server_update(rule, x, y, w, m, v, 1, out=out)))
        print(f"server step {rule}: previous twin {times[0]:.1f} ms, this twin {times[1]:.1f} ms")


if __name__ == "__main__":
    main()
