"""Servers the fault tests own: a Redis they may kill, a Postgres cluster they may stop, the
real API (uvicorn) and real Celery workers as subprocesses.

Never the shared servers (Postgres on 5432, Redis on 6379): every server here listens on a
free 127.0.0.1 port picked at start, and every helper stops what it started. A plain module
(not a conftest): the fault tests import what they use.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
PG_BIN = Path(os.environ.get("MODELPRESS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
TERMINAL = {"succeeded", "failed", "cancelled"}
# The cheapest real engine job: no pruning, no distillation, one int8 candidate.
FAST_RECIPE = {"prune_ratio": 0.0, "quant": "int8_static", "distill_epochs": 0}

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def poll(what: str, fn: Callable[[], T | None], timeout_s: float, interval_s: float = 0.2,
         on_timeout: Callable[[], str] | None = None) -> T:
    """``fn()`` until it returns something other than None; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = fn()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            extra = on_timeout() if on_timeout else ""
            pytest.fail(f"{what}: not after {timeout_s} s\n{extra}", pytrace=False)
        time.sleep(interval_s)


def _stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                timeout_s: float = 15) -> None:
    """Stop a process we started in its own session (start_new_session), children too."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


# --- Redis ----------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A redis-server of our own; no persistence (``--save "" --appendonly no``), so a kill
    loses every queued message, as a crashed cache node without a volume would."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)

        def up() -> bool | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited ({self.proc.returncode}):\n"
                            f"{(self.workdir / 'redis.log').read_text()[-2000:]}")
            try:
                return bool(client.ping()) or None
            except redis.RedisError:
                return None

        poll(f"redis-server on port {self.port}", up, timeout_s=20, interval_s=0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save; its data is gone."""
        if self.proc is not None:
            _stop_group(self.proc, signal.SIGKILL)
            self.proc = None

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_connect_timeout=3)


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), workdir)
    server.start()
    try:
        yield server
    finally:
        server.kill()


# --- Postgres ---------------------------------------------------------------------------------


@dataclass
class PgCluster:
    """A Postgres cluster of our own (initdb in a temporary directory owned by ``postgres``),
    listening on 127.0.0.1:port only; trust auth for local connections."""

    datadir: Path
    sockdir: Path
    port: int
    log: Path

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str, timeout_s: float = 60) -> None:
        cmd = [str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), *args]
        r = subprocess.run(_as_postgres(cmd), capture_output=True, timeout=timeout_s)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): "
                               f"{r.stdout.decode()}{r.stderr.decode()}\n"
                               f"{self.log.read_text(errors='replace')[-2000:]}")

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c full_page_writes=off -c max_connections=100")
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.log), "-o", opts)

    def stop_immediate(self) -> None:
        """``-m immediate``: the server quits at once, as on a crash (recovery on restart)."""
        self._pg_ctl("stop", "-m", "immediate", "-w")

    def is_running(self) -> bool:
        return (self.datadir / "postmaster.pid").exists()

    def create_database(self, prefix: str = "mp_fault") -> str:
        import psycopg

        name = f"{prefix}_{secrets.token_hex(4)}"
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.admin_url.rsplit("/", 1)[0] + "/" + name


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and pg_ctl refuse to run as root: run them as ``postgres`` when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def pg_cluster() -> Iterator[PgCluster]:
    """initdb (a few seconds) + start; always stopped and removed at the end.

    In a directory of its own under the system temp dir, not pytest's tmp_path: that one is
    private to root (0700), and the server runs as ``postgres``.
    """
    base = Path(tempfile.mkdtemp(prefix="modelpress-faults-pg-"))
    datadir, sockdir = base / "data", base / "sock"
    sockdir.mkdir(exist_ok=True)
    log = base / "postgres.log"
    log.touch()
    if os.geteuid() == 0:
        for p in (base, sockdir, log):
            shutil.chown(p, "postgres", "postgres")
    r = subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(datadir), "-U",
                                     "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"]),
                       capture_output=True, timeout=120)
    if r.returncode != 0:
        pytest.fail(f"initdb failed: {r.stdout.decode()}{r.stderr.decode()}", pytrace=False)
    cluster = PgCluster(datadir, sockdir, free_port(), log)
    try:
        cluster.start()
        yield cluster
    finally:
        if cluster.is_running():
            with contextlib.suppress(Exception):
                cluster.stop_immediate()
        shutil.rmtree(base, ignore_errors=True)


# --- the service: env, API, workers ---------------------------------------------------------


def service_env(database_url: str, broker_url: str, tmp: Path, **overrides: str
                ) -> dict[str, str]:
    """Settings of the processes under test (MODELPRESS_*), short where a test waits on them."""
    env = {
        "MODELPRESS_DATABASE_URL": database_url,
        "MODELPRESS_BROKER_URL": broker_url,
        "MODELPRESS_STORAGE_BACKEND": "postgres",
        "MODELPRESS_TMP_DIR": str(tmp / "tmp"),
        "MODELPRESS_DEV_KEY_BOOTSTRAP": "false",
        "MODELPRESS_JOB_LEASE_S": "30",
        "MODELPRESS_HEARTBEAT_INTERVAL_S": "2",
        "MODELPRESS_PROGRESS_WRITE_INTERVAL_S": "0.2",
        "MODELPRESS_AUTH_CACHE_S": "0",
        # One tenant submits every job here: per-tenant rate limits and quotas are off (they
        # are tested in tests/service/test_limits.py).
        "MODELPRESS_RATE_LIMIT_PER_MIN": "0",
        "MODELPRESS_MAX_CONCURRENT_JOBS": "0",
        "MODELPRESS_MAX_STORED_BYTES": "0",
    }
    env.update({f"MODELPRESS_{k.upper()}": v for k, v in overrides.items()})
    return env


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        _stop_group(self.proc, sig)


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return Proc(proc, log)


@dataclass
class Api:
    proc: Proc
    url: str
    workers: int = 1

    def output(self) -> str:
        return self.proc.output()


def start_api(env: dict[str, str], log: Path, workers: int = 1, timeout_s: float = 90) -> Api:
    """uvicorn serving ``app.main:create_app`` on a free 127.0.0.1 port; waits for /healthz."""
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host",
           "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    api = Api(_spawn(cmd, env, log), f"http://127.0.0.1:{port}", workers)

    def up() -> bool | None:
        if api.proc.proc.poll() is not None:
            pytest.fail(f"API exited ({api.proc.proc.returncode}):\n{api.output()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(api.url + "/healthz", timeout=2).status_code == 200:
                return True
        return None

    try:
        poll("API /healthz", up, timeout_s)
    except BaseException:
        api.proc.stop()
        raise
    return api


def start_worker(env: dict[str, str], log: Path, concurrency: int = 1,
                 timeout_s: float = 120) -> Proc:
    """A real Celery worker (prefork) on queues cpu and gpu; waits for its ' ready.' line."""
    cmd = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q",
           "cpu,gpu", "-c", str(concurrency), "--pool", "prefork", "-l", "INFO", "-n",
           f"fault-{secrets.token_hex(3)}@%h", "--without-gossip", "--without-mingle",
           "--without-heartbeat"]
    worker = _spawn(cmd, env, log)

    def ready() -> bool | None:
        if worker.proc.poll() is not None:
            pytest.fail(f"worker exited ({worker.proc.returncode}):\n{worker.output()[-3000:]}")
        return True if " ready." in worker.output() else None

    try:
        poll("celery worker ready", ready, timeout_s)
    except BaseException:
        stop_worker(worker)
        raise
    return worker


def stop_worker(worker: Proc) -> None:
    # Cold shutdown (SIGQUIT) of the whole group, pool children included; KILL if it lingers.
    _stop_group(worker.proc, signal.SIGQUIT, timeout_s=10)


# --- a tiny real model and its data ------------------------------------------------------------


def tiny_mlp(out: Path, hidden: int = 64, samples: int = 256) -> dict[str, Path]:
    """examples.zoo.MLP trained one epoch on digits, saved with torch.export.save (dynamic
    batch), and ``samples`` digits with labels as data.npz under the model's input name."""
    import numpy as np
    import torch

    from examples.zoo import MLP, digits, train

    x, y = digits()
    model = train(MLP(hidden=hidden), x, y, epochs=1)
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(model, (x[:8],), dynamic_shapes=({0: batch},))
    out.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, out / "mlp.pt2")
    name = ep.graph_signature.user_inputs[0]
    np.savez(out / "data.npz", **{name: x[:samples].numpy(), "labels": y[:samples].numpy()})
    return {"pt2": out / "mlp.pt2", "data": out / "data.npz"}


@dataclass
class Uploaded:
    model_id: str
    dataset_id: str


def upload(client: httpx.Client | Any, files: dict[str, Path]) -> Uploaded:
    r = client.post("/v1/models", params={"filename": "mlp.pt2"},
                    content=files["pt2"].read_bytes(),
                    headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    model = r.json()
    r = client.post("/v1/datasets", params={"model_id": model["id"], "filename": "data.npz"},
                    content=files["data"].read_bytes(),
                    headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return Uploaded(model["id"], r.json()["id"])


def job_body(up: Uploaded, recipe: dict[str, Any] | None = None,
             **constraints: Any) -> dict[str, Any]:
    return {"model_id": up.model_id, "dataset_id": up.dataset_id, "device": "cpu",
            "recipe": recipe or FAST_RECIPE,
            "constraints": {"batch_size": 8, "threads": 1, "time_budget_s": 300,
                            **constraints}}


def new_key(database_url: str, tenant: str) -> str:
    from app.config import Settings
    from app.db.session import session_scope
    from app.services.admin import create_key

    with session_scope(Settings(database_url=database_url)) as s:
        return create_key(s, tenant)


@dataclass
class Rows:
    """Direct reads of the job table (the test's view of the truth, not the API's)."""

    database_url: str
    _engine: Any = field(default=None, repr=False)

    def engine(self) -> Any:
        if self._engine is None:
            from sqlalchemy.pool import NullPool

            from app.db.session import make_engine

            self._engine = make_engine(self.database_url, poolclass=NullPool)
        return self._engine

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        from sqlalchemy import text

        with self.engine().connect() as conn:
            return [dict(r) for r in conn.execute(text(sql), params).mappings()]

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
