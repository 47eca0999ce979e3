"""Who counts as a provably dead lease holder (app.services.pipeline._dead_local_owner).

The kill tests show the takeover end to end; this pins down the refusals, which no kill test
can (a wrong "dead" verdict would let a redelivery steal a live job's lease).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from app.services.pipeline import _dead_local_owner

HOST = socket.gethostname()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # exited and reaped: the pid names no process now
    return p.pid


def test_same_task_same_host_dead_pid_is_dead() -> None:
    owner = f"{HOST}:{_dead_pid()}:task-1"
    assert _dead_local_owner(owner, f"{HOST}:{os.getpid()}:task-1") == owner


def test_live_or_foreign_owners_are_not_dead() -> None:
    me = f"{HOST}:{os.getpid()}:task-1"
    dead = _dead_pid()
    assert _dead_local_owner(f"{HOST}:{os.getppid()}:task-1", me) is None  # alive
    assert _dead_local_owner(f"{HOST}:{os.getpid()}:task-1", me) is None  # ourselves
    assert _dead_local_owner(f"other-host:{dead}:task-1", me) is None  # not our pid space
    assert _dead_local_owner(f"{HOST}:{dead}:task-2", me) is None  # another message
    assert _dead_local_owner(f"{HOST}:1:task-1", me) is None  # init: alive (or not ours)
    for bad in (None, "", "w1", f"{HOST}:x:task-1", f"{HOST}:0:task-1", f"{HOST}:-5:task-1"):
        assert _dead_local_owner(bad, me) is None, bad
