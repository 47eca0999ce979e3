"""A broker visibility timeout shorter than a job: the duplicate delivery exits (issue 4,
faults 9).

Settings require soft < hard time limit < visibility timeout, and one worker's Celery cannot
be configured otherwise; so how does a job outlive a visibility timeout? The visibility timeout
is not a property of one worker: kombu's Redis transport keeps every unacked message in one
shared ``unacked`` hash, and ANY consumer's restore sweep puts back the messages older than ITS
OWN ``visibility_timeout``. A fleet where one worker runs with a short one (a rolling deploy,
one host configured differently) redelivers the long jobs of the others. That is what this test
builds, with every process's settings valid: worker A (the usual limits: soft 3600 s, hard
3660 s, visibility 7200 s) runs a job, whose pool child the test pauses (SIGSTOP) so that the
job lasts however long B takes to start; worker B starts with soft 1 s, hard 2 s, visibility
3 s after the job has been unacked longer than 3 s; B's first restore sweep
(at consumer start) puts A's message back and B, the only consumer with a free slot, receives
it. The duplicate's claim finds the lease held by A and returns without a write: one run, one
attempt, one set of artifacts. The settings validator is therefore not the protection; the lease
is (take it away, and B claims the job as attempt 2 and A's run is thrown away).
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import redis
from fastapi.testclient import TestClient

from app.main import create_app
from tests.faults.conftest import (
    assert_one_artifact_set,
    fault_env,
    job_row,
    upload_mlp,
    wait_terminal,
)
from tests.service.conftest import (
    new_key,
    settings_from_env,
    start_worker,
    stop_worker,
    truncate_all,
)

SHORT_VISIBILITY_S = 3
# Long enough to outlive B's visibility timeout plus B's start-up (about 3 s) with margin.
RECIPE = {"prune_ratio": 0.5, "quant": "int8_static", "distill_epochs": 40}


def test_duplicate_delivery_finds_lease_taken_and_exits(
        faults_pg_url: str, faults_redis_url: str, mlp_files: dict[str, Path],
        tmp_path: Path) -> None:
    # No reaper: nothing but the broker may send the job twice here.
    # Lease 60 s: A's child is paused below for several seconds, and its lease must stay
    # valid (B's claim must be refused because A holds the job, not because of timing).
    env_a = fault_env(faults_pg_url, faults_redis_url, tmp_path / "a",
                      MODELPRESS_REAPER_IN_WORKER="false", MODELPRESS_JOB_LEASE_S="60")
    env_b = {**env_a,
             "MODELPRESS_JOB_SOFT_TIME_LIMIT_S": "1",
             "MODELPRESS_JOB_HARD_TIME_LIMIT_S": "2",
             "MODELPRESS_BROKER_VISIBILITY_TIMEOUT_S": str(SHORT_VISIBILITY_S),
             "MODELPRESS_TMP_DIR": str(tmp_path / "b" / "work"),
             "MODELPRESS_WORKER_PRELOAD_ENGINE": "false"}  # B starts fast; never runs a job
    settings = settings_from_env(env_a)
    settings_from_env(env_b)  # B's settings are valid too: the validator cannot see the fleet
    # A fresh broker DB: nothing another test left (unacked entries, kombu's restore mutex)
    # may change what B's restore sweep does.
    redis.Redis.from_url(faults_redis_url).flushdb()
    a = start_worker(env_a, tmp_path / "a.log")
    b = None
    child, paused = 0, False
    try:
        key = new_key(settings, "faults-dup")
        auth = {"Authorization": f"Bearer {key}"}
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            model_id, dataset_id = upload_mlp(client, auth, mlp_files)
            r = client.post("/v1/jobs", headers=auth, json={
                "model_id": model_id, "dataset_id": dataset_id, "device": "cpu",
                "recipe": RECIPE, "constraints": {"batch_size": 64, "threads": 1,
                                                  "time_budget_s": 300}})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]

            deadline = time.monotonic() + 90
            while (row := job_row(faults_pg_url, job_id)).status != "running":
                assert time.monotonic() < deadline, (tuple(row), a.output()[-3000:])
                time.sleep(0.05)
            owner = row.lease_owner
            task_id = owner.rsplit(":", 1)[1]
            received = f"Task modelpress.jobs.run[{task_id}] received"
            assert a.output().count(received) == 1
            # The job must outlast B's visibility timeout and B's start whatever the load:
            # pause A's pool child (a long job, as far as the broker can tell) until B has
            # dealt with the duplicate. Its lease (60 s) stays valid meanwhile.
            child = int(owner.split(":")[1])
            os.kill(child, signal.SIGSTOP)
            paused = True
            time.sleep(SHORT_VISIBILITY_S + 0.5)  # A's message is now older than B's timeout
            b = start_worker(env_b, tmp_path / "b.log")

            # B gets the very same task (same id: a redelivery, not a new message) and is
            # done with it while A still runs the job.
            deadline = time.monotonic() + 30
            done = re.compile(re.escape(f"Task modelpress.jobs.run[{task_id}] succeeded in ")
                              + r"([0-9.]+)s")
            while not done.search(b.output()):
                keys = redis.Redis.from_url(faults_redis_url).keys()
                assert time.monotonic() < deadline, ("no duplicate delivery to B", keys,
                                                     b.output()[-3000:])
                time.sleep(0.1)
            assert received in b.output()
            # The claim refused it: the job is untouched, still A's first attempt.
            mid = job_row(faults_pg_url, job_id)
            assert (mid.status, mid.attempt, mid.lease_owner) == ("running", 1, owner), \
                (tuple(mid), a.output()[-2000:])
            os.kill(child, signal.SIGCONT)
            paused = False

            row = wait_terminal(faults_pg_url, job_id, 150, a.output)
            assert (row.status, row.attempt, row.error_code) == ("succeeded", 1, None), \
                tuple(row)
            assert_one_artifact_set(client, auth, faults_pg_url, job_id, attempt=1)
            # One run: A received the task once, and B never started the engine.
            assert a.output().count(received) == 1
            assert not (tmp_path / "b" / "work").exists()  # made only after a claim
    finally:
        if paused:
            os.kill(child, signal.SIGCONT)
        if b is not None:
            stop_worker(b)
        stop_worker(a)
        truncate_all(faults_pg_url)
