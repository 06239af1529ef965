"""tests/_subprocess.py: a timed-out command's whole process group dies, workers included."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from _subprocess import process_group, run_group

# A launcher that starts a worker (as torchrun does), records the worker's pid, then hangs.
LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(worker.pid))
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        state = next(line for line in status.read_text().splitlines() if line.startswith("State:"))
    except FileNotFoundError:
        return False
    return "Z" not in state.split()[1]  # a zombie has exited; only its exit status is left


def _worker_pid(path: Path) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError("the launcher did not start its worker")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc to see the worker")
@pytest.mark.parametrize("own_session", [False, True], ids=["same-group", "own-session"])
def test_timeout_kills_the_launchers_workers_too(tmp_path, own_session):
    # torchrun starts its workers in sessions of their own: killing the group alone misses them.
    launcher = LAUNCHER.replace("time.sleep(120)\"])", "time.sleep(120)\"], start_new_session=True)") if own_session else LAUNCHER
    assert own_session == (launcher != LAUNCHER)
    pid_file = tmp_path / "worker.pid"
    # Not captured: a worker holding the pipe would make the wait below end only with the worker.
    with pytest.raises(subprocess.TimeoutExpired) as info:
        run_group([sys.executable, "-c", launcher, str(pid_file)], timeout=3, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert info.value.timeout == 3
    pid = _worker_pid(pid_file)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc to see the worker")
def test_leaving_the_block_kills_workers_of_a_finished_or_failed_command(tmp_path):
    pid_file = tmp_path / "worker.pid"
    with pytest.raises(RuntimeError, match="test failed"):
        with process_group([sys.executable, "-c", LAUNCHER, str(pid_file)]):
            _worker_pid(pid_file)
            raise RuntimeError("test failed")
    pid = _worker_pid(pid_file)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)
    done = run_group([sys.executable, "-c", "print('ok')"], timeout=60, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "ok\n"
