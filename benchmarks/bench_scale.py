"""The server's costs at the paper's scale and beyond, on 2 CPU cores (issue #23): do they grow with the clients sampled
per round, or with every client there is?

The real round code runs (Federation.plan, train_client with the algorithm's hooks, Federation.finish_round: NaN and
outlier checks, DP, the server step, the client-state store, checkpoints, resume) on a stand-in model with the LoRA
layout of Llama-2-7B, r16 on q_proj and v_proj (32 layers: 8,388,608 parameters, 33.6 MB per fp32 vector); only
local training is replaced by a seeded random update, so no forward pass runs. Each (method, total clients) pair
runs in its own process, so peak RSS is that configuration's alone.

    python benchmarks/bench_scale.py --jsonl scale.jsonl                 # every method x 100 ... 100,000 clients
    python benchmarks/bench_scale.py --jsonl scale.jsonl --report docs/scale   # docs/scale.md and docs/scale.png
    python benchmarks/bench_scale.py --code before=/path/to/old/checkout after=.   # side by side, alternating
    python benchmarks/bench_scale.py --one scaffold 747 --rounds 12      # one configuration, JSON on stdout

Columns: peak RSS of the process; bytes the process wrote (write syscalls, /proc/self/io wchar) per round outside
checkpoints, and per checkpoint call; server seconds per round (the round's wall time minus the stand-in training);
seconds to resume (Federation built on the run folder with --resume: checksum checks and loads).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # name -> FedArguments overrides
    "fedavg": {"fed_alg": "fedavg"},
    "fedadam": {"fed_alg": "fedadam"},
    "scaffold": {"fed_alg": "scaffold"},
    "personal": {"fed_alg": "fedavg", "lora_method": "personal"},
    "dp_clip": {"fed_alg": "fedavg", "dp_mode": "clip", "dp_noise_multiplier": 1.0, "dp_clip": 1.0},
}
CLIENTS = (100, 747, 10_000, 100_000)


def standin_model(layers: int, hidden: int, rank: int):
    """A module whose trainable parameters are named and shaped like peft's LoRA on q_proj and v_proj of a Llama
    (what FlatParams and LoraLayout read); the frozen base weights are zero-stride views, so they take no memory."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    class Projection(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_A = nn.ModuleDict({"default": nn.Linear(hidden, rank, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, hidden, bias=False)})
            nn.init.zeros_(self.lora_B["default"].weight)
            self.scaling = {"default": 2.0}
            self.base = nn.Module()
            self.base.weight = torch.zeros(1).expand(hidden, hidden)

        def get_base_layer(self):
            return self.base

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.ModuleDict({"q_proj": Projection(), "v_proj": Projection()})
                                        for _ in range(layers))

        def save_pretrained(self, folder):  # the adapter, as peft writes it
            Path(folder).mkdir(parents=True, exist_ok=True)
            save_file({n: p.detach().contiguous() for n, p in self.named_parameters()},
                      Path(folder) / "adapter_model.safetensors")

    torch.manual_seed(0)
    return Model()


class StandInData:
    """A client's data as round_subset sees it: a length and select()."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def select(self, indices):
        return self


class StandInTrainer:
    """LocalTrainer's interface: y = x + a seeded random update (one optimizer step's hooks run)."""

    def __init__(self, flat, scale=1e-3):
        self.flat, self.scale, self.time = flat, scale, 0.0

    def train(self, data, steps, lr, hooks, seed):
        import torch
        start = time.perf_counter()
        g = torch.Generator().manual_seed(seed)
        self.flat.set(self.flat.get() + self.scale * torch.randn(self.flat.numel, generator=g))
        self.time += time.perf_counter() - start
        hooks.after_optimizer_step(self.flat, lr)
        return 1.0, steps


def wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def run_one(method: str, num_clients: int, rounds: int, sample: int, checkpoint_step: int, folder: Path,
            layers: int) -> dict:
    import torch
    torch.set_num_threads(1)
    try:
        from federated.methods import make_algorithm
    except ImportError:  # code from before federated/methods.py
        from federated.algorithms import make_algorithm
    from federated.config import FedArguments, ScriptArguments
    from federated.flat import FlatParams
    from federated.loop import Federation, train_client
    from federated.privacy import make_privacy

    folder.mkdir(parents=True, exist_ok=True)
    model = standin_model(layers, 4096, 16)
    flat = FlatParams(model)
    script = ScriptArguments(output_dir=str(folder), learning_rate=1e-3, max_steps=1, batch_size=1,
                             checkpoint_step=checkpoint_step)
    fed = FedArguments(num_rounds=rounds, sample_clients=sample, **METHODS[method])
    fed.num_clients = num_clients
    counts = [50 + k % 50 for k in range(num_clients)]
    algorithm = make_algorithm(fed, num_clients)
    privacy = make_privacy(fed, script, counts)
    federation = Federation(script, fed, model, flat, counts, 1e-5, privacy=privacy, algorithm=algorithm)
    trainer, data = StandInTrainer(flat), StandInData(50)
    server_s, round_bytes, checkpoint_bytes, checkpoint_s = [], [], [], []
    for t in range(rounds):
        start, written, trained = time.perf_counter(), wchar(), trainer.time
        tasks = federation.plan(t)
        results = [train_client(trainer, federation.algorithm, task, data, federation.run.x,
                                federation.run.server_state, federation.run.client_store) for task in tasks]
        checkpointing = (t + 1) % checkpoint_step == 0 or t + 1 == rounds
        federation.finish_round(tasks, results, time.perf_counter() - start)
        seconds = time.perf_counter() - start - (trainer.time - trained)
        (checkpoint_s if checkpointing else server_s).append(seconds)
        (checkpoint_bytes if checkpointing else round_bytes).append(wchar() - written)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seen = len({k for row in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                for k in row["clients"]})
    del federation
    script.resume = True
    start = time.perf_counter()
    Federation(script, fed, model, flat, counts, 1e-5, privacy=make_privacy(fed, script, counts),
               algorithm=make_algorithm(fed, num_clients))
    resume_s = time.perf_counter() - start
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"method": method, "clients": num_clients, "rounds": rounds, "sampled": sample, "clients_seen": seen,
            "vector_mb": round(flat.numel * 4 / 2 ** 20, 1), "peak_rss_mb": round(rss_mb),
            "server_s_per_round": round(mean(server_s), 3), "bytes_per_round_mb": round(mean(round_bytes) / 2 ** 20, 1),
            "checkpoint_s": round(mean(checkpoint_s), 3),
            "bytes_per_checkpoint_mb": round(mean(checkpoint_bytes) / 2 ** 20, 1), "resume_s": round(resume_s, 3)}


def run_all(args) -> list[dict]:
    """Every (method, clients) pair on every --code checkout, alternating the checkouts per pair so that a change
    in the machine's load falls on both alike."""
    rows = []
    codes = [code.split("=", 1) if "=" in code else ("this", code) for code in args.code]
    for method in args.methods.split(","):
        for clients, (label, code) in ((c, lc) for c in map(int, args.clients.split(",")) for lc in codes):
            with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(code).resolve())}
                command = [sys.executable, __file__, "--one", method, str(clients), "--rounds", str(args.rounds),
                           "--sample_clients", str(args.sample_clients), "--checkpoint_step",
                           str(args.checkpoint_step), "--layers", str(args.layers), "--folder", scratch]
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    row = {"method": method, "clients": clients, "error": done.stderr.strip().splitlines()[-1:]}
                else:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
            row["code"] = label
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return rows


def report(rows: list[dict], out: Path) -> None:
    """A markdown table (out.md) and a plot (out.png) of peak RSS, checkpoint bytes and server time per round against
    the total number of clients, one line per method and checkout."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["code", "method", "clients", "clients_seen", "peak_rss_mb", "bytes_per_checkpoint_mb",
               "bytes_per_round_mb", "server_s_per_round", "checkpoint_s", "resume_s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, row.get("error", ""))) for c in columns) + " |" for row in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    panels = [("peak_rss_mb", "peak RSS (MB)"), ("bytes_per_checkpoint_mb", "MB written per checkpoint"),
              ("server_s_per_round", "server s per round")]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
    for ax, (key, title) in zip(axes, panels):
        for (code, method) in dict.fromkeys((r["code"], r["method"]) for r in rows if key in r):
            points = sorted((r["clients"], r[key]) for r in rows if (r["code"], r["method"]) == (code, method)
                            and key in r)
            ax.plot(*zip(*points), marker="o", linestyle="--" if code == "before" else "-", label=f"{method} ({code})")
        ax.set_xscale("log")
        ax.set_xlabel("total clients (10 sampled per round)")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "CLIENTS"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--clients", default=",".join(map(str, CLIENTS)))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--sample_clients", type=int, default=10)
    parser.add_argument("--checkpoint_step", type=int, default=4)
    parser.add_argument("--layers", type=int, default=32, help="32: Llama-2-7B's 8.39M LoRA parameters")
    parser.add_argument("--code", nargs="+", default=[str(ROOT)],
                        help="the checkouts whose federated/ is measured, each PATH or LABEL=PATH")
    parser.add_argument("--folder", help="with --one: the run folder")
    parser.add_argument("--scratch", default=None, help="where the run folders go (default: the system's temp)")
    parser.add_argument("--jsonl", help="append the rows to this file")
    parser.add_argument("--report", help="write PATH.md and PATH.png from the rows of --jsonl (no run)")
    args = parser.parse_args()
    if args.one:
        sys.path.insert(0, os.environ.get("PYTHONPATH", str(ROOT)).split(":")[0])
        folder = Path(args.folder or tempfile.mkdtemp())
        row = run_one(args.one[0], int(args.one[1]), args.rounds, args.sample_clients, args.checkpoint_step, folder,
                      args.layers)
        shutil.rmtree(folder, ignore_errors=True)
        print(json.dumps(row))
        return
    if args.report:
        report([json.loads(line) for line in Path(args.jsonl).read_text().splitlines()], Path(args.report))
        return
    run_all(args)


if __name__ == "__main__":
    main()
