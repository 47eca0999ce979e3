"""Service benchmark (issue 3 acceptance), against a real server this script starts itself.

    python -m bench.service [--duration-s 10] [--clients 32] [--upload-mib 1024] [--submits 10]

Starts, on 127.0.0.1 only: a fresh Postgres database (migrated by Alembic, dropped at the
end), a Redis DB, uvicorn serving ``app.main:create_app`` (``--api-workers`` processes,
default 2 as in the Dockerfile), and later one Celery worker. Then measures, in one run:

1. ``GET /v1/jobs/{id}`` at 32 concurrent keep-alive clients (asyncio, raw HTTP/1.1 so the
   load generator costs little of the 2 cores): p50 / p99 latency and requests per second.
   Targets: p99 <= 50 ms, >= 500 req/s.
2. A 1 GiB streamed upload: throughput (MB = 1e6 bytes) and the API process's peak RSS growth
   (``/proc/<pid>/status`` VmRSS sampled every 10 ms, and VmHWM after resetting it through
   ``/proc/<pid>/clear_refs``). Two uploads: a real 1 GiB ``.pt2`` (a 16384x16384 Linear),
   validated in the sandbox and stored in Postgres; and a 1 GiB body the server receives in
   full and then refuses (the streaming path alone). Targets: >= 200 MB/s, <= 64 MiB growth.
3. Submit-to-running latency with a worker idle: POST /v1/jobs, then GET every 10 ms until the
   job is ``running``; p50 over ``--submits`` jobs (each cancelled once running). Target <= 1 s.

Every loop is bounded in count and time; all traffic is loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("MODELPRESS_BENCH_PG_ADMIN",
                          "postgresql://postgres@localhost:5432/postgres")
REDIS_URL = os.environ.get("MODELPRESS_BENCH_REDIS", "redis://localhost:6379/13")
MIB = 1024 * 1024
FAST_RECIPE = {"prune_ratio": 0.0, "quant": "int8_static", "distill_epochs": 0}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


# --- the stack ---------------------------------------------------------------------------


@dataclass
class Stack:
    tmp: Path
    db_url: str
    env: dict[str, str]
    port: int
    api: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    key: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _pg(url: str) -> Any:
    import psycopg

    return psycopg.connect(url, connect_timeout=5, autocommit=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@contextlib.contextmanager
def stack(api_workers: int) -> Iterator[Stack]:
    import redis

    from app.config import Settings
    from app.db.migrate import upgrade
    from app.db.session import get_engine, session_scope
    from app.services.admin import create_key

    name = f"mp_bench_{os.getpid()}_{secrets.token_hex(3)}"
    with _pg(PG_ADMIN) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    r = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    r.flushdb()
    tmp = Path(tempfile.mkdtemp(prefix="mp-bench-"))
    env = {
        "MODELPRESS_DATABASE_URL": db_url,
        "MODELPRESS_BROKER_URL": REDIS_URL,
        "MODELPRESS_STORAGE_BACKEND": "postgres",
        "MODELPRESS_TMP_DIR": str(tmp / "tmp"),
        "MODELPRESS_DEV_KEY_BOOTSTRAP": "false",
        "MODELPRESS_MAX_MODEL_BYTES": str(2 * 1024 * MIB),
        "MODELPRESS_HEARTBEAT_INTERVAL_S": "2",
        "MODELPRESS_PROGRESS_WRITE_INTERVAL_S": "0.2",
        # One tenant drives the whole load: its per-tenant limits would be what is measured.
        "MODELPRESS_RATE_LIMIT_PER_MIN": "0",
        "MODELPRESS_MAX_CONCURRENT_JOBS": "0",
        "MODELPRESS_MAX_STORED_BYTES": "0",
    }
    st = Stack(tmp, db_url, env, free_port())
    try:
        log(f"database {name}: migrating")
        upgrade(db_url)
        with session_scope(Settings(database_url=db_url, broker_url=REDIS_URL)) as s:
            st.key = create_key(s, "bench")
        start_api(st, api_workers)
        yield st
    finally:
        for p in st.procs:
            _stop(p)
        get_engine.cache_clear()
        with _pg(PG_ADMIN) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        r.flushdb()
        for f in sorted(tmp.rglob("*"), reverse=True):
            with contextlib.suppress(OSError):
                f.unlink() if not f.is_dir() else f.rmdir()
        with contextlib.suppress(OSError):
            tmp.rmdir()


def _spawn(st: Stack, cmd: list[str], logname: str) -> subprocess.Popen[bytes]:
    f = (st.tmp / logname).open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **st.env, "PYTHONUNBUFFERED": "1"},
                            stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    st.procs.append(proc)
    return proc


def start_api(st: Stack, workers: int) -> None:
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
           "--host", "127.0.0.1", "--port", str(st.port), "--no-access-log",
           "--log-level", "warning"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    st.api = _spawn(st, cmd, "api.log")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if st.api.poll() is not None:
            raise SystemExit("API exited:\n" + (st.tmp / "api.log").read_text()[-3000:])
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(st.url + "/healthz", timeout=2).status_code == 200:
                log(f"API up on {st.url} (pid {st.api.pid}, {workers} process(es))")
                return
        time.sleep(0.2)
    raise SystemExit("API not up after 90 s")


def start_worker(st: Stack) -> None:
    cmd = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q",
           "cpu,gpu", "-c", "1", "--pool", "prefork", "-l", "INFO", "-n",
           f"bench-{secrets.token_hex(3)}@%h", "--without-gossip", "--without-mingle",
           "--without-heartbeat"]
    st.worker = _spawn(st, cmd, "worker.log")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if st.worker.poll() is not None:
            raise SystemExit("worker exited:\n" + (st.tmp / "worker.log").read_text()[-3000:])
        if " ready." in (st.tmp / "worker.log").read_text(errors="replace"):
            log("worker ready")
            return
        time.sleep(0.2)
    raise SystemExit("worker not ready after 120 s")


def api_pids(st: Stack) -> list[int]:
    """The uvicorn process, or its worker processes when it runs several."""
    assert st.api is not None
    kids = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
            if _ppid(p) == st.api.pid]
    return kids or [st.api.pid]


def _ppid(stat: Path) -> int:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


# --- fixtures: a model, data, a job -------------------------------------------------------


def tiny_model(path: Path) -> None:
    import torch

    from examples.zoo import MLP

    torch.manual_seed(0)
    model = MLP(hidden=256).eval()
    x = torch.randn(8, 64)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), path)


def big_model(path: Path, mib: int) -> int:
    """A .pt2 whose weights are ``mib`` MiB: one square Linear (fp32, no bias)."""
    import math

    import torch

    side = math.isqrt(mib * MIB // 4)
    with torch.no_grad():
        layer = torch.nn.Linear(side, side, bias=False).eval()
        torch.nn.init.normal_(layer.weight, std=0.01)
        ep = torch.export.export(layer, (torch.randn(1, side),))
        torch.export.save(ep, path)
    del ep, layer
    return path.stat().st_size


def setup_job(st: Stack, c: httpx.Client) -> tuple[str, str, str]:
    import numpy as np

    model_path = st.tmp / "mlp.pt2"
    tiny_model(model_path)
    r = c.post("/v1/models", params={"filename": "mlp.pt2"}, content=model_path.read_bytes())
    r.raise_for_status()
    model = r.json()
    name = model["inputs"][0]["name"]
    rng = np.random.default_rng(0)
    data = st.tmp / "data.npz"
    arrays: dict[str, Any] = {name: rng.standard_normal((256, 64)).astype(np.float32),
                              "labels": rng.integers(0, 10, 256)}
    np.savez(data, **arrays)
    r = c.post("/v1/datasets", params={"model_id": model["id"], "filename": "data.npz"},
               content=data.read_bytes())
    r.raise_for_status()
    ds = r.json()["id"]
    r = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": ds, "device": "cpu",
                                 "recipe": FAST_RECIPE, "constraints": {"batch_size": 64}})
    r.raise_for_status()
    return model["id"], ds, r.json()["id"]


# --- 1. GET latency under concurrency -----------------------------------------------------


@dataclass
class LoadResult:
    latencies_s: list[float]
    elapsed_s: float
    errors: int

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / self.elapsed_s


async def _get_loop(port: int, request: bytes, stop_at: float, max_requests: int,
                    out: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        n = 0
        while n < max_requests and time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            out.append(time.perf_counter() - t0)
            if head[9:12] != b"200":
                errors.append(int(head[9:12]))
            n += 1
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _load(port: int, path: str, key: str, clients: int, duration_s: float,
                max_requests: int) -> LoadResult:
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Authorization: Bearer {key}\r\nAccept: application/json\r\n\r\n").encode()
    out: list[float] = []
    errors: list[int] = []
    t0 = time.perf_counter()
    stop_at = t0 + duration_s
    per_client = max_requests // clients
    await asyncio.gather(*(_get_loop(port, request, stop_at, per_client, out, errors)
                           for _ in range(clients)))
    return LoadResult(out, time.perf_counter() - t0, len(errors))


def get_load(st: Stack, job_id: str, clients: int, duration_s: float) -> LoadResult:
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    path = f"/v1/jobs/{job_id}"
    runner(_load(st.port, path, st.key, clients, 2.0, 100_000))  # warm-up: pools, caches
    result: LoadResult = runner(_load(st.port, path, st.key, clients, duration_s, 200_000))
    return result


# --- 2. uploads: throughput and RSS -------------------------------------------------------


class RssSampler:
    """Peak VmRSS of some pids, sampled every 10 ms; VmHWM reset at the start."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.base = {p: self._kib(p, "VmRSS") for p in pids}
        for p in pids:  # "5" resets the peak RSS (VmHWM) of the process
            with contextlib.suppress(OSError):
                Path(f"/proc/{p}/clear_refs").write_text("5")
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _kib(pid: int, field_name: str) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for p in self.pids:
                with contextlib.suppress(OSError):
                    self.peak[p] = max(self.peak[p], self._kib(p, "VmRSS"))

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        for p in self.pids:
            with contextlib.suppress(OSError):
                self.peak[p] = max(self.peak[p], self._kib(p, "VmHWM"))

    def growth_mib(self) -> float:
        return max((self.peak[p] - self.base[p]) / 1024 for p in self.pids)


@dataclass
class UploadResult:
    size: int
    sent_s: float  # until the last byte was handed to the kernel
    total_s: float  # until the response arrived
    status: int
    body: bytes
    rss_growth_mib: float


def _post_stream(port: int, path: str, key: str, size: int, source: Path | None) -> tuple[
        float, float, int, bytes]:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n"
            "Connection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=600) as s:
        t0 = time.perf_counter()
        s.sendall(head)
        if source is not None:
            with source.open("rb") as f:
                s.sendfile(f)
        else:
            block = bytes(MIB)
            left = size
            while left:
                n = min(left, MIB)
                s.sendall(block[:n])
                left -= n
        sent = time.perf_counter() - t0
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        total = time.perf_counter() - t0
    raw = b"".join(chunks)
    status = int(raw[9:12]) if len(raw) >= 12 else 0
    return sent, total, status, raw.split(b"\r\n\r\n", 1)[-1]


def upload(st: Stack, path: str, size: int, source: Path | None) -> UploadResult:
    with RssSampler(api_pids(st)) as rss:
        sent, total, status, body = _post_stream(st.port, path, st.key, size, source)
    return UploadResult(size, sent, total, status, body, rss.growth_mib())


# --- 3. submit -> running ---------------------------------------------------------------


def submit_to_running(st: Stack, c: httpx.Client, model_id: str, ds: str, n: int,
                      ) -> tuple[list[float], list[float]]:
    from datetime import datetime

    seen: list[float] = []
    server: list[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        r = c.post("/v1/jobs", json={"model_id": model_id, "dataset_id": ds, "device": "cpu",
                                     "recipe": FAST_RECIPE, "constraints": {"batch_size": 64}})
        r.raise_for_status()
        job_id = r.json()["id"]
        deadline = time.monotonic() + 60
        job = r.json()
        while job["status"] == "queued" and time.monotonic() < deadline:
            time.sleep(0.01)
            job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "queued":
            raise SystemExit(f"job {job_id} not picked up in 60 s")
        seen.append(time.perf_counter() - t0)
        if job.get("started_at"):
            server.append((datetime.fromisoformat(job["started_at"])
                           - datetime.fromisoformat(job["created_at"])).total_seconds())
        c.post(f"/v1/jobs/{job_id}:cancel")
        deadline = time.monotonic() + 120
        while job["status"] not in ("succeeded", "failed", "cancelled") and (
                time.monotonic() < deadline):
            time.sleep(0.1)
            job = c.get(f"/v1/jobs/{job_id}").json()
        log(f"submit {i + 1}/{n}: running after {seen[-1] * 1000:.0f} ms, ended "
            f"{job['status']}")
        time.sleep(0.3)  # let the worker go idle again (ack, prefetch)
    return seen, server


# --- main ---------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration-s", type=float, default=10.0, help="GET load duration")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--upload-mib", type=int, default=1024)
    ap.add_argument("--submits", type=int, default=10)
    # Two uvicorn processes on two cores: the Dockerfile's default (API_WORKERS=2).
    ap.add_argument("--api-workers", type=int, default=2, help="uvicorn processes")
    ap.add_argument("--skip-model-upload", action="store_true",
                    help="skip the real 1 GiB .pt2 (saves building it)")
    args = ap.parse_args(argv)

    load1 = os.getloadavg()[0]
    lines: list[str] = []
    with stack(args.api_workers) as st, httpx.Client(
            base_url=st.url, headers={"Authorization": f"Bearer {st.key}"},
            timeout=120) as c:
        model_id, ds, job_id = setup_job(st, c)

        log(f"GET /v1/jobs/{{id}}: {args.clients} clients, {args.duration_s:.0f} s")
        res = get_load(st, job_id, args.clients, args.duration_s)
        lat_ms = [x * 1000 for x in res.latencies_s]
        p50, p90, p99 = pct(lat_ms, 50), pct(lat_ms, 90), pct(lat_ms, 99)
        lines.append(f"GET /v1/jobs/{{id}}  {args.clients} clients, {res.elapsed_s:.1f} s, "
                     f"{len(lat_ms)} requests, {res.errors} errors: "
                     f"p50 {p50:.1f} ms, p90 {p90:.1f} ms, p99 {p99:.1f} ms, "
                     f"max {max(lat_ms):.1f} ms, {res.rps:.0f} req/s   "
                     f"[target p99 <= 50 ms {verdict(p99 <= 50)}, >= 500 req/s "
                     f"{verdict(res.rps >= 500)}]")
        log(lines[-1])

        size = args.upload_mib * MIB
        log(f"upload {args.upload_mib} MiB body refused after receipt (junk .pt2)")
        junk = upload(st, "/v1/models?filename=junk.pt2", size, None)
        mbps = junk.size / junk.sent_s / 1e6
        lines.append(
            f"upload {args.upload_mib} MiB, streaming path (received, hashed, written to "
            f"disk, then refused {junk.status}): {mbps:.0f} MB/s received, "
            f"{junk.size / junk.total_s / 1e6:.0f} MB/s to the answer; API peak RSS growth "
            f"{junk.rss_growth_mib:.1f} MiB   [target >= 200 MB/s {verdict(mbps >= 200)}, "
            f"<= 64 MiB {verdict(junk.rss_growth_mib <= 64)}]")
        log(lines[-1])

        if not args.skip_model_upload:
            big = st.tmp / "big.pt2"
            log(f"building a {args.upload_mib} MiB .pt2")
            real_size = big_model(big, args.upload_mib)
            up = upload(st, "/v1/models?filename=big.pt2", real_size, big)
            big.unlink()
            mbps_all = up.size / up.total_s / 1e6
            lines.append(
                f"upload {real_size / MIB:.0f} MiB valid .pt2 (sandbox-validated, stored in "
                f"Postgres), answer {up.status}: {up.size / up.sent_s / 1e6:.0f} MB/s "
                f"received, {mbps_all:.0f} MB/s end to end ({up.total_s:.1f} s); API peak "
                f"RSS growth {up.rss_growth_mib:.1f} MiB   [<= 64 MiB "
                f"{verdict(up.rss_growth_mib <= 64)}]")
            if up.status != 201:
                lines.append(f"  answer: {up.body[:300]!r}")
            log(lines[-1])

        # The job of phase 1 must not run: cancel it (queued -> cancelled) first.
        c.post(f"/v1/jobs/{job_id}:cancel")
        start_worker(st)
        seen, server = submit_to_running(st, c, model_id, ds, args.submits)
        seen_ms = [x * 1000 for x in seen]
        med = statistics.median(seen_ms)
        srv = f", server-side created->started p50 {statistics.median(server) * 1000:.0f} ms" \
            if server else ""
        lines.append(f"submit -> running  {len(seen)} jobs, worker idle: p50 {med:.0f} ms, "
                     f"max {max(seen_ms):.0f} ms{srv}   [target p50 <= 1 s "
                     f"{verdict(med <= 1000)}]")
        log(lines[-1])

    print(f"\nModelPress service benchmark: {os.cpu_count()} cores, load average "
          f"{load1:.1f} at start / {os.getloadavg()[0]:.1f} at the end (other work on the "
          f"machine shares the cores), uvicorn {args.api_workers} process(es), Postgres + "
          "Redis on loopback")
    for line in lines:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
