"""A SuperLink that crashes mid-run and comes back (issue #27): on loopback, a deployment with 2 SuperNodes and
the tiny random Llama, FedAvg for 3 rounds with a checkpoint each round; after round 1 the SuperLink and its
ServerApp are killed (SIGKILL), the SuperLink is started again on the same port and --database, the SuperNodes
reconnect by themselves, and `flwr run ... resume=true` continues. Prints whether checkpoint-3 is bit-identical
to main_sft.py's uninterrupted 3 rounds. A few minutes on 2 CPU cores; not in the test suite (its slow tests
are at their time budget).

    python benchmarks/check_superlink_restart.py
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import psutil
    from safetensors.torch import load_file

    import main_sft
    from flower_app.launch import LocalFlower
    from utils.model import load_tokenizer, tiny_llama

    work = Path(tempfile.mkdtemp(prefix="check-restart-"))
    tokenizer = load_tokenizer("smollm2")
    tiny_llama(tokenizer).save_pretrained(work / "tiny")
    tokenizer.save_pretrained(work / "tiny")
    out, reference = work / "flower", work / "inprocess"
    config = {"model-name-or-path": str(work / "tiny"), "synthetic-num-clients": 2, "synthetic-mean-samples": 16,
              "sample-clients": 2, "num-rounds": 3, "max-steps": 2, "batch-size": 2, "seq-length": 64,
              "learning-rate": 1e-3, "eval-after": False, "fed-alg": "fedavg", "checkpoint-step": 1}
    start = time.perf_counter()
    env = {"OMP_NUM_THREADS": "1", "RAY_memory_monitor_refresh_ms": "0"}
    with LocalFlower(work / "home", simulation=False, env=env, database=True) as flower:
        for k in range(2):
            flower.start_supernode(f"node{k}", {"partition-id": k, "num-partitions": 2})
        run = flower.run({**config, "output-dir": str(out), "round-timeout": 300.0})
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            if run.poll() is not None:
                raise SystemExit(f"the run ended before round 1: see {work / 'home'}")
            time.sleep(0.2)
        link = psutil.Process(flower.processes["superlink"].pid)
        crashed = [link, *link.children(recursive=True)]  # the SuperLink and its ServerApp
        for process in crashed:
            process.kill()
        psutil.wait_procs(crashed, timeout=10)
        run.wait(timeout=120)
        print(f"{time.perf_counter() - start:.0f} s: SuperLink and ServerApp killed after round 1", flush=True)
        flower.start_superlink()
        resumed = flower.run({**config, "output-dir": str(out), "round-timeout": 300.0, "resume": True},
                             name="resumed")
        if resumed.wait(timeout=1800) != 0:
            raise SystemExit(f"the resumed run failed: see {work / 'home' / 'resumed.log'}")
        print(f"{time.perf_counter() - start:.0f} s: resumed run finished", flush=True)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    argv = [item for key, value in {**config, "num-clients": 2, "output-dir": str(reference)}.items()
            for item in (f"--{key.replace('-', '_')}", str(value).lower() if isinstance(value, bool) else str(value))]
    sys.argv = ["main_sft.py", *argv]
    main_sft.main()
    ours, theirs = (load_file(d / "checkpoint-3" / "adapter_model.safetensors") for d in (out, reference))
    same = ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    print(f"rounds {[r['round'] for r in rows]}, failed {[r['failed_clients'] for r in rows]}; checkpoint-3 "
          f"bit-identical to main_sft.py's uninterrupted run: {same}. Work folder: {work}")


if __name__ == "__main__":
    main()
