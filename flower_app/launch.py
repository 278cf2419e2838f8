"""Flower processes on this machine, for tests and benchmarks: a SuperLink (simulation or deployment) and
SuperNodes on free loopback ports, a private FLWR_HOME with the connection to that SuperLink, `flwr run` on this
project, and a stop that ends exactly the processes started here (and their children) by pid.

    with LocalFlower(home, simulation=True) as flower:
        flower.run({"fed-alg": "scaffold", "output-dir": "/tmp/out", ...}, num_supernodes=4)

Without `certificates`, insecure (no TLS) on 127.0.0.1 only; with a folder holding ca.crt, server.pem and
server.key (flower_app.deploy.make_certificates for 127.0.0.1), every link is TLS as in a real deployment.
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "local-test"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int, consecutive: bool = False) -> list[int]:
    """`count` distinct free loopback ports (consecutive: base, base + 1, ...). They are drawn below the kernel's
    ephemeral range, so no outgoing connection takes one before its server binds it, and all are held bound while
    they are chosen (picked one at a time, a port just released is often handed out again)."""
    rng = random.Random()
    below = _ephemeral_start()
    below = below if below > 12000 else 65536  # an unusual range: draw from all of them
    for _ in range(200):
        held: list[socket.socket] = []
        try:
            base = rng.randrange(10000, below - count)
            for k in range(count):
                held.append(socket.socket())
                held[-1].bind(("127.0.0.1", base + k if consecutive else rng.randrange(10000, below)))
            ports = [s.getsockname()[1] for s in held]
            if len(set(ports)) == count:
                return ports
        except OSError:  # taken: draw again
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {count} free loopback ports found below {below} in 200 draws")


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the IANA dynamic range starts here
        return 49152


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def config_arg(config: dict) -> str:
    """A --run-config / --node-config / --federation-config value: space-separated key=value pairs."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


class LocalFlower:
    def __init__(self, home: str | Path, simulation: bool, log_dir: str | Path | None = None, env: dict | None = None,
                 certificates: str | Path | None = None, node_auth: bool = False, database: bool = False):
        self.home, self.simulation = Path(home), simulation
        self.certificates = Path(certificates).resolve() if certificates else None
        self.node_auth = node_auth  # only registered SuperNodes may join (needs TLS)
        self.database = database  # the SuperLink keeps its state in home/superlink.db (a restart keeps it)
        self.log_dir = Path(log_dir or home)
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.port = free_port()
        self.ports_given = {self.port}  # a SuperNode started a moment ago may not have bound its port yet
        self.processes: dict[str, subprocess.Popen] = {}

    def __enter__(self):
        self.home.mkdir(parents=True, exist_ok=True)
        trust = f'root-certificates = "{self.certificates / "ca.crt"}"' if self.certificates else "insecure = true"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\n{trust}\n')
        command = [str(BIN / "flower-superlink"), *self._tls("superlink"), "--host", "127.0.0.1", "--port",
                   str(self.port), "--disable-runtime-dependency-installation"]
        command += ["--enable-supernode-auth"] if self.node_auth else []
        command += ["--database", str(self.home / "superlink.db")] if self.database else []
        self.superlink_command = command + (["--simulation"] if self.simulation else [])
        self.start_superlink()
        return self

    def start_superlink(self) -> None:
        """Start the SuperLink (again, after a crash: the same port, and with `database` the same state)."""
        self._start("superlink", self.superlink_command)
        self._wait_for_health()

    def __exit__(self, *exc):
        self.stop()
        return False

    def _tls(self, role: str) -> list[str]:
        if self.certificates is None:
            return ["--insecure"]
        c = self.certificates
        if role == "superlink":
            return ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.pem"),
                    "--ssl-keyfile", str(c / "server.key")]
        return ["--root-certificates", str(c / "ca.crt")]

    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.processes[name] = process
        return process

    def _wait_for_health(self, timeout: float = 60.0) -> None:
        import httpx
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes["superlink"].poll() is not None:
                raise RuntimeError(f"flower-superlink exited: see {self.log_dir / 'superlink.log'}")
            try:
                scheme, verify = ("https", str(self.certificates / "ca.crt")) if self.certificates else ("http", True)
                if httpx.get(f"{scheme}://127.0.0.1:{self.port}/health", timeout=0.5, verify=verify).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"flower-superlink did not come up in {timeout:g} s: see {self.log_dir / 'superlink.log'}")

    def start_supernode(self, name: str, node_config: dict, register: bool = True) -> subprocess.Popen:
        """A SuperNode; with node authentication its key is registered first (register=False: an intruder with a
        key the SuperLink does not know)."""
        command = [str(BIN / "flower-supernode"), *self._tls("supernode"), "--superlink", f"127.0.0.1:{self.port}",
                   "--host", "127.0.0.1", "--port", str(self.new_port()), "--node-config", config_arg(node_config)]
        if self.node_auth:
            command += ["--auth-supernode-private-key", str(self.node_key(name, register))]
        return self._start(name, command)

    def new_port(self) -> int:
        port = next(p for p in iter(free_port, None) if p not in self.ports_given)
        self.ports_given.add(port)
        return port

    def node_key(self, name: str, register: bool) -> Path:
        """A key pair for a SuperNode (flower_app.deploy.make_node_key), its public key registered with the
        SuperLink by `flwr supernode register`; returns the private key's path."""
        from flower_app.deploy import make_node_key

        private, public = make_node_key(self.home / "keys", name)
        if register:
            subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public), CONNECTION], cwd=ROOT,
                           env=self.env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        return private

    def run_command(self, run_config: dict, num_supernodes: int | None = None,
                    client_cpus: float | None = None, app: str | Path = ROOT) -> list[str]:
        command = [str(BIN / "flwr"), "run", str(app), CONNECTION, "--stream", "--run-config", config_arg(run_config)]
        if self.simulation:
            federation = {"num-supernodes": num_supernodes or 2}
            if client_cpus is not None:
                federation["client-resources-num-cpus"] = client_cpus
            command += ["--federation-config", config_arg(federation)]
        return command

    def run(self, run_config: dict, name: str = "run", timeout: float = 600, **options) -> subprocess.Popen:
        """Submit a run and return the streaming `flwr run` process (wait() on it: it ends with the run)."""
        process = self._start(name, self.run_command(run_config, **options))
        process.timeout = timeout
        return process

    def stop(self) -> None:
        """Terminate every process started here and its descendants (a SuperLink's ServerApp or simulation,
        a SuperNode's ClientApp, Ray's workers), by pid: TERM, then KILL after 10 s."""
        family = []
        for process in self.processes.values():
            try:
                family += [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        terminate_all(family)
        for process in self.processes.values():
            if process.poll() is None:
                process.wait(timeout=5)


def terminate_all(processes: list) -> None:
    """TERM every psutil process given, then KILL those still alive after 10 s, and wait for them."""
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=10)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
