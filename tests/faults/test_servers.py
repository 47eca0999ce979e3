"""Servers restarted under a live service: Redis losing its data, Postgres stopped mid-job.

Every server killed here is one this module started itself on a free port (tests/faults/
servers.py); the shared Postgres (5432) and Redis (6379) are never touched.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.db.migrate import upgrade
from tests.faults.servers import (
    TERMINAL,
    Api,
    PgCluster,
    Proc,
    RedisServer,
    Rows,
    job_body,
    new_key,
    pg_cluster,
    poll,
    redis_server,
    service_env,
    start_api,
    start_worker,
    stop_worker,
    tiny_mlp,
    upload,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_mlp(tmp_path_factory.mktemp("mlp"))


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    """A Postgres cluster of this module's own (initdb takes a few seconds: once per module);
    stopped and removed in teardown whatever the tests did to it."""
    with pg_cluster() as cluster:
        yield cluster


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


def _client(api: Api, key: str) -> httpx.Client:
    return httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"},
                        timeout=30)


def _get_job(c: httpx.Client, job_id: str) -> dict[str, Any]:
    r = c.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    job: dict[str, Any] = r.json()
    return job


def _deliveries(worker: Proc) -> int:
    """How many job messages the worker received (each re-send is one more)."""
    return len(re.findall(r"Task modelpress\.jobs\.run\[[0-9a-f-]+\] received", worker.output()))


def _alive(*procs: Proc) -> None:
    for p in procs:
        assert p.proc.poll() is None, f"process {p.proc.args} exited:\n{p.output()[-3000:]}"


# --- 7. Redis restarted with its data lost ---------------------------------------------------


def test_redis_data_loss_reconciler_resends_queued_jobs(
        pg: PgCluster, redis: RedisServer, mlp: dict[str, Path], tmp_path: Path) -> None:
    """Jobs are queued while no worker runs; Redis is killed (no persistence: every message is
    lost) and started again empty on the same port. The worker's reconciler finds the queued
    rows in Postgres older than requeue_after_s and re-sends them; every job succeeds, once."""
    db = pg.create_database()
    upgrade(db)
    key = new_key(db, "reconcile")
    env = service_env(db, redis.url, tmp_path, requeue_after_s="2", reaper_interval_s="0.5",
                      reaper_in_worker="true")
    api = start_api(env, tmp_path / "api.log")
    rows = Rows(db)
    worker: Proc | None = None
    try:
        with _client(api, key) as c:
            up = upload(c, mlp)
            ids = []
            for _ in range(3):
                r = c.post("/v1/jobs", json=job_body(up))
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
            # The messages are in Redis (kombu's list per queue) ...
            assert redis.client().llen("cpu") == 3
            redis.kill()
            redis.start()
            # ... and now they are gone: the broker lost them, only Postgres knows the jobs.
            assert redis.client().llen("cpu") == 0
            assert {j["status"] for j in map(lambda i: _get_job(c, i), ids)} == {"queued"}

            worker = start_worker(env, tmp_path / "worker.log")

            def all_done() -> list[dict[str, Any]] | None:
                jobs = [_get_job(c, i) for i in ids]
                return jobs if all(j["status"] in TERMINAL for j in jobs) else None

            jobs = poll("jobs re-sent after the Redis restart and finished", all_done, 120,
                        interval_s=0.5, on_timeout=lambda: worker.output()[-4000:]
                        if worker else "")
            for j in jobs:
                assert j["status"] in {"succeeded", "failed"}, j
                # A terminal outcome of the engine, on the first claim: the re-sent message
                # was the only one delivered (a duplicate would find the lease taken anyway).
                assert j["error"] is None or j["error"]["code"] == "constraints_unsatisfiable", j
                assert j["attempt"] == 1, j
                names = [a["name"] for a in c.get(f"/v1/jobs/{j['id']}/artifacts")
                         .json()["items"]]
                assert sorted(names) == sorted(set(names)) and "model.onnx" in names, names
            resent = rows.query("SELECT count(*) AS n FROM jobs WHERE enqueued_at > created_at"
                                " + interval '1 second'")
            assert resent[0]["n"] == 3, resent
            # Bounded re-sends: jobs waiting behind the first one (their messages in the queue
            # again) are not re-sent on every pass (every 0.5 s here, for about a minute).
            # One extra message per job is allowed: a message the worker has reserved but not
            # yet claimed is in neither the queue nor a running row.
            assert _deliveries(worker) <= 2 * len(ids), worker.output()[-3000:]
    finally:
        if worker is not None:
            stop_worker(worker)
        api.proc.stop()
        rows.dispose()


def test_redis_restart_under_a_busy_worker(
        pg: PgCluster, redis: RedisServer, mlp: dict[str, Path], tmp_path: Path) -> None:
    """The same loss with the worker running through it: it is busy with job A while B and C
    wait in Redis; Redis is killed and started again empty. The worker reconnects by itself,
    A finishes on its first claim (its unacked message died with Redis), and the reconciler
    in the worker's main process re-sends B and C; all three finish, the worker never
    restarted."""
    db = pg.create_database()
    upgrade(db)
    key = new_key(db, "reconcile-live")
    env = service_env(db, redis.url, tmp_path, requeue_after_s="2", reaper_interval_s="0.5",
                      reaper_in_worker="true")
    api = start_api(env, tmp_path / "api.log")
    worker = start_worker(env, tmp_path / "worker.log")
    pid = worker.proc.pid
    try:
        with _client(api, key) as c:
            up = upload(c, mlp)
            r = c.post("/v1/jobs", json=job_body(
                up, {"prune_ratio": 0.5, "quant": "int8_static", "distill_epochs": 20}))
            assert r.status_code == 202, r.text
            a = r.json()["id"]
            poll("job A running", lambda: True if _get_job(c, a)["status"] == "running"
                 else None, 120, interval_s=0.05, on_timeout=lambda: worker.output()[-3000:])
            ids = [a]
            for _ in range(2):
                r = c.post("/v1/jobs", json=job_body(up))
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
            assert redis.client().llen("cpu") == 2  # B and C wait behind A (prefetch 1)
            assert _get_job(c, a)["status"] == "running"
            redis.kill()
            redis.start()
            assert redis.client().llen("cpu") == 0

            def all_done() -> list[dict[str, Any]] | None:
                jobs = [_get_job(c, i) for i in ids]
                return jobs if all(j["status"] in TERMINAL for j in jobs) else None

            jobs = poll("jobs finished after Redis restarted under the worker", all_done, 150,
                        interval_s=0.5, on_timeout=lambda: worker.output()[-4000:])
            for j in jobs:
                assert j["status"] in {"succeeded", "failed"}, j
                assert j["error"] is None or j["error"]["code"] == "constraints_unsatisfiable", j
                assert j["attempt"] == 1, j
            # A's message, then B's and C's re-sent: a bounded number of times (see above),
            # not once per reconciler pass while they wait behind A.
            assert _deliveries(worker) <= 2 * len(ids), worker.output()[-3000:]
            _alive(worker)
            assert worker.proc.pid == pid
    finally:
        stop_worker(worker)
        api.proc.stop()


# --- 8. Postgres stopped during a job ---------------------------------------------------------


def test_postgres_restart_mid_job_503_then_recovers(
        pg: PgCluster, redis: RedisServer, mlp: dict[str, Path], tmp_path: Path) -> None:
    """Postgres stops (immediate: as a crash) while a job runs in the engine. The API answers
    503 problem JSON (`unavailable`, Retry-After) on the polled route and /readyz, never a 500
    and never a hang; once Postgres is back, the same API and worker processes (not
    restarted) answer 200 again and the job reaches a terminal state with its artifacts."""
    db = pg.create_database()
    upgrade(db)
    key = new_key(db, "pgrestart")
    # Lease above the outage: the running job keeps its claim across it (heartbeats fail
    # while Postgres is down and resume after).
    env = service_env(db, redis.url, tmp_path, job_lease_s="20", heartbeat_interval_s="1",
                      reaper_interval_s="1", requeue_after_s="30", reaper_in_worker="true")
    api = start_api(env, tmp_path / "api.log")
    worker = start_worker(env, tmp_path / "worker.log")
    pids = (api.proc.proc.pid, worker.proc.pid)
    try:
        with _client(api, key) as c:
            up = upload(c, mlp)
            r = c.post("/v1/jobs", json=job_body(
                up, {"prune_ratio": 0.5, "quant": "int8_static", "distill_epochs": 20}))
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]

            # Inside the engine (inputs fetched), before it ends.
            def in_engine() -> dict[str, Any] | None:
                j = _get_job(c, job_id)
                assert j["status"] not in TERMINAL, f"finished before the outage: {j}"
                return j if j["status"] == "running" and j["stage"] not in (None, "load") \
                    else None

            before = poll("job running in the engine", in_engine, 120, interval_s=0.05,
                          on_timeout=lambda: worker.output()[-3000:])

            pg.stop_immediate()
            t_down = time.monotonic()
            for path in (f"/v1/jobs/{job_id}", "/readyz", f"/v1/jobs/{job_id}/artifacts",
                         "/v1/jobs"):
                t0 = time.monotonic()
                r = c.get(path)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.headers["content-type"].startswith("application/problem+json")
                body = r.json()
                assert body["code"] == "unavailable" and body["status"] == 503, body
                assert time.monotonic() - t0 < 5, f"{path} took {time.monotonic() - t0:.1f} s"
                if path != "/readyz":
                    assert int(r.headers["retry-after"]) > 0
            # A submission while the database is down is refused the same way (and, below,
            # leaves no job behind).
            r = c.post("/v1/jobs", json=job_body(up))
            assert r.status_code == 503 and r.json()["code"] == "unavailable", r.text
            assert c.get("/healthz").status_code == 200  # the process itself is alive
            # Stay down across a few heartbeats and progress writes of the running job.
            time.sleep(max(0.0, 4 - (time.monotonic() - t_down)))
            pg.start()

            def recovered() -> dict[str, Any] | None:
                r = c.get(f"/v1/jobs/{job_id}")
                return r.json() if r.status_code == 200 else None

            poll("API answering again after Postgres came back", recovered, 30)
            assert c.get("/readyz").status_code == 200

            def finished() -> dict[str, Any] | None:
                j = _get_job(c, job_id)
                return j if j["status"] in TERMINAL else None

            done = poll("job terminal after the outage", finished, 150, interval_s=0.5,
                        on_timeout=lambda: worker.output()[-4000:])
            assert done["status"] in {"succeeded", "failed"}, done
            assert done["error"] is None or done["error"]["code"] == "constraints_unsatisfiable", \
                done
            # It carried on through the outage with its claim; only a job whose last writes
            # fell inside the outage (a quiet machine ends the tiny job within the 4 s) is run
            # again, once, after its lease expired: never more, never lost.
            assert before["attempt"] == 1 and done["attempt"] in (1, 2), done
            arts = c.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
            assert {"model.onnx", "report.json"} <= {a["name"] for a in arts}, arts
            d = c.get(f"/v1/jobs/{job_id}/artifacts/model.onnx")
            assert d.status_code == 200 and len(d.content) > 0
            listed = c.get("/v1/jobs").json()["items"]
            assert [j["id"] for j in listed] == [job_id], listed
            # Neither process was restarted to get here.
            _alive(api.proc, worker)
            assert (api.proc.proc.pid, worker.proc.pid) == pids
            assert done["attempt"] == 2 or "heartbeat failed" in worker.output() or \
                "progress write failed" in worker.output(), "the outage did not reach the job"
    finally:
        stop_worker(worker)
        api.proc.stop()
        if not pg.is_running():
            pg.start()  # leave the module's cluster as we found it
        assert os.path.exists(pg.datadir)


def test_only_transient_database_errors_are_503() -> None:
    """The 503 is for "cannot reach the database now"; a schema bug stays a 500."""
    import sqlite3

    import psycopg
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    from app.api.errors import database_unavailable

    def op(orig: Exception) -> OperationalError:
        return OperationalError("SELECT 1", {}, orig)

    assert database_unavailable(op(psycopg.OperationalError("connection refused")))
    assert database_unavailable(op(sqlite3.OperationalError("database is locked")))
    assert not database_unavailable(op(sqlite3.OperationalError("no such table: jobs")))
    assert not database_unavailable(ProgrammingError("SELECT", {}, Exception("syntax")))
    assert not database_unavailable(IntegrityError("INSERT", {}, Exception("duplicate")))
