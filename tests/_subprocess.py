"""Child processes that never outlive their test.

A command such as ``python -m torch.distributed.run`` starts workers of its own. Killing only
the launcher on a timeout leaves those workers running (and holding cores) for good, so every
command here runs in a new session, i.e. its own process group, and the whole group is killed
when the test is done with it: on a timeout, on any error, and after a normal exit (workers
that outlived their launcher).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any, Iterator, Sequence


def _descendants(pid: int) -> list[int]:
    """Living descendants of ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    # the command name may hold spaces; the fields after its closing ')' do not
                    ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process left in ``proc``'s process group (the group id is its pid), and
    its descendants that started sessions of their own (torchrun's workers do)."""
    for pid in _descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def process_group(cmd: Sequence[str], **kwargs: Any) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen(cmd, **kwargs)`` in its own process group, killed whole on leaving the block."""
    with subprocess.Popen(cmd, start_new_session=True, **kwargs) as proc:
        try:
            yield proc
        finally:
            kill_group(proc)


def run_group(cmd: Sequence[str], timeout: float, *, capture_output: bool = False, **kwargs: Any) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(cmd, timeout=timeout, ...)``, but a timeout kills the command's whole
    process group (not only its first process) before :class:`subprocess.TimeoutExpired` is raised."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with process_group(cmd, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(proc.args, timeout, output=out, stderr=err) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
