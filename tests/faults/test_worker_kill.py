"""``kill -9`` of the Celery pool child running a job, in each stage (issue 4, faults 6).

A real prefork worker (tests/service/conftest.py's start_worker) on real Postgres and Redis
runs the service suite's tiny digits MLP with an explicit recipe (50 % prune, int8 static, and
two epochs of distillation when distillation is the stage killed), so the job takes seconds.
The worker preloads the engine (MODELPRESS_WORKER_PRELOAD_ENGINE, the default), so the child
that replaces a killed one starts at once.

Which path redelivers. ``task_acks_late`` + ``task_reject_on_worker_lost`` make Celery requeue
the message the moment the main process sees its child die, and the replacement child receives
it at once. The dead child's lease in Postgres has not expired yet; but the lease owner is
``host:pid:task id``, and a delivery of the same task on the same host whose owner pid no
longer exists takes the job over at once (attempt 2, asserted from the worker log). Without
that, the claim refuses the redelivery and the job waits for the reaper: it requeues the job
once the lease has expired (JOB_LEASE_S after the last heartbeat). After MAX_ATTEMPTS the
claim refuses both, and the reaper fails the job with ``worker_lost`` (the last test).

How the kill is known to land mid-stage: the test polls the job's row until its ``stage`` is
the target, then SIGSTOPs the child that holds the lease (its pid is in ``lease_owner``),
waits until the kernel reports it stopped, and reads the row again after a settle: the stage
is written synchronously at every stage change, so a stopped child whose row still says
``prune`` is between the start of prune and the start of the next stage. Only then SIGKILL.
If the stage had moved on, the test fails rather than claim a kill it did not make.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.conftest import (
    TERMINAL,
    Stack,
    assert_no_artifacts,
    assert_one_artifact_set,
    fault_env,
    job_row,
    running_stack,
    stored_keys,
    wait_terminal,
    work_dirs,
)

# "store" is not an engine stage: it is the service writing the artifacts after export, the
# one place a kill can leave stored bytes behind (the next attempt must delete them).
KILL_STAGES = ["prune", "quantize", "distill", "export", "store"]
# Every stage but distillation runs with no distillation: quantization-aware distillation
# makes a fresh pool child (every attempt 2 runs in one) spend ~15 s more in torchao.
RECIPE = {"prune_ratio": 0.5, "quant": "int8_static", "distill_epochs": 0}
DISTILL_RECIPE = {**RECIPE, "distill_epochs": 2}
JOB_TIMEOUT_S = 150  # one job incl. a reaped retry; the job itself takes ~10 s here


@pytest.fixture(scope="module")
def stack(faults_pg_url: str, faults_redis_url: str, mlp_files: dict[str, Path],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("kill")
    env = fault_env(faults_pg_url, faults_redis_url, tmp)
    with running_stack(env, tmp, faults_pg_url, mlp_files, "faults-kill") as s:
        yield s


def _submit(stack: Stack, recipe: dict[str, object] = RECIPE) -> str:
    r = stack.client.post("/v1/jobs", headers=stack.auth, json={
        "model_id": stack.model_id, "dataset_id": stack.dataset_id, "device": "cpu",
        "recipe": recipe, "constraints": {"batch_size": 64, "threads": 1,
                                          "time_budget_s": 300}})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc, None once the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0], int(fields[1])


def _wait_state(pid: int, ok: set[str | None], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = _proc_stat(pid)
        state = None if st is None else st[0]
        if state in ok or (None in ok and state == "Z"):  # Z: dead, not yet reaped
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} not in state {ok} after {timeout_s} s: {_proc_stat(pid)}")


def _stored_by_attempt(stack: Stack, job_id: str, attempt: int) -> set[str]:
    _, blobs = stored_keys(stack.settings.database_url, job_id)
    return {k for k in blobs if k.startswith(f"jobs/{job_id}/attempt-{attempt}/")}


@dataclass
class Killed:
    pid: int
    dirs: list[Path]  # the job's work directories at the moment of the kill
    stored: set[str]  # keys of this attempt's bytes in the store at that moment


def kill_child_in_stage(stack: Stack, job_id: str, stage: str, attempt: int,
                        ready: Callable[[], bool] | None = None) -> Killed:
    """SIGKILL the pool child running ``job_id`` while it is in ``stage`` of ``attempt``
    (and, if given, once ``ready()`` holds as well)."""
    db = stack.settings.database_url
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        row = job_row(db, job_id)
        assert row.status not in {"succeeded", "failed", "cancelled"}, tuple(row)
        if (row.status == "running" and row.attempt == attempt and row.stage == stage
                and (ready is None or ready())):
            pid = int(row.lease_owner.split(":")[1])  # host:pid:task id
            st = _proc_stat(pid)
            # The process running the task: a child of the worker, never its main process.
            assert st is not None and st[1] == stack.worker.proc.pid != pid, (pid, st)
            os.kill(pid, signal.SIGSTOP)
            _wait_state(pid, {"T", "t"})
            time.sleep(0.3)  # a progress write sent just before the stop reaches the server
            again = job_row(db, job_id)
            if (again.status, again.stage, again.lease_owner, again.attempt) != (
                    "running", stage, row.lease_owner, attempt):
                os.kill(pid, signal.SIGCONT)
                pytest.fail(f"stage {stage!r} ended before the kill could land: {tuple(again)}")
            # Frozen, it cannot change them: what it leaves behind.
            dirs = work_dirs(stack.work, job_id)
            stored = _stored_by_attempt(stack, job_id, attempt)
            os.kill(pid, signal.SIGKILL)
            _wait_state(pid, {None})
            return Killed(pid, dirs, stored)
        time.sleep(0.005)
    pytest.fail(f"job {job_id} never reached stage {stage!r} of attempt {attempt}: "
                f"{tuple(job_row(db, job_id))}\n{stack.worker.output()[-3000:]}")


def _assert_worker_saw_kill(stack: Stack, pid: int) -> None:
    deadline = time.monotonic() + 10
    needle = f"pid:{pid} exited with 'signal 9 (SIGKILL)'"
    while needle not in stack.worker.output():
        assert time.monotonic() < deadline, stack.worker.output()[-3000:]
        time.sleep(0.1)
    assert stack.worker.proc.poll() is None, "the worker's main process must survive"


@pytest.mark.parametrize("stage", KILL_STAGES)
def test_kill_pool_child_mid_stage_then_attempt_2_succeeds(stack: Stack, stage: str) -> None:
    job_id = _submit(stack, DISTILL_RECIPE if stage == "distill" else RECIPE)
    t0 = time.monotonic()
    ready = None
    if stage == "store":  # mid-store: after some of attempt 1's bytes are in, not all rows
        def ready() -> bool:
            return bool(_stored_by_attempt(stack, job_id, 1))
    killed = kill_child_in_stage(stack, job_id, stage, attempt=1, ready=ready)
    killed_at = time.monotonic() - t0
    _assert_worker_saw_kill(stack, killed.pid)
    if stage == "store":  # the dead attempt left bytes behind: attempt 2 must remove them
        assert killed.stored, killed
    assert len(killed.dirs) == 1, killed  # the killed attempt's work directory, left behind
    # Attempt 2's claim removes it (observed while attempt 2 runs: the maintenance sweep
    # only removes the directories of jobs that have ended).
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        row = job_row(stack.settings.database_url, job_id)
        if row.attempt == 2 and row.status == "running" and row.stage not in (None, "load"):
            assert not killed.dirs[0].exists(), killed
            break
        assert row.status not in TERMINAL and time.monotonic() < deadline, tuple(row)
        time.sleep(0.02)
    # Celery's redelivery took it over at once, not the reaper after the lease.
    assert f"job {job_id}: taking over from" in stack.worker.output()
    assert not _stored_by_attempt(stack, job_id, 1)

    row = wait_terminal(stack.settings.database_url, job_id, JOB_TIMEOUT_S,
                        stack.worker.output)
    assert (row.status, row.attempt, row.error_code) == ("succeeded", 2, None), tuple(row)
    assert row.lease_owner is None
    got = stack.client.get(f"/v1/jobs/{job_id}", headers=stack.auth).json()
    assert got["status"] == "succeeded" and got["attempt"] == 2 and got["progress"] == 1.0
    assert_one_artifact_set(stack.client, stack.auth, stack.settings.database_url, job_id,
                            attempt=2)
    assert work_dirs(stack.work, job_id) == []
    print(f"\n[{stage}] killed pid {killed.pid} after {killed_at:.1f} s; done after "
          f"{time.monotonic() - t0:.1f} s")


def test_kill_on_every_attempt_ends_worker_lost(stack: Stack) -> None:
    """MAX_ATTEMPTS=2 here: both attempts killed, the job fails ``worker_lost``, never stuck
    ``running``, and nothing of either attempt is listed or stored."""
    job_id = _submit(stack)
    for attempt in (1, 2):
        killed = kill_child_in_stage(stack, job_id, "prune", attempt=attempt)
        _assert_worker_saw_kill(stack, killed.pid)
    row = wait_terminal(stack.settings.database_url, job_id, JOB_TIMEOUT_S,
                        stack.worker.output)
    assert (row.status, row.attempt, row.max_attempts) == ("failed", 2, 2), tuple(row)
    assert row.error_code == "worker_lost" and "2 of 2 attempts" in row.error_detail
    got = stack.client.get(f"/v1/jobs/{job_id}", headers=stack.auth).json()
    assert got["status"] == "failed" and got["error"]["code"] == "worker_lost", got
    assert_no_artifacts(stack.client, stack.auth, stack.settings.database_url, job_id)
    # No later attempt claims the job to remove the last killed attempt's work directory: the
    # maintenance pass in the worker's main process does, now that the job has ended.
    deadline = time.monotonic() + 10
    while work_dirs(stack.work, job_id):
        assert time.monotonic() < deadline, work_dirs(stack.work, job_id)
        time.sleep(0.1)
