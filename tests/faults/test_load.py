"""Load: 20 concurrent clients submit tiny real jobs to two worker processes; every job
reaches a terminal state exactly once, none lost, none duplicated.

The job count is ``MODELPRESS_TEST_LOAD_JOBS``, 200 as the issue asks: on a quiet 2-core
machine 200 jobs took 3 min 9 s (about 64 jobs/min with 2 workers); on one shared with other
work (load average 6), before ONNX exports shared one op registry per process, about 17
jobs/min. ``python -m bench.load`` runs the same stack and prints the throughput.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator

import pytest

from bench.load import LoadStack, drive, load_stack
from tests.faults.servers import TERMINAL, Rows, redis_server
from tests.service.conftest import create_database, drop_database

JOBS = int(os.environ.get("MODELPRESS_TEST_LOAD_JOBS", "200"))
CLIENTS = int(os.environ.get("MODELPRESS_TEST_LOAD_CLIENTS", "20"))
WORKERS = 2

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadStack]:
    tmp = tmp_path_factory.mktemp("load")
    db = create_database("mp_load")
    try:
        with redis_server(tmp / "redis") as redis, load_stack(tmp, WORKERS, db,
                                                               redis.url) as st:
            yield st
    finally:
        drop_database(db)


def test_load_every_job_terminal_once(stack: LoadStack) -> None:
    # Generous: about 5 s of CPU per job on 2 shared cores, plus a first (cold) job per worker.
    res = drive(stack.url, stack.key, stack.body, JOBS, CLIENTS,
                timeout_s=90 + 8 * JOBS / WORKERS)
    summary = res.summary()
    print(f"\nload: {summary}")
    assert not res.errors, res.errors[:5]

    # None lost at submission, none duplicated: JOBS distinct ids, each answered once.
    assert len(res.submitted) == JOBS and len(set(res.submitted)) == JOBS

    # Every job terminal, on its first claim, with an engine outcome (never worker_lost,
    # internal_error or stuck running).
    stuck = [j for j in res.jobs.values() if j["status"] not in TERMINAL]
    assert not stuck, f"{len(stuck)} not terminal, e.g. {stuck[:2]}"
    outcomes = Counter((j["status"], (j["error"] or {}).get("code")) for j in res.jobs.values())
    assert set(outcomes) <= {("succeeded", None), ("failed", "constraints_unsatisfiable")}, \
        outcomes
    assert Counter(j["attempt"] for j in res.jobs.values()) == {1: JOBS}

    # The database agrees: exactly these jobs, each with exactly one set of artifacts (one
    # row per name, the same names for every job), and no bytes stored that no row lists.
    rows = Rows(stack.database_url)
    try:
        db_jobs = rows.query("SELECT id, status, attempt FROM jobs")
        assert {j["id"] for j in db_jobs} == set(res.submitted)
        arts = rows.query("SELECT job_id, name, storage_key FROM artifacts")
        blobs = {r["key"] for r in rows.query(
            "SELECT DISTINCT key FROM blob_chunks WHERE key LIKE 'jobs/%'")}
    finally:
        rows.dispose()
    names_by_job: dict[str, list[str]] = {}
    for a in arts:
        names_by_job.setdefault(a["job_id"], []).append(a["name"])
        assert a["storage_key"].startswith(f"jobs/{a['job_id']}/"), a
    assert set(names_by_job) == set(res.submitted)
    sets = Counter(tuple(sorted(n)) for n in names_by_job.values())
    assert len(sets) == 1, f"artifact sets differ between jobs: {sets}"
    (names, _), = sets.items()
    assert len(set(names)) == len(names) and "model.onnx" in names, names
    assert blobs == {a["storage_key"] for a in arts}, "bytes stored without an artifact row"

    # The broker delivered each job's message once: every task id and job id appears in
    # exactly one "received" line over both workers, and both workers took jobs.
    received: Counter[str] = Counter()
    per_worker = []
    for w in stack.workers:
        got = re.findall(r"Task modelpress\.jobs\.run\[([0-9a-f-]+)\] received", w.output())
        per_worker.append(len(got))
        received.update(got)
    assert sum(per_worker) == JOBS and all(n > 0 for n in per_worker), per_worker
    assert max(received.values()) == 1

