"""Server-step benchmark: per-key eager loop vs flat-buffer PyTorch twin vs Triton kernel, against the memory bound.

The server step is memory-bound: it must read the K client vectors (and x, m, v) once and write the new x (and
m, v) once. For every case this script reports, side by side in one run:
  per-key  the reference code's style (OpenFedLLM): a dict of per-parameter tensors per client and one small op
           per parameter tensor per client;
  flat     the PyTorch twin in kernels/reference.py on one [K, N] buffer, writing into a reused result buffer
           (also shown with a fresh result tensor: on the CPU its page faults cost as much as the step);
  triton   the fused kernel in kernels/triton_kernels.py (only when CUDA is present);
with the bytes the step must move, achieved GB/s, and the memory bound: bytes / device-to-device copy bandwidth
measured in the same run (copy of a large buffer, read + write counted).

Shapes: Llama-2-7B LoRA on q_proj/v_proj (32 layers x 2 modules x (A r x 4096 + B 4096 x r)): r=16 is 8.4M
parameters, r=64 is 33.6M; K in {2, 5, 10}; and a Fed-ChatbotPA round (10 clients sampled of 747 with
sample-count weights; SCAFFOLD's control update divides by all 747).

    python benchmarks/bench_kernels.py            # full grid
    python benchmarks/bench_kernels.py --quick    # r=16 only, fewer repeats (shared CPUs)
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import reference  # noqa: E402

LAYERS, HIDDEN, MODULES = 32, 4096, ("q_proj", "v_proj")
CHATBOTPA_CLIENTS, CHATBOTPA_SAMPLED = 747, 10
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}  # HBM peak of the SXM parts, GB/s
STATE_BYTES = {"fedavg": 4, "fedavgm": 16, "fedadam": 24, "scaffold": 8}  # fp32 bytes per coordinate beyond Y


def lora_shapes(rank: int) -> dict[str, tuple[int, int]]:
    """Parameter name -> shape of the LoRA adapters of Llama-2-7B's q_proj and v_proj."""
    shapes = {}
    for layer in range(LAYERS):
        for module in MODULES:
            prefix = f"model.layers.{layer}.self_attn.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, HIDDEN)
            shapes[f"{prefix}.lora_B.weight"] = (HIDDEN, rank)
    return shapes


def per_key_views(flat: torch.Tensor, shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """A state dict whose tensors are views into one flat vector (same memory traffic as separate tensors)."""
    views, offset = {}, 0
    for name, shape in shapes.items():
        size = shape[0] * shape[1]
        views[name] = flat[offset:offset + size].view(shape)
        offset += size
    return views


# ----------------------------------------------------------------------------------------------------------------
# (a) the per-key eager loop of the reference code
# ----------------------------------------------------------------------------------------------------------------

def per_key_step(rule, x, clients, weights, m, v, t, eta=1e-3, tau=1e-3, beta1=0.5, beta2=0.99, num_clients=1):
    """One server step in the reference code's style: for every parameter, one small op per client."""
    new = {}
    for key, x_key in x.items():
        if rule == "fedavg":
            new[key] = sum(client[key] * w for client, w in zip(clients, weights))
        elif rule == "scaffold":
            new[key] = x_key + sum(client[key] for client in clients) / num_clients
        else:
            delta = sum((client[key] - x_key) * w for client, w in zip(clients, weights))
            m[key] = delta if t == 0 else beta1 * m[key] + (1 - beta1) * delta
            if rule == "fedavgm":
                new[key] = x_key + m[key]
            else:
                v[key] = beta2 * v[key] + (1 - beta2) * m[key] ** 2
                new[key] = x_key + eta * m[key] / (torch.sqrt(v[key]) + tau)
    return new


# ----------------------------------------------------------------------------------------------------------------
# (b) flat twin and (c) Triton: the same call on the flat buffers
# ----------------------------------------------------------------------------------------------------------------

def flat_step(module, rule, x, y, weights, m, v, t, num_clients, out=None):
    """The flat call; `out` reuses a result buffer as a training loop can (a fresh one costs page faults)."""
    if rule == "scaffold":
        return module.scaffold_control_update(x, y, num_clients, out=out)
    return module.server_update(rule, x, y, weights, m, v, t, out=out)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Best wall time of fn in ms over `repeats` calls after a warm-up: the least disturbed by other processes."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return min(samples)


def copy_bandwidth(device: torch.device, repeats: int, mib: int = 512) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), repeats, device)
    return 2 * src.numel() * 4 / ms / 1e6


def case_weights(k: int, chatbotpa: bool) -> torch.Tensor:
    """Sample-count weights of round 0; for Fed-ChatbotPA, of the clients sampled as ALGORITHMS.md does."""
    counts_rng = random.Random(747)
    all_counts = [max(1, int(counts_rng.lognormvariate(2.2, 0.9))) for _ in range(CHATBOTPA_CLIENTS)]
    sampled = sorted(random.Random(0).sample(range(CHATBOTPA_CLIENTS), CHATBOTPA_SAMPLED)) if chatbotpa \
        else list(range(k))
    counts = torch.tensor([all_counts[i] for i in sampled], dtype=torch.float32)
    return counts / counts.sum()


def run_case(name, rank, k, rule, dtype, device, repeats, copy_gbps, triton_module):
    """Time the three paths for one case; returns one result row."""
    shapes = lora_shapes(rank)
    n = sum(a * b for a, b in shapes.values())
    chatbotpa = name == "chatbotpa"
    weights = case_weights(k, chatbotpa)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, generator=gen, device=device)
    y = (x + 1e-2 * torch.randn(k, n, generator=gen, device=device)).to(dtype)
    m, v = torch.zeros_like(x), torch.full_like(x, 1e-6)
    num_clients = CHATBOTPA_CLIENTS if chatbotpa else k
    x_keys = per_key_views(x, shapes)
    clients = [per_key_views(row, shapes) for row in y]
    m_keys, v_keys = per_key_views(m.clone(), shapes), per_key_views(v.clone(), shapes)
    w_list = weights.tolist()

    moved = k * n * y.element_size() + STATE_BYTES[rule] * n
    row = {"case": name, "rank": rank, "N": n, "K": k, "rule": rule, "dtype": str(dtype).replace("torch.", ""),
           "MB": moved / 1e6, "bound_ms": moved / copy_gbps / 1e6}
    row["per_key_ms"] = timed(lambda: per_key_step(rule, x_keys, clients, w_list, m_keys, v_keys, 1,
                                                   num_clients=num_clients), repeats, device)
    out = torch.empty_like(x)
    row["flat_new_out_ms"] = timed(lambda: flat_step(reference, rule, x, y, weights, m, v, 1, num_clients),
                                   repeats, device)
    row["flat_ms"] = timed(lambda: flat_step(reference, rule, x, y, weights, m, v, 1, num_clients, out),
                           repeats, device)
    if triton_module is not None:
        row["triton_ms"] = timed(lambda: flat_step(triton_module, rule, x, y, weights, m, v, 1, num_clients, out),
                                 repeats, device)
    return row


def format_table(rows: list[dict], copy_gbps: float, peak: float | None) -> str:
    """Markdown table: times, GB/s and the ratios the issue's goals are stated in."""
    has_triton = "triton_ms" in rows[0]
    head = ["case", "N", "K", "rule", "dtype", "MB moved", "bound ms", "per-key ms", "flat ms (new out)",
            "flat ms", "flat GB/s", "per-key/flat", "flat/bound"]
    if has_triton:
        head += ["triton ms", "triton GB/s", "% copy bw", "per-key/triton"]
        if peak:
            head += ["% peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        flat_gbps = r["MB"] / r["flat_ms"]
        cells = [f"{r['case']} r={r['rank']}", f"{r['N'] / 1e6:.1f}M", r["K"], r["rule"], r["dtype"],
                 f"{r['MB']:.0f}", f"{r['bound_ms']:.1f}", f"{r['per_key_ms']:.1f}", f"{r['flat_new_out_ms']:.1f}", f"{r['flat_ms']:.1f}",
                 f"{flat_gbps:.1f}", f"{r['per_key_ms'] / r['flat_ms']:.2f}x", f"{r['flat_ms'] / r['bound_ms']:.2f}x"]
        if has_triton:
            tri_gbps = r["MB"] / r["triton_ms"]
            cells += [f"{r['triton_ms']:.3f}", f"{tri_gbps:.0f}", f"{100 * tri_gbps / copy_gbps:.0f}%",
                      f"{r['per_key_ms'] / r['triton_ms']:.0f}x"]
            if peak:
                cells += [f"{100 * tri_gbps / peak:.0f}%"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def build_cases(quick: bool, rules: list[str]) -> list[tuple[str, int, int, str]]:
    """(name, rank, K, rule): the Llama-2-7B grid and the Fed-ChatbotPA round."""
    ranks = (16,) if quick else (16, 64)
    cases = [("llama2-7b", rank, k, rule) for rank in ranks for k in (2, 5, 10) for rule in rules]
    cases += [("chatbotpa", 16, CHATBOTPA_SAMPLED, rule) for rule in (*rules, "scaffold")]
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="r=16 only and 3 repeats (shared CPUs)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per path (best reported)")
    parser.add_argument("--rules", default="fedavg,fedadam", help="comma-separated server rules to time")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the client vectors")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    triton_module = None
    if device.type == "cuda":
        from kernels import triton_kernels as triton_module
    copy_gbps = copy_bandwidth(device, repeats)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = next((gbps for key, gbps in PEAK_GBPS.items() if key in name), None)
    print(f"device: {name}; torch {torch.__version__}; copy bandwidth {copy_gbps:.1f} GB/s"
          + (f"; peak {peak:.0f} GB/s" if peak else "") + f"; best of {repeats}")
    rows = [run_case(case, rank, k, rule, getattr(torch, args.dtype), device, repeats, copy_gbps, triton_module)
            for case, rank, k, rule in build_cases(args.quick, args.rules.split(","))]
    print(format_table(rows, copy_gbps, peak))


if __name__ == "__main__":
    main()
