"""Server-step kernels: the PyTorch twins against ALGORITHMS.md, the dispatcher, and (marked `triton`) every
Triton kernel against its twin under TRITON_INTERPRET=1.

The interpreter tests live in tests/test_kernels_triton.py and run in a child process started here: the variable
must be set before triton is first imported, so a child process is the only way to be independent of whatever
the rest of the suite imported before (and to leave that rest untouched).

Tolerances (inputs O(1), deltas O(1e-2), fp32 accumulation in both paths, summation orders may differ):
  aggregations, norms, SCAFFOLD, DP without noise: rtol 1e-5, atol 1e-6
  server_update over 3 rounds: x and m atol 1e-6 (a few ulp of x), v rtol 1e-4 (v ~ m^2 inherits m's error)
  noise: sample mean, std and one-sigma mass within 6 standard errors of N(0, sigma^2); bit-identical for the
         same (seed, round, client); uncorrelated (|r| < 6 / sqrt(n)) when any of the three changes.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import reference
from kernels.reference import SERVER_RULES

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ODD_LENGTH = 200_003  # two interpreter blocks of 2^17 with a ragged tail
ABOVE_1M = 1_048_583


def make_round(n: int, k: int, dtype=torch.float32, seed: int = 0, x: torch.Tensor | None = None):
    """(x, client stack [K, N] in dtype, sample-count weights): clients near x, as after local training."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) if x is None else x
    y = (x + 1e-2 * torch.randn(k, n, generator=g)).to(dtype)
    counts = torch.randint(1, 100, (k,), generator=g).float()
    return x, y, counts / counts.sum()


def init_state(n: int, tau: float = 1e-3):
    return torch.zeros(n), torch.full((n,), tau ** 2)


# ------------------------------------------------------------------------------------------------------------
# The twins against the math of ALGORITHMS.md (scalar formulas, one coordinate at a time)
# ------------------------------------------------------------------------------------------------------------

def doc_server_step(rule, x, ys, ws, m, v, t, eta=1e-3, tau=1e-3, beta1=0.5, beta2=0.99):
    """ALGORITHMS.md's server update for one coordinate, in Python floats."""
    if rule == "fedavg":
        return sum(w * y for w, y in zip(ws, ys)), m, v
    d = sum(w * (y - x) for w, y in zip(ws, ys))
    m = d if (t == 0 or rule == "fedadagrad") else beta1 * m + (1 - beta1) * d
    if rule == "fedavgm":
        return x + m, m, v
    sign = (v - m * m > 0) - (v - m * m < 0)
    v = {"fedadagrad": v + m * m, "fedyogi": v - (1 - beta2) * m * m * sign,
         "fedadam": beta2 * v + (1 - beta2) * m * m}[rule]
    return x + eta * m / (math.sqrt(v) + tau), m, v


@pytest.mark.parametrize("rule", reference.SERVER_RULES)
def test_twin_follows_algorithms_md(rule):
    x, y, w = make_round(5, 3, seed=1)
    m, v = init_state(5)
    doc = [(x[i].item(), 0.0, 1e-6) for i in range(5)]
    for t in range(3):
        _, y, _ = make_round(5, 3, seed=10 + t, x=x)
        x = reference.server_update(rule, x, y, w, m, v, t)
        doc = [doc_server_step(rule, xi, y[:, i].tolist(), w.tolist(), mi, vi, t)
               for i, (xi, mi, vi) in enumerate(doc)]
        torch.testing.assert_close(x, torch.tensor([d[0] for d in doc]), rtol=1e-5, atol=1e-7)
        if rule != "fedavg":
            torch.testing.assert_close(m, torch.tensor([d[1] for d in doc]), rtol=1e-4, atol=1e-7)


def test_bias_corrected_fedavgm_takes_the_full_first_step():
    """With bias correction m is an EMA from zero, so the first update must divide by (1 - beta1)."""
    x, y, w = make_round(1000, 2)
    m = torch.zeros(1000)
    new_x = reference.server_update("fedavgm", x, y, w, m, None, 0, bias_correction=True)
    torch.testing.assert_close(new_x, reference.weighted_sum(y, w), rtol=1e-5, atol=1e-6)


def test_scaffold_twin_divides_by_all_clients():
    c = torch.ones(4)
    dc = torch.tensor([[1.0, 2, 3, 4], [3.0, 2, 1, 0]])
    torch.testing.assert_close(reference.scaffold_control_update(c, dc, 8), torch.tensor([1.5, 1.5, 1.5, 1.5]))
    assert c.tolist() == [1.0, 1.0, 1.0, 1.0]  # out of place unless asked
    assert reference.scaffold_control_update(c, dc, 8, out=c) is c  # in place, as SCAFFOLD's server state is
    assert c.tolist() == [1.5, 1.5, 1.5, 1.5]


def lora_scale_round(n: int = 200_000, k: int = 10):
    """x at LoRA scale and clients that moved it by ~1e-4: D = sum_k w_k (y_k - x) is 200x smaller than x."""
    g = torch.Generator().manual_seed(3)
    x = 0.02 * torch.randn(n, generator=g)
    y = x + 1e-4 * torch.randn(k, n, generator=g)
    w = torch.rand(k, generator=g)
    return x, y, w / w.sum(), (w / w.sum()).double()[:, None].mul(y.double() - x.double()).sum(0)


def assert_delta_keeps_its_precision(server_update):
    """m after a FedAvgM step at t=0 is D; summed as sum w y - x it would keep only x's precision (median
    relative error ~2e-5 here), summed as sum w (y - x) its own (~5e-8)."""
    x, y, w, exact = lora_scale_round()
    m = torch.zeros_like(x)
    server_update("fedavgm", x, y, w, m, None, 0)
    relative_error = (m.double() - exact).abs() / exact.abs()
    assert relative_error.median() < 1e-6, relative_error.median()


def test_server_delta_keeps_its_precision():
    assert_delta_keeps_its_precision(reference.server_update)


def test_slicing_matches_one_pass_over_the_whole_vector(monkeypatch):
    """server_update and the SCAFFOLD update work slice by slice; slice edges must not change any element."""
    n, k = 1000, 3
    x, y, w = make_round(n, k)
    c, m, v = torch.randn(n), torch.randn(n) * 1e-2, torch.rand(n) * 1e-4
    whole = [reference.scaffold_control_update(c, y, 7)]
    whole += [reference.server_update(rule, x, y, w, m.clone(), v.clone(), 1) for rule in SERVER_RULES[1:]]
    monkeypatch.setattr(reference, "SLICE", 97)  # 1000 = 10 x 97 + 30: ragged last slice
    sliced = [reference.scaffold_control_update(c, y, 7)]
    sliced += [reference.server_update(rule, x, y, w, m.clone(), v.clone(), 1) for rule in SERVER_RULES[1:]]
    for a, b in zip(whole, sliced):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_clip_factors():
    factors = reference.clip_factors(torch.tensor([0.0, 0.5, 1.0, 4.0]), 1.0)
    torch.testing.assert_close(factors, torch.tensor([1.0, 1.0, 1.0, 0.25]))
    torch.testing.assert_close(reference.clip_factors(torch.tensor([9.0]), None), torch.tensor([1.0]))


def test_dp_twin_clips_every_delta():
    x, y, w = make_round(10_000, 3)
    y[0] = x + 5.0  # a far-away client
    norms = reference.client_delta_norms(x, y)
    torch.testing.assert_close(norms, torch.linalg.vector_norm(y - x, dim=1))
    new_x = reference.dp_aggregate(x, y, w, clip_norm=0.1, noise_std=0.0, seed=0, round_idx=0)
    clipped = (y - x) * torch.clamp(0.1 / norms, max=1.0)[:, None]
    torch.testing.assert_close(new_x, x + w @ clipped, rtol=1e-5, atol=1e-6)
    given = reference.dp_aggregate(x, y, w, clip_norm=0.1, noise_std=0.0, seed=0, round_idx=0, norms=norms)
    torch.testing.assert_close(given, new_x, rtol=0, atol=0)  # norms handed in are the ones it would compute


def test_dp_rejects_out_of_range_keys():
    x, y, w = make_round(10, 2)
    with pytest.raises(ValueError):
        reference.dp_aggregate(x, y, w, None, 1.0, seed=2**31, round_idx=0)
    with pytest.raises(ValueError):
        reference.dp_aggregate(x, y, w, None, 1.0, seed=0, round_idx=0, client_ids=[0, 2**32 - 1])


# ------------------------------------------------------------------------------------------------------------
# Dispatcher
# ------------------------------------------------------------------------------------------------------------

def test_import_is_cheap_and_does_not_import_triton():
    code = "import sys, kernels; assert 'triton' not in sys.modules, 'kernels imported triton'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_cpu_tensors_use_the_twin(monkeypatch):
    monkeypatch.delenv(kernels.FORCE_TRITON_ENV, raising=False)
    assert kernels._backend(torch.zeros(3)) is reference


def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv(kernels.FORCE_TRITON_ENV, "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.weighted_sum(torch.zeros(2, 3), torch.ones(2) / 2)


def noise_stats(sample: torch.Tensor, sigma: float) -> None:
    """Mean, std and the one-sigma mass of a N(0, sigma^2) sample, within 6 standard errors."""
    n = sample.numel()
    assert abs(sample.mean().item()) < 6 * sigma / math.sqrt(n)
    assert abs(sample.std().item() - sigma) < 6 * sigma / math.sqrt(2 * n)
    inside = (sample.abs() < sigma).float().mean().item()
    assert abs(inside - 0.682689) < 6 * math.sqrt(0.682689 * 0.317311 / n)


def assert_uncorrelated(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two noise draws from different streams: no more correlated than chance."""
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 6 / math.sqrt(a.numel())


@pytest.mark.parametrize("per_client", (False, True), ids=("on_mean", "per_client"))
def test_twin_noise_statistics_and_keys(per_client):
    sigma, w = 0.3, torch.tensor([0.5, 0.3, 0.2])
    x, y = torch.zeros(ABOVE_1M), torch.zeros(3, ABOVE_1M)

    def noise(seed=11, round_idx=2, ids=(0, 1, 2)):
        return reference.dp_aggregate(x, y, w, None, sigma, seed, round_idx, per_client, client_ids=list(ids))

    first = noise()
    noise_stats(first, sigma * w.norm().item() if per_client else sigma)
    assert torch.equal(first, noise())
    assert_uncorrelated(first, noise(round_idx=3))
    assert_uncorrelated(first, noise(seed=12))
    if per_client:
        def one_client(client):
            return reference.dp_aggregate(x, y[:1], torch.ones(1), None, sigma, 11, 2, True, client_ids=[client])
        assert_uncorrelated(one_client(4), one_client(5))


# ------------------------------------------------------------------------------------------------------------
# Triton kernels against the twins: tests/test_kernels_triton.py, in a child process with the interpreter
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.triton
def test_triton_kernels_match_twins_under_interpreter():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", kernels.FORCE_TRITON_ENV: "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_kernels_triton.py"), "-q",
                            "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True)
    print(child.stdout[-1500:])
    assert child.returncode == 0, child.stdout[-8000:] + child.stderr[-4000:]


def test_server_update_writes_into_a_given_buffer():
    x, y, w = make_round(1000, 3)
    for rule in ("fedavg", "fedadam"):
        m, v = init_state(1000)
        expected = reference.server_update(rule, x, y, w, m.clone(), v.clone(), 1)
        out = torch.empty(1000)
        assert reference.server_update(rule, x, y, w, m, v, 1, out=out) is out
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
