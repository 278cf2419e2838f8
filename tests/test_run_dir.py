"""The output-folder rules of federated/run_dir.py and the checkpoint checks of federated/checkpoint.py, on real
files and real processes (no model needed)."""
import errno
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from federated.checkpoint import RunState, checkpoint_problem, latest_good_checkpoint, save_checkpoint
from federated.loop import restore_metrics
from federated.run_dir import OutputDirLock, RunGuard, prepare_run_dir, resume_command

SETTINGS = {"fed_alg": "fedavg", "learning_rate": 1e-3, "num_rounds": 3, "dp_mode": None, "output_dir": "x"}


class AdapterStub(torch.nn.Module):
    """Saves like a PEFT model: one adapter_model.safetensors."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(4.0))

    def save_pretrained(self, path):
        from safetensors.torch import save_file
        path.mkdir(parents=True, exist_ok=True)
        save_file({"w": self.w.detach().clone()}, path / "adapter_model.safetensors")


def a_run(round_number: int) -> RunState:
    return RunState(x=torch.full((4,), float(round_number)), server_state={"m": torch.ones(4)}, round=round_number,
                    round_losses=[{0: 0.5}] * round_number)


def test_a_new_run_refuses_another_runs_checkpoints_and_overwrite_removes_them(tmp_path):
    save_checkpoint(tmp_path, a_run(1), AdapterStub())
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n')
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds checkpoints of an earlier run: pass --resume true to continue it, "
                                         "or --overwrite_output_dir true"):
        prepare_run_dir(tmp_path, SETTINGS, resume=False, overwrite=False)
    assert (tmp_path / "checkpoint-1").is_dir() and (tmp_path / "metrics.jsonl").read_text()
    prepare_run_dir(tmp_path, SETTINGS, resume=False, overwrite=True)
    assert not (tmp_path / "checkpoint-1").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's own files go
    assert json.loads((tmp_path / "args.json").read_text()) == SETTINGS


def test_resume_refuses_changed_run_settings_and_accepts_more_rounds(tmp_path):
    prepare_run_dir(tmp_path, SETTINGS, resume=False, overwrite=False)
    changed = {**SETTINGS, "fed_alg": "fedadam", "dp_mode": "clip", "output_dir": "moved"}
    with pytest.raises(SystemExit) as err:
        prepare_run_dir(tmp_path, changed, resume=True, overwrite=False)
    assert 'dp_mode: null -> "clip"; fed_alg: "fedavg" -> "fedadam")' in str(err.value)
    assert "output_dir" not in str(err.value)  # a moved folder is not a different run
    extended = {**SETTINGS, "num_rounds": 10}
    prepare_run_dir(tmp_path, extended, resume=True, overwrite=False)
    assert json.loads((tmp_path / "args.json").read_text())["num_rounds"] == 10
    with pytest.raises(SystemExit, match="contradict"):
        prepare_run_dir(tmp_path, SETTINGS, resume=True, overwrite=True)


def test_leftover_tmp_files_and_folders_are_removed(tmp_path):
    (tmp_path / "checkpoint-4.tmp").mkdir()
    (tmp_path / "checkpoint-4.tmp" / "run_state.json").write_text("{")
    (tmp_path / "metrics.jsonl.tmp").write_text("x")
    prepare_run_dir(tmp_path, SETTINGS, resume=False, overwrite=False)
    assert not list(tmp_path.glob("*.tmp"))


HOLD_LOCK = """
import sys, time
sys.path.insert(0, {root!r})
from federated.run_dir import OutputDirLock
lock = OutputDirLock(sys.argv[1])  # kept referenced: a collected lock closes its file
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_lock_refuses_a_second_process_and_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(root=str(ROOT)), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=rf"is in use by another run \(pid {holder.pid}\)"):
            OutputDirLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the file still names it
        holder.wait()
    assert (tmp_path / ".run.lock").read_text().strip() == str(holder.pid)
    lock = OutputDirLock(tmp_path)
    lock.acquire()
    assert (tmp_path / ".run.lock").read_text().strip() == str(os.getpid())
    lock.release()
    again = OutputDirLock(tmp_path)  # released on exit: the next run gets it
    again.acquire()
    again.release()


def test_resume_command_drops_overwrite_and_adds_resume():
    argv = ["main_sft.py", "--fed_alg", "fedavg", "--overwrite_output_dir", "true", "--resume=false",
            "--output_dir", "out dir"]
    assert resume_command(argv) == "python main_sft.py --fed_alg fedavg --output_dir 'out dir' --resume true"
    assert resume_command(["main_dpo.py", "--resume", "--num_rounds", "3"]) == \
        "python main_dpo.py --num_rounds 3 --resume true"


def test_checkpoints_carry_checksums_and_a_corrupt_one_falls_back(tmp_path, caplog):
    for r in (1, 2):
        save_checkpoint(tmp_path, a_run(r), AdapterStub())
    sums = json.loads((tmp_path / "checkpoint-2" / "checksums.json").read_text())
    assert set(sums) == {"adapter_model.safetensors", "run_state.safetensors", "run_state.json"}
    assert checkpoint_problem(tmp_path / "checkpoint-2") is None
    state = tmp_path / "checkpoint-2" / "run_state.safetensors"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the tensor bytes: still loads, but is not what was saved
    state.write_bytes(bytes(data))
    assert checkpoint_problem(tmp_path / "checkpoint-2") == "run_state.safetensors does not match its checksum"
    path, run = latest_good_checkpoint(tmp_path)
    assert path.name == "checkpoint-1" and run.round == 1 and torch.equal(run.x, torch.ones(4))
    assert "Skipping" in caplog.text and "checkpoint-2" in caplog.text
    (tmp_path / "checkpoint-1" / "adapter_model.safetensors").unlink()
    assert latest_good_checkpoint(tmp_path) == (None, None)


def test_torn_or_missing_metrics_are_rebuilt_from_the_checkpoint(tmp_path):
    run = a_run(3)
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"round": r, "clients": [0], "round_time_s": 1.0} for r in (1, 2, 3, 4)]
    # Round 2's line torn by a crash mid-write, round 4 done after the checkpoint (to be redone).
    metrics.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:9] + "\n" + json.dumps(rows[2]) + "\n"
                       + json.dumps(rows[3]) + "\n")
    restore_metrics(metrics, run, lambda r: {"round": r, "rebuilt_from_checkpoint": True})
    kept = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert kept == [rows[0], {"round": 2, "rebuilt_from_checkpoint": True}, rows[2]]
    metrics.unlink()
    restore_metrics(metrics, run, lambda r: {"round": r, "rebuilt_from_checkpoint": True})
    assert [json.loads(line)["round"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


def test_an_interrupted_run_prints_one_line_with_the_resume_command(tmp_path):
    """RunGuard in a real process: SIGTERM while it works -> exit 143 and one line naming the last checkpoint."""
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
            "from pathlib import Path\n"
            "from federated.run_dir import RunGuard\n"
            "with RunGuard(sys.argv[1], argv=['main_sft.py', '--output_dir', sys.argv[1]]):\n"
            "    Path(sys.argv[1], 'checkpoint-2').mkdir()\n"
            "    print('working', flush=True)\n"
            "    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "working"  # the handlers are in place: RunGuard entered first
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    lines = stderr.strip().splitlines()  # bitsandbytes may log its known kernels-package line first
    assert lines[-1] == (f"Stopped by SIGTERM: {tmp_path}: round 2 checkpointed. Continue with: python main_sft.py "
                         f"--output_dir {tmp_path} --resume true")
    assert not any("Traceback" in line for line in lines)
    assert (tmp_path / ".run.lock").read_text() == ""  # released


def fill_the_disk(path):
    """A write that fails as on a full disk: to /dev/full where the kernel has it (a character device), else the
    OSError such a write raises."""
    full = Path("/dev/full")
    if full.exists() and stat.S_ISCHR(full.stat().st_mode):
        with open(full, "w") as f:
            f.write("x" * 2 ** 16)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def safetensors_disk_full(path):
    """safetensors' writer reports a full disk in its own exception type, with the OS error in its message."""
    raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                       'on device" })')


@pytest.mark.parametrize("disk_full", [fill_the_disk, safetensors_disk_full])
def test_a_full_disk_stops_the_run_with_one_line_naming_the_folder_and_its_space(tmp_path, disk_full):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(SystemExit) as stop:
        with RunGuard(tmp_path, argv=["main_sft.py", "--output_dir", str(tmp_path)]):
            disk_full(tmp_path / "checkpoint-3.tmp" / "adapter_model.safetensors")
    message = str(stop.value.code)
    assert message.startswith(f"No space left on the disk of {tmp_path} (") and " MiB free) while writing " in message
    assert message.endswith(f"{tmp_path}: round 2 checkpointed. Free some space and continue with: python main_sft.py "
                            f"--output_dir {tmp_path} --resume true") and "\n" not in message
    assert (tmp_path / ".run.lock").read_text() == ""  # released


def test_other_errors_pass_through_the_guard(tmp_path):
    with pytest.raises(OSError, match="Permission denied"):
        with RunGuard(tmp_path):
            raise OSError(errno.EACCES, "Permission denied")


def test_an_atomic_write_that_fails_midway_leaves_the_old_file_whole(tmp_path):
    """The write fails midway (a lone surrogate cannot be encoded): a write in place would have truncated the old
    file; the old one stays, and no temporary file is left."""
    from utils.files import write_json_atomic, write_text_atomic
    path = tmp_path / "args.json"
    write_json_atomic(path, {"round": 1})
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, '{"round": 2, "note": "\ud800"}')
    assert json.loads(path.read_text()) == {"round": 1} and [p.name for p in tmp_path.iterdir()] == ["args.json"]


def test_model_conversion_orphans_of_dead_processes_are_removed(tmp_path):
    from utils.model import _remove_orphaned_conversions
    target = tmp_path / "SmolLM2-135M-Instruct"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f"{target.name}.tmp-{dead.pid}", f"{target.name}.tmp-{os.getpid()}", f"{target.name}.tmp"):
        (tmp_path / name).mkdir()
    _remove_orphaned_conversions(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{target.name}.tmp-{os.getpid()}"]  # alive: kept
