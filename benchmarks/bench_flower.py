"""Round wall time of the same federation in process, in Flower's Simulation Engine and in a Flower deployment on
loopback, and the engine's own overhead per round (issue #13).

Same model (SmolLM2 by default), data (fed-synthetic), 2 clients both sampled every round, same steps, batch and
sequence length, the same total of CPU threads (--threads):
  in-process   main_sft.py, the clients one after the other, each with all the threads;
  simulation   `flwr run` on a simulation SuperLink, 2 nodes training at once (client-resources num-cpus = 1),
               each with threads / 2;
  deployment   `flwr run` on a SuperLink with 2 SuperNodes (separate processes, HTTP on 127.0.0.1), each ClientApp
               with threads / 2.
A Flower mode with "+secagg" (simulation+secagg) runs the same with secure aggregation (SecAgg+: four message
rounds instead of one, masking and unmasking). Each mode writes metrics.jsonl; the table reads round_time_s (plan to aggregated) and each client's training time
(client_train_time_s). Engine overhead per round = round time - the slowest client's training: serialisation,
transport, scheduling, and in a deployment the ClientApp process Flower 1.42 starts for every message (imports,
model and data load). Serialisation alone is measured apart: the round's messages built, turned into their
protobuf bytes and back, and read, for this model's LoRA vector.

    python benchmarks/bench_flower.py                                   # SmolLM2, 2 rounds, 4 steps, batch 4
    python benchmarks/bench_flower.py --model /path/to/tiny --steps 2 --seq_length 64
    python benchmarks/bench_flower.py --modes in-process,simulation,deployment,in-process   # load drift shown
    python benchmarks/bench_flower.py --modes in-process,in-process@1   # the sequential clients at 1 thread
    python benchmarks/bench_flower.py --modes simulation,simulation+secagg,simulation   # SecAgg+'s cost
    python benchmarks/bench_flower.py --modes deployment+cold,deployment   # the nodes' warm workers (#27)

Per message (issue #27): `--modes message` runs a train message's work (imports, tokenizer, the silo's data,
model and trainer, decoding the task) in fresh processes, as a deployment's ClientApp process does, phase by
phase, twice (the spread shows the machine's load).

    python benchmarks/bench_flower.py --modes message --seq_length 128

Scale (issue #23): `--modes standin --nodes 747` runs the real ServerApp in the Simulation Engine with 747 nodes
whose ClientApp is a stand-in (benchmarks/flower_standin.py: the real query, a train that answers with a seeded
random delta at once), so it measures the engine and the server alone: start-up (submission to the first
round: Ray, the actors, discovery of every node, the server's model) and each round's time, which is all
engine and server overhead (no training).

    python benchmarks/bench_flower.py --modes standin --nodes 747 --sample 10 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_config(args, out: Path) -> dict:
    return {"model-name-or-path": args.model, "output-dir": str(out), "fed-alg": args.fed_alg,
            "num-clients": 2, "sample-clients": 2, "num-rounds": args.rounds, "max-steps": args.steps,
            "batch-size": args.batch_size, "seq-length": args.seq_length, "learning-rate": 1e-4, "eval-after": False,
            "round-timeout": 3600.0}


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def in_process(args, work: Path, threads: int, out: Path) -> list[dict]:
    import subprocess
    flags = [item for key, value in run_config(args, out).items() if key != "round-timeout"
             for item in (f"--{key.replace('-', '_')}", str(value).lower() if isinstance(value, bool) else str(value))]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "main_sft.py"), *flags], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".log"), "wb"))
    return rows(out)


def flower(args, work: Path, simulation: bool, option: str = "", index: int = 0) -> list[dict]:
    """option: "secagg" (secure aggregation), or "cold" (a deployment without the nodes' warm workers: every
    message's ClientApp process imports, loads and builds everything itself, as before issue #27)."""
    from flower_app.launch import LocalFlower
    secagg = option == "secagg"
    name = ("simulation" if simulation else "deployment") + (f"+{option}" if option else "")
    out, home = work / f"{name}-{index}", work / f"home-{name}-{index}"
    threads = str(max(1, args.threads // 2))
    env = {"OMP_NUM_THREADS": threads, "RAY_memory_monitor_refresh_ms": "0",
           "FEDLLM_WARM_WORKER": "0" if option == "cold" else "1"}
    with LocalFlower(home, simulation=simulation, env=env) as engine:
        if not simulation:
            for k in range(2):
                engine.start_supernode(f"node{k}", {"partition-id": k, "num-partitions": 2})
        config = {**run_config(args, out), "secagg": secagg}
        process = engine.run(config, num_supernodes=2, client_cpus=1) if simulation else engine.run(config)
        if process.wait(timeout=7200) != 0 or not (out / "metrics.jsonl").exists():
            raise SystemExit(f"the {name} run failed: see {home}")
    return rows(out)


def standin(args, work: Path) -> dict:
    """The real ServerApp with --nodes simulated stand-in clients (flower_standin.py); start-up and round times."""
    import shutil

    from flower_app.launch import ROOT as PROJECT, LocalFlower

    app, out, home = work / "standin-app", work / "standin", work / "home-standin"
    app.mkdir()
    pyproject = (PROJECT / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(pyproject.replace('clientapp = "flower_app.client_app:app"',
                                                          'clientapp = "flower_standin:app"'))
    shutil.copy(ROOT / "benchmarks" / "flower_standin.py", app / "flower_standin.py")
    config = {"model-name-or-path": args.model, "output-dir": str(out), "synthetic-num-clients": args.nodes,
              "synthetic-mean-samples": 4, "sample-clients": args.sample, "num-rounds": args.rounds,
              "max-steps": 1, "seq-length": 64, "eval-after": False, "checkpoint-step": args.rounds}
    env = {"OMP_NUM_THREADS": "1", "RAY_memory_monitor_refresh_ms": "0", "PYTHONPATH": str(PROJECT)}
    metrics = out / "metrics.jsonl"
    with LocalFlower(home, simulation=True, env=env) as engine:
        submitted = time.perf_counter()
        process = engine.run(config, num_supernodes=args.nodes, client_cpus=1, app=app)
        while not metrics.exists() and process.poll() is None:
            time.sleep(0.1)
        first_row = time.perf_counter()
        if process.wait(timeout=7200) != 0 or not metrics.exists():
            raise SystemExit(f"the stand-in run failed: see {home}/run.log")
        total = time.perf_counter() - submitted
    round_times = [r["round_time_s"] for r in rows(out)]
    log = (home / "run.log").read_text()
    discovery = [line for line in log.splitlines() if "clients have a node" in line]
    return {"mode": f"standin x {args.nodes} nodes", "start_up_s": round(first_row - submitted - round_times[0], 1),
            "round_s": round_times, "mean_round_s": sum(round_times[1:] or round_times) / len(round_times[1:] or
                                                                                            round_times),
            "run_wall_s": round(total, 1), "discovery": discovery[-1].split(": ", 1)[-1] if discovery else None}


PHASES = ("imports", "tokenizer", "data", "model_and_trainer", "decode_task")


def probe(args) -> None:
    """One train message's work in this fresh process, as a deployment's ClientApp process does it, phase by
    phase (seconds, printed as one JSON line): importing the ClientApp, the tokenizer, the node's data (a silo
    file: read and tokenised, or its tokenised cache), the model and trainer, decoding the task message."""
    times, start = {}, time.perf_counter()

    def lap(name):
        nonlocal start
        times[name] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()

    from federated import loop  # noqa: F401  (train_client and, through it, torch, transformers, peft)
    from flower_app import client_app  # noqa: F401  (what flwr-clientapp imports first)
    from flower_app.config import NodeData, parse_run_config
    lap("imports")
    from flower_app.training import Worker
    settings = parse_run_config({"model-name-or-path": args.model, "seq-length": args.seq_length,
                                 "batch-size": args.batch_size, "max-steps": args.steps})
    worker = Worker(settings)
    lap("tokenizer")
    client = worker.client(1, NodeData(0, 1, args.probe))
    lap("data")
    trainer = worker.trainer_for(client)
    lap("model_and_trainer")
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    from federated.loop import ClientTask
    from flower_app.messages import read_task, task_content
    wire = recorddict_to_proto(task_content(ClientTask(0, 0, 1e-4, 1, 4, None, 1), 1, trainer.flat.get(), {}, {},
                                            ())).SerializeToString()
    start = time.perf_counter()  # the bytes arrive; decoding them is the node's work
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
    read_task(recorddict_from_proto(ProtoRecordDict.FromString(wire)), trainer.flat.device)
    lap("decode_task")
    print(json.dumps(times), flush=True)


def message_cost(args, work: Path, repeats: int = 2) -> list[dict]:
    """A train message's per-process cost in `repeats` fresh processes on the same silo file: process wall time
    and its phases."""
    import subprocess
    silo = work / "silos"
    subprocess.run([sys.executable, "-m", "flower_app.deploy", "split", "--out", str(silo), "--dataset",
                    "fed-synthetic", "--num_clients", "1", "--synthetic_num_clients", "1",
                    "--synthetic_mean_samples", str(args.silo_samples)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    results = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe", str(silo / "silo0.json"),
                               "--model", args.model, "--seq_length", str(args.seq_length), "--steps",
                               str(args.steps), "--batch_size", str(args.batch_size)], cwd=ROOT, env=env,
                              capture_output=True, text=True, check=True)
        phases = json.loads(done.stdout.strip().splitlines()[-1])
        results.append({"process_s": round(time.perf_counter() - start, 2), **phases})
        print(json.dumps(results[-1]), flush=True)
    return results


def serialisation_seconds(args, repeats: int = 5) -> tuple[float, int]:
    """One round's messages (2 tasks, 2 results) built, encoded to protobuf bytes, decoded and read; seconds per
    round, and the bytes of one task message."""
    import torch
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    from federated.flat import FlatParams
    from federated.loop import ClientResult, ClientTask
    from flower_app.messages import read_result, read_task, result_content, task_content
    from utils.model import load_base_model, wrap_with_lora

    model = wrap_with_lora(load_base_model(args.model))
    x = FlatParams(model).get()
    task = ClientTask(0, 0, 1e-4, args.steps, args.steps * args.batch_size, None, 1)

    def wire_round_trip(content):
        proto = recorddict_to_proto(content)
        wire = proto.SerializeToString()
        return recorddict_from_proto(type(proto).FromString(wire)), len(wire)

    start = time.perf_counter()
    for _ in range(repeats):
        for k in range(2):
            received, task_bytes = wire_round_trip(task_content(task, 2, x, {}, {}, ()))
            read_task(received, "cpu")
            received, _ = wire_round_trip(result_content(ClientResult(k, x + 1, {}, {}, 1.0, 1)))
            read_result(received, "cpu")
    return (time.perf_counter() - start) / repeats, task_bytes


def summary(name: str, mode_rows: list[dict]) -> dict:
    last = mode_rows[-1]  # the last round: no first-round warm-up
    slowest = max(last["client_train_time_s"].values())
    return {"mode": name, "round_s": last["round_time_s"], "slowest_client_train_s": slowest,
            "engine_overhead_s": None if name.startswith("in-process") else last["round_time_s"] - slowest,
            "all_rounds_s": [r["round_time_s"] for r in mode_rows]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--fed_alg", default="fedavg")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="total CPU threads of the clients, every mode")
    parser.add_argument("--modes", default="in-process,simulation,deployment")
    parser.add_argument("--nodes", type=int, default=747, help="standin: simulated nodes (= clients)")
    parser.add_argument("--sample", type=int, default=10, help="standin: clients sampled per round")
    parser.add_argument("--silo_samples", type=int, default=200, help="message: samples in the probe's silo")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # message: the fresh process, on this silo file
    args = parser.parse_args()
    if args.probe:
        return probe(args)
    work = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    if args.modes == "message":
        rows_ = message_cost(args, work)
        print(f"\nOne train message's work in a fresh process (a Flower 1.42 deployment starts one per message): "
              f"{args.model}, a silo of {args.silo_samples} fed-synthetic samples, seq {args.seq_length}. "
              f"Work folder: {work}")
        print("| process | total (s) | " + " | ".join(PHASES) + " |")
        print("|---|---|" + "---|" * len(PHASES))
        for i, r in enumerate(rows_):
            print(f"| {i + 1} | {r['process_s']:.2f} | "
                  + " | ".join(f"{r[p]:.2f}" for p in PHASES) + " |")
        return
    if args.modes == "standin":
        result = standin(args, work)
        print(json.dumps(result))
        print(f"\n{args.model}'s LoRA layout, {args.nodes} simulated nodes with stand-in clients, {args.sample} "
              f"sampled per round, {args.rounds} rounds, client-resources-num-cpus 1. Work folder: {work}")
        print("| nodes | start-up to round 1 (s) | mean round, engine + server (s) | "
              "per-round overhead in a 1-min round |")
        print("|---|---|---|---|")
        print(f"| {args.nodes} | {result['start_up_s']:.1f} | {result['mean_round_s']:.2f} | "
              f"{100 * result['mean_round_s'] / 60:.1f}% |")
        return
    results = []
    for i, mode in enumerate(args.modes.split(",")):
        name, _, threads = mode.partition("@")  # in-process@1: one thread, for comparison
        start = time.perf_counter()
        if name == "in-process":
            mode_rows = in_process(args, work, int(threads or args.threads), work / f"inprocess-{i}")
        else:
            engine, _, option = name.partition("+")
            mode_rows = flower(args, work, simulation=engine == "simulation", option=option, index=i)
        results.append(summary(mode, mode_rows))
        results[-1]["process_wall_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps(results[-1]), flush=True)
    serialise_s, task_bytes = serialisation_seconds(args)
    # A mode may be listed twice (in-process first and last): the load of a shared machine drifts, and the
    # spread of the in-process rounds shows by how much.
    in_process_rounds = [r["round_s"] for r in results if r["mode"] == "in-process"]  # at --threads
    base = sum(in_process_rounds) / len(in_process_rounds) if in_process_rounds else None
    print(f"\n{args.model}, fed-synthetic, 2 clients x {args.steps} steps x batch {args.batch_size}, seq "
          f"{args.seq_length}, {args.threads} threads in total; last of {args.rounds} rounds. Work folder: {work}")
    print(f"Ratios against the mean in-process round ({', '.join(f'{r:.2f}' for r in in_process_rounds)} s).")
    print("| mode | round (s) | vs in-process | slowest client's training (s) | engine overhead (s) | overhead / round |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['round_s'] / base:.2f}x" if base else "-"
        overhead = "-" if r["engine_overhead_s"] is None else f"{r['engine_overhead_s']:.2f}"
        share = "-" if r["engine_overhead_s"] is None else f"{100 * r['engine_overhead_s'] / r['round_s']:.1f}%"
        print(f"| {r['mode']} | {r['round_s']:.2f} | {ratio} | {r['slowest_client_train_s']:.2f} | {overhead} | {share} |")
    print(f"\nSerialisation of one round's messages (2 tasks + 2 results, {task_bytes} bytes per task on the wire): "
          f"{serialise_s * 1000:.1f} ms per round")


if __name__ == "__main__":
    main()
