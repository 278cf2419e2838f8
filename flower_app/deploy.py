"""Standing up a Flower deployment of this project (docs/FLOWER.md, "Deployment"): the operator's three commands.

    python -m flower_app.deploy certificates --out certs --hosts 127.0.0.1,server.example.org --nodes 3
        a CA, the SuperLink's certificate for those hosts/IPs, and one key pair per SuperNode (certs/nodes/silo0,
        certs/nodes/silo0.pub, ...); prints the `flwr supernode register` line of each public key
    python -m flower_app.deploy split --out silos --dataset fed-aya --num_clients 3
        one released-format file per client (silos/silo0.json: {"client id": [samples]}), the node-config
        `data-file` of that silo's SuperNode; takes the dataset flags of main_sft.py / main_dpo.py
    python -m flower_app.deploy wait <connection> [--run-id N]
        waits for a run (default: the latest) to finish; exit status 0 only when it completed
    python -m flower_app.deploy supernode [--retry-for 300] -- <flower-supernode flags>
        flower-supernode, started again with a growing pause while the SuperLink refuses it (exit 305: a node
        restarted while its previous session's heartbeats have not lapsed yet; Flower's exit code 305)

`--dry-run` on certificates and split says what would be written and writes nothing.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path

CA_DAYS = 3650


# --- certificates and node keys ----------------------------------------------------------------------------------

def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def _subject_names(hosts: list[str]):
    from cryptography import x509

    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_certificates(folder: str | Path, hosts: list[str], days: int = 365) -> Path:
    """A CA (ca.crt, ca.key) and the SuperLink's certificate for `hosts` (IP addresses or DNS names: what the
    SuperNodes and `flwr` connect to): server.pem, server.key. EC P-256, SHA-256."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject, key, issuer, issuer_key, ca: bool, valid_days: int):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=valid_days))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedllm flower CA")])
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    ca = certificate(ca_name, ca_key, ca_name, ca_key, ca=True, valid_days=max(days, CA_DAYS))
    server = certificate(server_name, server_key, ca_name, ca_key, ca=False, valid_days=days)
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    _write_private(folder / "ca.key", ca_key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    (folder / "server.pem").write_bytes(server.public_bytes(pem))
    _write_private(folder / "server.key", server_key.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    return folder


def make_node_key(folder: str | Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC key pair in OpenSSH format (as `ssh-keygen -t ecdsa -b 384` makes): (private, public).
    The SuperNode starts with --auth-supernode-private-key <private>; the operator registers <public>."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def certificates_command(args) -> None:
    out = Path(args.out).resolve()
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if not hosts:
        raise SystemExit("--hosts is empty: give the SuperLink's IP addresses or DNS names, comma-separated.")
    names = [f"silo{k}" for k in range(args.nodes)]
    written = [out / f for f in ("ca.crt", "ca.key", "server.pem", "server.key")]
    written += [out / "nodes" / f"{n}{ext}" for n in names for ext in ("", ".pub")]
    existing = [str(p) for p in written if p.exists()]
    if existing:
        raise SystemExit(f"{existing[0]} exists (and {len(existing) - 1} more): pass another --out; a new CA "
                         f"would not match the certificates the nodes already trust.")
    if args.dry_run:
        print("\n".join(f"would write {p}" for p in written))
        return
    make_certificates(out, hosts, args.days)
    for name in names:
        make_node_key(out / "nodes", name)
    print(f"Wrote the CA, the SuperLink's certificate for {', '.join(hosts)} and {len(names)} node key pairs "
          f"in {out}. Keep ca.key and nodes/<name> private; give each silo ca.crt and its own nodes/<name>.")
    print("Register the nodes' public keys once the SuperLink runs (with --enable-supernode-auth):")
    for name in names:
        print(f"  flwr supernode register {out / 'nodes' / name}.pub <connection>")


# --- per-silo data files -----------------------------------------------------------------------------------------

def split_command(args, flags: list[str]) -> None:
    """Each client of the dataset (the first --num_clients, as main_sft.py chooses them) in its own file."""
    from transformers import HfArgumentParser

    from data import load_federated_dataset
    from federated.config import FedArguments, ScriptArguments, dataset_options
    from federated.setup import select_clients

    script_args, fed_args = HfArgumentParser((ScriptArguments, FedArguments)).parse_args_into_dataclasses(flags)
    out = Path(args.out).resolve()
    dataset = load_federated_dataset(script_args.dataset, local_data_dir=script_args.local_data_dir,
                                     **dataset_options(script_args))
    clients = select_clients(dataset, fed_args)
    files = [out / f"silo{k}.json" for k in range(len(clients))]
    existing = [str(f) for f in files if f.exists()]
    if existing:
        raise SystemExit(f"{existing[0]} exists (and {len(existing) - 1} more): pass another --out.")
    for k, (file, samples) in enumerate(zip(files, clients)):
        client_id = dataset.client_ids[k]
        if args.dry_run:
            print(f"would write {file}: client {client_id!r}, {len(samples)} samples")
            continue
        out.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps({client_id: samples}, ensure_ascii=False))
    print(f"{'Would write' if args.dry_run else 'Wrote'} {len(files)} silo files of {dataset.described} in {out}. "
          f"SuperNode k starts with --node-config 'partition-id=k num-partitions={len(files)} "
          f"data-file=\"{out}/silo<k>.json\"'.")


# --- a run's outcome ---------------------------------------------------------------------------------------------

def run_status(connection: str, run_id: int | None) -> dict | None:
    """The run's row of `flwr ls --format json` (the latest run without run_id), or None when there is none."""
    command = ["flwr", "ls", connection, "--format", "json"] + (["--run-id", str(run_id)] if run_id else [])
    listing = subprocess.run(command, capture_output=True, text=True)
    try:
        runs = json.loads(listing.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        raise SystemExit(f"`{' '.join(command)}` failed: {(listing.stdout + listing.stderr).strip()[-500:]}") from None
    runs = sorted(runs, key=lambda row: row["pending-at"] or "")
    return runs[-1] if runs else None


def wait_command(args) -> None:
    """Exit 0 when the run finished:completed; 1 when it failed or was stopped, with Flower's details."""
    while True:
        row = run_status(args.connection, args.run_id)
        if row is None:
            raise SystemExit(f"No run {args.run_id or ''} on connection {args.connection!r}: check `flwr ls "
                             f"{args.connection}`.")
        status = row["status"]
        if status.startswith("finished"):
            print(f"Run {row['run-id']}: {status} after {row['elapsed']}" +
                  (f" ({row['status-details']})" if row["status-details"] else ""))
            sys.exit(0 if status == "finished:completed" else 1)
        time.sleep(args.poll)


# --- a SuperNode that rejoins --------------------------------------------------------------------------------------

# flower-supernode's exit when the SuperLink refuses its connection: Flower's ExitCode 305, which a process
# status holds modulo 256.
REFUSED = 305 % 256


def supernode_command(args, flags: list[str]) -> None:
    """Run flower-supernode; while it exits refused (a restart within the SuperLink's heartbeat window of the
    node's previous session, about 40 s), start it again after a pause that doubles up to 30 s, for at most
    --retry-for seconds. Any other exit, and SIGTERM/SIGINT, end it with flower-supernode's own status."""
    import signal

    command = [args.executable, *flags]
    deadline, pause = time.monotonic() + args.retry_for, args.backoff
    while True:
        node = subprocess.Popen(command)
        previous = {sig: signal.signal(sig, lambda sig, _: node.send_signal(sig))
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        code = node.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if code != REFUSED or time.monotonic() + pause > deadline:
            sys.exit(code)
        print(f"flower-supernode was refused by the SuperLink (Flower exit code 305); starting it again in {pause:g} s",
              file=sys.stderr, flush=True)
        time.sleep(pause)
        pause = min(2 * pause, 30.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flower_app.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    certs = commands.add_parser("certificates", help="a CA, the SuperLink's certificate, the nodes' key pairs")
    certs.add_argument("--out", required=True, help="folder to write (must not hold these files yet)")
    certs.add_argument("--hosts", required=True, help="the SuperLink's IPs/DNS names, comma-separated")
    certs.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to make: silo0 .. silo<N-1>")
    certs.add_argument("--days", type=int, default=365, help="validity of the SuperLink's certificate")
    certs.add_argument("--dry-run", action="store_true")
    split = commands.add_parser("split", help="one data file per silo; other flags: main_sft.py's dataset flags",
                                epilog="e.g. --dataset fed-aya --num_clients 3, --local_data_dir all.json")
    split.add_argument("--out", required=True, help="folder for silo<k>.json")
    split.add_argument("--dry-run", action="store_true")
    wait = commands.add_parser("wait", help="wait for a run; the exit status is its outcome")
    wait.add_argument("connection", help="the SuperLink connection of `flwr run`")
    wait.add_argument("--run-id", type=int, help="default: the latest run")
    wait.add_argument("--poll", type=float, default=5.0, help="seconds between checks")
    node = commands.add_parser("supernode", help="flower-supernode, started again while the SuperLink refuses it",
                               epilog="everything after -- goes to flower-supernode")
    node.add_argument("--retry-for", type=float, default=300.0, help="seconds to keep starting it again")
    node.add_argument("--backoff", type=float, default=5.0, help="the first pause, in seconds (doubles to 30)")
    node.add_argument("--executable", default="flower-supernode", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.command == "supernode":
        supernode_command(args, rest[1:] if rest[:1] == ["--"] else rest)
    elif args.command == "split":
        split_command(args, rest)
    elif rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    elif args.command == "certificates":
        certificates_command(args)
    else:
        wait_command(args)


if __name__ == "__main__":
    main()
