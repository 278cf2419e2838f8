"""The console of a run: the README quick-start prints only its progress bars and the INFO lines a user wants; no
network fails in one line without the hub client's retries; --log_level is checked."""
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest

from conftest import ROOT

# Everything the quick-start may write to stderr, piece by piece (tqdm redraws with \r): its two progress bars and
# the INFO line of each checkpoint written. Nothing else: no library notes, no warnings, no exit-time reports.
ALLOWED_STDERR = {
    "rounds progress bar": re.compile(r"rounds: +\d+%\|[^|]*\| \d+/1 \[[^\]]*\]$"),
    "exact-match progress bar": re.compile(r"exact match: +\d+%\|[^|]*\| \d+/12 \[[^\]]*\]$"),
    "checkpoint INFO line": re.compile(r"\d{4}-\d\d-\d\d [\d:,]+ INFO federated\.loop: Round (\d+): checkpoint written "
                                       r"to \S+checkpoint-\1$"),
}
# The README's quick-start flags, but its --num_rounds 5.
QUICK_START = ["--fed_alg", "fedavg", "--sample_clients", "4", "--max_steps", "5", "--batch_size", "8",
               "--seq_length", "96", "--learning_rate", "5e-4"]


def user_env(**extra) -> dict:
    """The environment of a user who set nothing: no offline mode (the tests' default elsewhere)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                            "HF_DATASETS_OFFLINE")}
    return {**env, **extra}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_quick_start_stderr_holds_only_progress_and_expected_info(tiny_model_dir, tmp_path):
    """The README's first command on the tiny model, in 1 round instead of 5 (each round runs the same code: 4
    local trainings, the server step, a checkpoint at the last), scored on 1 held-out sample per task."""
    out = tmp_path / "quickstart"
    proc = subprocess.run([sys.executable, "main_sft.py", *QUICK_START, "--num_rounds", "1",
                           "--model_name_or_path", tiny_model_dir, "--eval_per_task", "1", "--output_dir", str(out)],
                          cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pieces = [p.strip() for p in re.split(r"[\r\n]", proc.stderr) if p.strip()]
    unexpected = [p for p in pieces if not any(rule.match(p) for rule in ALLOWED_STDERR.values())]
    assert not unexpected, "stderr holds more than " + ", ".join(ALLOWED_STDERR) + ":\n" + "\n".join(unexpected)
    assert sum(bool(ALLOWED_STDERR["checkpoint INFO line"].match(p)) for p in pieces) == 1
    assert re.fullmatch(r"\[all\] exact match on the 12 held-out samples: \d\.\d{3}\n", proc.stdout)


def test_unreachable_hub_fails_in_one_line_without_retries(tmp_path):
    """fed-aya from the hub with no server there: one probe, then the existing one-line message."""
    env = user_env(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf"),
                   FEDLLM_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "main_sft.py", "--dataset", "fed-aya", "--output_dir", str(tmp_path / "o")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Retry" not in err, err
    assert "127.0.0.1" in err and "unreachable" in err and "HF_HUB_OFFLINE=1" in err and "--local_data_dir" in err


class _FileServer(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_HEAD(self):
        self.requests.append("HEAD " + self.path)
        self.send_response(404)
        self.end_headers()

    def do_GET(self):
        self.requests.append("GET " + self.path)
        body = b'{"question_id": 1, "text": "Hi"}\n'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def file_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FileServer)
    _FileServer.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _FileServer.requests
    server.shutdown()
    server.server_close()


def test_evaluation_data_downloads_honour_offline_mode_and_unreachable_servers(file_server, tmp_path, monkeypatch):
    from evaluation import data
    from utils import network
    url, requests = file_server
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "cache"))
    relpath = "vicuna/question.jsonl"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(data.SOURCES, relpath, data.Source(f"{url}/question.jsonl"))
    with pytest.raises(SystemExit, match="HF_HUB_OFFLINE is set"):
        data.data_file(relpath)
    assert requests == []  # offline mode: no request at all

    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert data.read_jsonl(data.data_file(relpath)) == [{"question_id": 1, "text": "Hi"}]
    assert requests == ["HEAD /", "GET /question.jsonl"]

    dead = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setitem(data.SOURCES, "advbench/advbench.csv", data.Source(f"{dead}/advbench.csv"))
    with pytest.raises(SystemExit, match=f"127.0.0.1:{dead.rsplit(':', 1)[1]} is unreachable"):
        data.data_file("advbench/advbench.csv")
    assert network.unreachable(f"{dead}/other.csv")  # probed once per server, remembered


def test_log_level_is_checked():
    from utils.console import check_log_level
    assert check_log_level("WARNING") == 30
    with pytest.raises(SystemExit, match="--log_level 'loud' is not one of debug, info, warning, error"):
        check_log_level("loud")


@pytest.mark.parametrize("quantizes", [False, True])
def test_bitsandbytes_only_when_quantising_and_never_its_hub_kernel_note(quantizes):
    """bitsandbytes (imported by peft whenever importable) asks for a hub kernel through the `kernels` import name,
    which this project's kernels/ answers: a run that does not quantise never imports it; a 4-bit CPU run says in
    its one warning what that means, in place of bitsandbytes' failed import. Whether bitsandbytes asks for the
    hub kernel at all depends on the CPU, and the warning on there being no GPU: the child reports both."""
    code = ("import json, sys, torch; from utils.console import configure_console; "
            f"configure_console('info', quantizes={quantizes}); import peft; "
            "from utils.model import _HUB_KERNEL_NOTE, quantization_config; "
            f"quantization_config(False, {quantizes}); print(json.dumps({{'imported': 'bitsandbytes' in sys.modules "
            "and sys.modules['bitsandbytes'] is not None, 'hub_kernel_asked': _HUB_KERNEL_NOTE.seen, "
            "'cuda': torch.cuda.is_available()}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert child["imported"] == quantizes
    assert "kernels-community" not in proc.stderr
    on_cpu = quantizes and not child["cuda"]
    expected = ["WARNING utils.model: --load_in_4bit on a CPU: bitsandbytes runs its CPU code"] if on_cpu else []
    lines = proc.stderr.splitlines()
    assert len(lines) == len(expected) and all(e in line for e, line in zip(expected, lines)), proc.stderr
    hub_note = "optional CPU kernel from the Hugging Face hub is not used" in proc.stderr
    assert hub_note == (on_cpu and child["hub_kernel_asked"])
