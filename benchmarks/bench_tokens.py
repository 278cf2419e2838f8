"""Useful tokens per second and peak memory of local training, padded against padding-free, on batches whose
lengths follow the paper's datasets (FedLLM-Bench Table 1, tokens, mean +- std):

    Fed-Aya      instruction 116 +- 199, response 225 +- 411   (SFT)
    Fed-ChatbotIT instruction  68 +- 119, response 211 +- 176   (SFT)
    Fed-WildChat instruction 331 +- 435, response 506 +- 470   (SFT)
    Fed-ChatbotPA instruction  69 +- 124, response 218 +- 178   (DPO: chosen and rejected both drawn as responses)

Lengths are drawn from a lognormal with the table's mean and standard deviation (sigma^2 = ln(1 + std^2/mean^2),
mu = ln(mean) - sigma^2/2), at least 1 token, and each sequence (instruction + response) is cut at --seq_length
from its end, as the tokenisers cut real samples; token ids are random. Both paths train on the same samples with
the same LocalTrainer step (federated/client.py), each in its own process; peak memory is the rise during training
over the memory in use before it: on the CPU of the resident set (sampled every 5 ms), on a GPU of torch's
allocations.
"Useful" tokens are the real (non-padding) tokens. On a GPU the run also reports model-FLOPs utilisation on useful
tokens, with the usual 6 N + 12 L d T FLOPs per token (N parameters, L layers, d width, T the batch's mean
sequence length; a LoRA step does less, since frozen weights get no gradient, so this is the convention, not a count).

    python benchmarks/bench_tokens.py                                  # SmolLM2, batch 16, limit 1024, 1 step each
    python benchmarks/bench_tokens.py --datasets fed-aya --steps 2 --token_budget 4096
    python benchmarks/bench_tokens.py --batch_size 8 --seq_length 256 --length_scale 0.25   # a loaded CPU
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (task, (instruction mean, std), (response mean, std)), Table 1 of FedLLM-Bench.
SHAPES = {
    "fed-aya": ("sft", (116, 199), (225, 411)),
    "fed-chatbotit": ("sft", (68, 119), (211, 176)),
    "fed-wildchat": ("sft", (331, 435), (506, 470)),
    "fed-chatbotpa": ("dpo", (69, 124), (218, 178)),
}
PATHS = ("padded", "padding-free")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def lognormal_length(rng: np.random.Generator, mean: float, std: float) -> int:
    sigma2 = math.log(1 + (std / mean) ** 2)
    return max(1, round(float(rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2)))))


def draw_samples(shape: str, count: int, seq_length: int, vocab: int, seed: int, scale: float = 1.0) -> list[dict]:
    """`count` samples of the dataset shape (means and stds times `scale`), the same for a given seed."""
    task, instruction, response = SHAPES[shape]
    instruction, response = [scale * v for v in instruction], [scale * v for v in response]
    rng = np.random.default_rng(seed)
    tokens = lambda n: rng.integers(100, vocab, n).tolist()  # noqa: E731
    samples = []
    for _ in range(count):
        prompt = tokens(lognormal_length(rng, *instruction))[:seq_length]
        if task == "sft":
            answer = tokens(lognormal_length(rng, *response))[:seq_length - len(prompt)]
            samples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
        else:  # the DPO collator cuts prompt + answer at the trainer's max_length
            samples.append({"prompt_ids": prompt, "chosen_ids": tokens(lognormal_length(rng, *response)),
                            "rejected_ids": tokens(lognormal_length(rng, *response))})
    return samples


def build_local_trainer(args, task: str, padding_free: bool):
    from federated.config import ScriptArguments
    from federated.setup import load_model_with_lora, local_trainer
    script_args = ScriptArguments(model_name_or_path=args.model, batch_size=args.batch_size,
                                  seq_length=args.seq_length, output_dir="/tmp/bench_tokens",
                                  padding_free=padding_free, token_budget=args.token_budget,
                                  gradient_checkpointing=args.gradient_checkpointing)
    tokenizer, model = load_model_with_lora(script_args)
    if task == "sft":
        from datasets import Dataset
        from main_sft import build_sft_trainer
        placeholder = Dataset.from_list([{"input_ids": [1], "labels": [1]}])  # LocalTrainer brings the data
        trainer = build_sft_trainer(model, tokenizer, script_args, placeholder)
    else:
        import main_dpo
        first = {"prompt": "Hi", "chosen": " Hello", "rejected": " Bye"}
        trainer = main_dpo.build_dpo_trainer(model, tokenizer, script_args, main_dpo.DPOArguments(), first)
    return local_trainer(trainer, model, script_args), len(tokenizer), model


class PeakRSS:
    """The peak resident set size while running, sampled from /proc every 5 ms (the CPU has no peak counter that
    starts at a given moment: ru_maxrss keeps the model loading's peak)."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())


def flops_per_token(config, mean_length: float, params: int) -> float:
    return 6 * params + 12 * config.num_hidden_layers * config.hidden_size * mean_length


def worker(args) -> None:
    """One dataset shape on one path, in this process; prints one JSON line."""
    import torch
    from datasets import Dataset

    from federated.algorithms import ClientHooks
    task = SHAPES[args.shape][0]
    local, vocab, model = build_local_trainer(args, task, args.path == "padding-free")
    cuda = torch.cuda.is_available()
    warm = draw_samples(args.shape, args.batch_size, 32, vocab, seed=1)  # short: first-call costs, not timed
    local.train(Dataset.from_list(warm), 1, 1e-4, ClientHooks(), seed=0)
    data = Dataset.from_list(draw_samples(args.shape, args.batch_size * args.steps, args.seq_length, vocab, seed=0,
                                          scale=args.length_scale))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        start = time.perf_counter()
        local.train(data, args.steps, 1e-4, ClientHooks(), seed=0)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak_mb = ((torch.cuda.max_memory_allocated() - before) if cuda else (rss.peak - rss.start)) / 2 ** 20
    result = {"shape": args.shape, "path": args.path, "useful_tokens": local.tokens["useful"],
              "computed_tokens": local.tokens["computed"], "seconds": seconds, "peak_mb": peak_mb,
              "device": torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"}
    if cuda:
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        base = model.get_base_model()
        params = sum(p.numel() for p in base.parameters())
        samples = args.batch_size * args.steps
        per_token = flops_per_token(base.config, local.tokens["useful"] / samples / (2 if task == "dpo" else 1), params)
        achieved = local.tokens["useful"] * per_token / seconds / 1e12
        result.update({"tflops": achieved, "mfu": achieved / peak if peak else None})
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--datasets", default=",".join(SHAPES))
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=1, help="timed optimizer steps per path")
    parser.add_argument("--token_budget", type=int, default=None, help="token-budget micro-batches (both paths)")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--length_scale", type=float, default=1.0, help="multiply Table 1's means and stds (with a "
                        "proportionally smaller --seq_length: the same shape at a fraction of the cost)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="GPU peak for MFU (default: by GPU name)")
    parser.add_argument("--json", default=None, help="write the results to this file after every worker; a rerun "
                        "with the same file keeps what finished and runs the rest")
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        args.shape, args.path = args.worker
        worker(args)
        return
    results = load_finished(args.json)
    passthrough = sys.argv[1:]
    for shape in args.datasets.split(","):
        if shape not in SHAPES:
            raise SystemExit(f"Unknown dataset shape {shape!r}: choose from {', '.join(SHAPES)}.")
        for path in PATHS:
            if any(r["shape"] == shape and r["path"] == path for r in results):
                print(f"kept from {args.json}: {shape} {path}", file=sys.stderr, flush=True)
                continue
            results.append(run_worker(passthrough, shape, path))
            if args.json:  # written after every worker: a later crash or OOM loses nothing finished
                Path(args.json).write_text(json.dumps(results, indent=2))
            print(f"done: {shape} {path}", file=sys.stderr, flush=True)
    report(results, args)
    if any("failed" in r for r in results):
        raise SystemExit(1)


def load_finished(json_path: str | None) -> list[dict]:
    """The results of an earlier run with the same --json file (rerun to complete it); failed ones are retried."""
    if not json_path or not Path(json_path).exists():
        return []
    return [r for r in json.loads(Path(json_path).read_text()) if "failed" not in r]


def run_worker(passthrough: list[str], shape: str, path: str) -> dict:
    """One shape on one path in its own process; a failure (out of memory included) becomes a result row."""
    proc = subprocess.run([sys.executable, __file__, *passthrough, "--worker", shape, path],
                          capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is not None:
        return json.loads(line[len("RESULT "):])
    reason = ("killed (signal 9: out of memory?)" if proc.returncode == -9 else
              next((l for l in reversed(proc.stderr.splitlines()) if "Error" in l), f"exit {proc.returncode}"))
    print(f"{shape} {path} failed: {reason}\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
    return {"shape": shape, "path": path, "failed": reason[:300]}


def report(results: list[dict], args) -> None:
    mfu = any("mfu" in r for r in results)
    device = next((r["device"] for r in results if "device" in r), "n/a")
    print(f"model={args.model} batch={args.batch_size} seq_length={args.seq_length} steps={args.steps} "
          f"length_scale={args.length_scale} token_budget={args.token_budget} device={device}")
    head = "| dataset shape | path | useful tokens | computed tokens | s | useful tok/s | peak MB |"
    print(head + (" TFLOP/s | MFU |" if mfu else "") + "\n|" + "---|" * (7 + 2 * mfu))
    by = {(r["shape"], r["path"]): r for r in results}
    for r in results:
        if "failed" in r:
            print(f"| {r['shape']} | {r['path']} | failed: {r['failed']} |")
            continue
        row = (f"| {r['shape']} | {r['path']} | {r['useful_tokens']} | {r['computed_tokens']} | {r['seconds']:.1f} | "
               f"{r['useful_tokens'] / r['seconds']:.1f} | {r['peak_mb']:.0f} |")
        if mfu:
            row += f" {r['tflops']:.1f} | " + (f"{100 * r['mfu']:.1f}% |" if r.get("mfu") else "n/a |")
        print(row)
    print("\n| dataset shape | useful tok/s, padding-free / padded | peak memory, padding-free / padded |\n"
          "|---|---|---|")
    for shape in dict.fromkeys(r["shape"] for r in results):
        a, b = by.get((shape, "padding-free"), {}), by.get((shape, "padded"), {})
        if "seconds" not in a or "seconds" not in b:
            print(f"| {shape} | n/a (a path failed) | n/a |")
            continue
        speed = (a["useful_tokens"] / a["seconds"]) / (b["useful_tokens"] / b["seconds"])
        print(f"| {shape} | {speed:.2f}x | {a['peak_mb'] / max(b['peak_mb'], 1e-9):.2f}x |")

if __name__ == "__main__":
    main()
