"""Load benchmark: many tiny real jobs from concurrent clients on two workers.

    python -m bench.load [--jobs 200] [--clients 20] [--workers 2]

Starts, on 127.0.0.1 only, the same stack as tests/faults/test_load.py: a fresh Postgres
database on the local server (``MODELPRESS_BENCH_PG_ADMIN``, migrated, dropped at the end), a
redis-server of its own on a free port, the API (uvicorn, one process) and ``--workers``
Celery worker processes (prefork, one job each). Each client submits its share of the jobs
(an explicit recipe on a tiny MLP: no search, no distillation), then polls them until they
are terminal. Prints jobs/min and submit -> terminal p50 / p95.

Times come from the server: ``created_at`` (the row committed by POST /v1/jobs) and
``finished_at`` (the worker's final commit), so client polling does not blur them.
Throughput = jobs / (last finished_at - first created_at).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "cancelled"}


def log(msg: str) -> None:
    print(f"[load] {msg}", file=sys.stderr, flush=True)


@dataclass
class LoadResult:
    jobs: dict[str, dict[str, Any]]  # id -> last seen job body
    submitted: list[str]  # ids in submission order, duplicates kept (there must be none)
    errors: list[str]  # unexpected HTTP answers
    wall_s: float  # first submit -> last job seen terminal, client clock

    def server_times(self) -> tuple[list[float], float]:
        """(submit -> terminal seconds per job, throughput window seconds)."""
        created = [_ts(j["created_at"]) for j in self.jobs.values()]
        finished = [_ts(j["finished_at"]) for j in self.jobs.values() if j["finished_at"]]
        lat = [(_ts(j["finished_at"]) - _ts(j["created_at"])).total_seconds()
               for j in self.jobs.values() if j["finished_at"]]
        window = (max(finished) - min(created)).total_seconds() if finished else 0.0
        return lat, window

    def summary(self) -> dict[str, float]:
        lat, window = self.server_times()
        done = [j for j in self.jobs.values() if j["status"] in TERMINAL]
        return {
            "jobs": len(self.jobs),
            "terminal": len(done),
            "succeeded": sum(j["status"] == "succeeded" for j in done),
            "jobs_per_min": 60 * len(done) / window if window else 0.0,
            "p50_s": statistics.median(lat) if lat else float("nan"),
            "p95_s": pct(lat, 95) if lat else float("nan"),
            "max_s": max(lat) if lat else float("nan"),
            "window_s": window,
            "wall_s": self.wall_s,
        }


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def drive(url: str, key: str, body: dict[str, Any], jobs: int, clients: int,
          timeout_s: float, poll_interval_s: float = 1.0) -> LoadResult:
    """``clients`` threads, each with its own keep-alive connection, submit ``jobs`` in all
    (every POST with its own Idempotency-Key), then poll their own jobs until terminal or
    ``timeout_s``. Polling is one GET per pending job per ``poll_interval_s``: the load is the
    workers', not the API's (the cores are shared with the workers)."""
    result = LoadResult({}, [], [], 0.0)
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + timeout_s
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        share = jobs // clients + (1 if i < jobs % clients else 0)
        mine: list[str] = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                          timeout=30) as c:
            barrier.wait()  # every client submits at the same moment
            for k in range(share):
                r = c.post("/v1/jobs", json=body,
                           headers={"Idempotency-Key": f"load-{i}-{k}-{secrets.token_hex(4)}"})
                if r.status_code != 202:
                    with lock:
                        result.errors.append(f"POST {r.status_code} {r.text[:200]}")
                    continue
                job = r.json()
                mine.append(job["id"])
                with lock:
                    result.submitted.append(job["id"])
                    result.jobs[job["id"]] = job
            pending = list(mine)
            while pending and time.monotonic() < deadline:
                t0 = time.monotonic()
                still = []
                for job_id in pending:
                    r = c.get(f"/v1/jobs/{job_id}")
                    if r.status_code != 200:
                        with lock:
                            result.errors.append(f"GET {r.status_code} {r.text[:200]}")
                        still.append(job_id)
                        continue
                    job = r.json()
                    with lock:
                        result.jobs[job_id] = job
                    if job["status"] not in TERMINAL:
                        still.append(job_id)
                pending = still
                if pending:
                    time.sleep(max(0.0, poll_interval_s - (time.monotonic() - t0)))

    threads = [threading.Thread(target=client, args=(i,), name=f"load-client-{i}")
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.wall_s = time.monotonic() - start
    return result


# --- the stack (shared with tests/faults/test_load.py) ------------------------------------


@dataclass
class LoadStack:
    url: str
    key: str
    body: dict[str, Any]
    database_url: str
    workers: list[Any]
    api: Any


@contextmanager
def load_stack(tmp: Path, workers: int, database_url: str, redis_url: str
               ) -> Iterator[LoadStack]:
    """API + ``workers`` Celery worker processes on ``database_url`` (migrated, empty) and
    ``redis_url``; the tiny model and its data uploaded. Stops what it started."""
    from app.db.migrate import upgrade
    from tests.faults.servers import (
        job_body,
        new_key,
        service_env,
        start_api,
        start_worker,
        stop_worker,
        tiny_mlp,
        upload,
    )

    upgrade(database_url)
    key = new_key(database_url, "load")
    # The reconciler's re-send far off: a message the broker delivers twice or never must
    # show here, not be papered over (re-sending lost messages is test_servers.py's case).
    env = service_env(database_url, redis_url, tmp, requeue_after_s="3600")
    # Hidden 256 at batch 64: there int8 runs about 2x faster than fp32 in ONNX Runtime, so
    # the jobs can succeed (at 64 wide the engine rightly refuses the slower int8 model).
    files = tiny_mlp(tmp / "mlp", hidden=256)
    api = start_api(env, tmp / "api.log")
    started: list[Any] = []
    try:
        for n in range(workers):
            started.append(start_worker(env, tmp / f"worker-{n}.log"))
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"},
                          timeout=120) as c:
            up = upload(c, files)
        yield LoadStack(api.url, key, job_body(up, batch_size=64), database_url, started, api)
    finally:
        for w in started:
            stop_worker(w)
        api.proc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=1800)
    args = ap.parse_args()

    import psycopg

    from app.db.session import get_engine
    from tests.faults.servers import redis_server

    admin = os.environ.get("MODELPRESS_BENCH_PG_ADMIN",
                           "postgresql://postgres@localhost:5432/postgres")
    name = f"mp_load_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db = admin.rsplit("/", 1)[0] + "/" + name
    try:
        with tempfile.TemporaryDirectory(prefix="mp-load-") as d, \
                redis_server(Path(d) / "redis") as redis, \
                load_stack(Path(d), args.workers, db, redis.url) as st:
            log(f"{args.workers} worker(s) ready; {args.jobs} jobs from {args.clients} clients")
            load0 = os.getloadavg()[0]
            res = drive(st.url, st.key, st.body, args.jobs, args.clients, args.timeout_s)
            s = res.summary()
            print(f"jobs {s['jobs']:.0f}, terminal {s['terminal']:.0f}, succeeded "
                  f"{s['succeeded']:.0f}, errors {len(res.errors)}")
            print(f"throughput {s['jobs_per_min']:.1f} jobs/min over {s['window_s']:.1f} s "
                  f"({args.workers} workers, {args.clients} clients)")
            print(f"submit -> terminal p50 {s['p50_s']:.1f} s, p95 {s['p95_s']:.1f} s, "
                  f"max {s['max_s']:.1f} s; wall {s['wall_s']:.1f} s")
            print(f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    finally:
        get_engine.cache_clear()
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
