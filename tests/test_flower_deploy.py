"""flower_app.deploy, the operator's commands for standing up a deployment: certificates and node keys that
verify, silo files that hold exactly the partitions a simulation trains, and the documented commands' --help."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from flower_app.config import parse_run_config
from flower_app.deploy import main


def test_certificates_verify_and_are_not_overwritten(tmp_path, capsys):
    from cryptography import x509

    out = tmp_path / "certs"
    main(["certificates", "--out", str(out), "--hosts", "127.0.0.1,server.example.org", "--nodes", "2",
          "--dry-run"])
    assert not out.exists() and "would write" in capsys.readouterr().out
    main(["certificates", "--out", str(out), "--hosts", "127.0.0.1,server.example.org", "--nodes", "2"])
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises when the CA did not sign it
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["server.example.org"]
    for name in ("silo0", "silo1"):
        assert (out / "nodes" / f"{name}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
        assert (out / "nodes" / name).stat().st_mode & 0o077 == 0  # private: the owner only
    assert (out / "ca.key").stat().st_mode & 0o077 == 0
    assert "flwr supernode register" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="ca.crt exists"):
        main(["certificates", "--out", str(out), "--hosts", "127.0.0.1"])


def test_silo_files_hold_the_partitions_a_simulation_trains(tmp_path, tiny_model_dir):
    """Each silo file, read by a node through node-config data-file, gives that client's tokenised samples
    exactly as the partition of the run's dataset does."""
    from flower_app.config import NodeData
    from flower_app.training import Worker

    out = tmp_path / "silos"
    options = ["--dataset", "fed-synthetic", "--synthetic_num_clients", "5", "--synthetic_mean_samples", "6"]
    main(["split", "--out", str(out), *options, "--num_clients", "3"])
    assert sorted(p.name for p in out.iterdir()) == ["silo0.json", "silo1.json", "silo2.json"]
    settings = parse_run_config({"synthetic-num-clients": 5, "synthetic-mean-samples": 6, "num-clients": 3,
                                 "seq-length": 64, "model-name-or-path": tiny_model_dir})
    worker = Worker(settings)
    for k in range(3):
        silo = worker.client(100 + k, NodeData(k, 3, str(out / f"silo{k}.json")))
        partition = worker.client(200 + k, NodeData(k, 3, None))
        assert silo.client_id == partition.client_id
        assert silo.data["input_ids"] == partition.data["input_ids"] and len(silo.data) > 0
        assert list(json.loads((out / f"silo{k}.json").read_text())) == [silo.client_id]
    with pytest.raises(SystemExit, match="silo0.json exists"):
        main(["split", "--out", str(out), *options])


def test_a_refused_supernode_is_started_again_until_it_joins(tmp_path):
    """A stand-in for flower-supernode that is refused (exit 305) twice, then runs and exits 0; and one that is
    always refused gives up after --retry-for with the refusal's status."""
    fake = tmp_path / "fake-supernode"
    fake.write_text(f"#!{sys.executable}\nimport pathlib, sys\ncount = pathlib.Path(sys.argv[1])\n"
                    "count.write_text(count.read_text() + 'x')\n"
                    "sys.exit(305 if len(count.read_text()) <= int(sys.argv[2]) else 0)\n")
    fake.chmod(0o755)
    starts = tmp_path / "starts"
    for refusals, retry_for, expected_code, expected_starts in ((2, 60, 0, 3), (99, 0, 305 % 256, 1)):
        starts.write_text("")
        done = subprocess.run([sys.executable, "-m", "flower_app.deploy", "supernode", "--backoff", "0.1",
                               "--retry-for", str(retry_for), "--executable", str(fake), "--", str(starts),
                               str(refusals)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert (done.returncode, len(starts.read_text())) == (expected_code, expected_starts), done.stderr
        assert done.stderr.count("was refused by the SuperLink") == expected_starts - 1


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "flower_app.deploy", "certificates", "--help"],
    [sys.executable, "-m", "flower_app.deploy", "split", "--help"],
    [sys.executable, "-m", "flower_app.deploy", "wait", "--help"],
    [sys.executable, "-m", "flower_app.deploy", "supernode", "--help"],
])
def test_the_documented_commands_answer_help(command):
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout


def documented_block(marker: str) -> str:
    """The fenced bash block after `<!-- runnable: {marker} -->` in docs/FLOWER.md."""
    text = (ROOT / "docs" / "FLOWER.md").read_text()
    start = text.index(f"<!-- runnable: {marker} -->")
    body = text[text.index("```bash\n", start) + len("```bash\n"):]
    return body[:body.index("```\n")]


def stop_session(leader: int) -> None:
    """End every process of the session the test started (the script's background SuperLink and SuperNodes, and
    their children), by pid."""
    import os

    import psutil

    from flower_app.launch import terminate_all

    family = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == leader:
                family.append(process)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    terminate_all(family)


def test_ports_chosen_together_are_distinct_and_bindable():
    """Two ports picked one after the other were once the same (the first released, then handed out again), and
    the one-host block's SuperNode 0 could not bind the SuperLink's port."""
    import socket

    from flower_app.launch import free_ports

    for _ in range(50):
        base, *rest = free_ports(4, consecutive=True)
        assert rest == [base + 1, base + 2, base + 3]
        ports = free_ports(3)
        assert len(set(ports)) == 3
    held = [socket.socket() for _ in ports]
    try:
        for s, port in zip(held, ports):
            s.bind(("127.0.0.1", port))
    finally:
        for s in held:
            s.close()


@pytest.mark.slow
def test_the_documented_one_host_deployment_runs_as_pasted(tmp_path, tiny_model_dir):
    """docs/FLOWER.md's one-host block in bash: certificates, silo files, SuperLink with a database and node
    authentication, 3 SuperNodes on their own ports, `flwr run`, and `deploy wait` exits 0 on the completed run;
    then a run with a bad run config, and `deploy wait` exits 1 naming the reason. Changed for the test only:
    free ports, the tiny model, one round, a work folder outside the repository (the project's paths made
    absolute)."""
    from flower_app.launch import free_ports

    script = documented_block("one-host deployment")
    link_port, node_port, _, _ = free_ports(4, consecutive=True)  # SuperNode k listens on node_port + k
    changes = {"LINK_PORT=9093": f"LINK_PORT={link_port}", "NODE_PORT=9094": f"NODE_PORT={node_port}",
               "MODEL=smollm2": f"MODEL={tiny_model_dir}", '"$PWD/.venv/bin': f'"{ROOT}/.venv/bin',
               "flwr run . prod": f"flwr run {ROOT} prod", "num-rounds=2": "num-rounds=1"}
    for old, new in changes.items():
        assert old in script
        script = script.replace(old, new)
    script = "set -e\n" + script + f"""
flwr run {ROOT} prod --run-config 'fed-alg="nope" output-dir="{tmp_path}/runs/bad"'
if python -m flower_app.deploy wait prod > bad.txt; then exit 3; fi
"""
    env = {"PATH": f"{ROOT / '.venv' / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=900)
    finally:
        stop_session(process.pid)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("*.log")))
    assert process.returncode == 0, f"exit {process.returncode}\n{output[-3000:]}\n{logs}"
    assert "finished:completed" in output
    rows = [json.loads(line) for line in (tmp_path / "runs" / "fedavg" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], sorted(r["clients"]), r["failed_clients"]) for r in rows] == [(1, [0, 1, 2], [])]
    bad = (tmp_path / "bad.txt").read_text()
    assert "finished:failed" in bad and "Unknown --fed_alg 'nope'" in bad
