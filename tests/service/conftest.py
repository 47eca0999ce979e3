"""Service test fixtures: a fresh Postgres database migrated by Alembic, a dedicated Redis
DB, the FastAPI app in-process, and real Celery worker processes.

Postgres or Redis unreachable is a FAILURE, never a skip: CI must not pass green without them.
Environment (optional): MODELPRESS_TEST_PG_ADMIN (admin URL of the server),
MODELPRESS_TEST_REDIS (redis://host:port), MODELPRESS_TEST_REDIS_DB (default 11).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.config import Settings
from app.db.base import metadata
from app.db.migrate import upgrade
from app.db.session import get_engine, session_factory
from app.main import create_app
from app.services.admin import create_key

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN = os.environ.get("MODELPRESS_TEST_PG_ADMIN", "postgresql://postgres@localhost:5432/postgres")
REDIS_BASE = os.environ.get("MODELPRESS_TEST_REDIS", "redis://localhost:6379")
REDIS_DB = int(os.environ.get("MODELPRESS_TEST_REDIS_DB", "11"))
HIDDEN = 256  # width of the test MLP
LIMITS_OFF = {"MODELPRESS_RATE_LIMIT_PER_MIN": "0", "MODELPRESS_MAX_CONCURRENT_JOBS": "0",
              "MODELPRESS_MAX_STORED_BYTES": "0"}


def _pg_connect(url: str) -> psycopg.Connection:
    try:
        return psycopg.connect(url, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as e:
        pytest.fail(f"Postgres unreachable at {url}: {e}", pytrace=False)


def create_database(prefix: str = "mp_test") -> str:
    """A new empty database on the test server; returns its SQLAlchemy URL."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    with _pg_connect(PG_ADMIN) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str) -> None:
    get_engine.cache_clear()  # drop pooled connections of this process first
    name = url.rsplit("/", 1)[1]
    with _pg_connect(PG_ADMIN) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = create_database()
    upgrade(url)
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    yield from flushed_redis_db(REDIS_DB)


def flushed_redis_db(db: int) -> Iterator[str]:
    """URL of Redis DB ``db``, flushed before and after; FAILS (never skips) if unreachable."""
    url = f"{REDIS_BASE}/{db}"
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(f"Redis unreachable at {url}: {e}", pytrace=False)
    client.flushdb()
    yield url
    client.flushdb()


def pg_env(pg_url: str, redis_url: str, tmp: Path) -> dict[str, str]:
    return {
        "MODELPRESS_DATABASE_URL": pg_url,
        "MODELPRESS_BROKER_URL": redis_url,
        "MODELPRESS_STORAGE_BACKEND": "postgres",
        # Other tests in this database plant expired leases on purpose: only the explicit
        # maintenance task may reap here.
        "MODELPRESS_REAPER_IN_WORKER": "false",
        "MODELPRESS_TMP_DIR": str(tmp / "tmp"),
        "MODELPRESS_DEV_KEY_BOOTSTRAP": "false",
        "MODELPRESS_JOB_LEASE_S": "30",
        "MODELPRESS_HEARTBEAT_INTERVAL_S": "2",
        "MODELPRESS_PROGRESS_WRITE_INTERVAL_S": "0.2",
        # Keys are created, revoked and expired within one test: no auth cache.
        "MODELPRESS_AUTH_CACHE_S": "0",
        # Per-tenant limits off: load and end-to-end tests run many jobs in one tenant. The
        # tests of the limits (test_limits.py) turn them on.
        **LIMITS_OFF,
    }


def embedded_env(tmp: Path) -> dict[str, str]:
    return {
        "MODELPRESS_DATABASE_URL": f"sqlite:///{tmp}/modelpress.db",
        "MODELPRESS_BROKER_URL": f"sqla+sqlite:///{tmp}/broker.db",
        "MODELPRESS_STORAGE_DIR": str(tmp / "artifacts"),
        "MODELPRESS_REAPER_INTERVAL_S": "1",
        "MODELPRESS_TMP_DIR": str(tmp / "tmp"),
        "MODELPRESS_DEV_KEY_BOOTSTRAP": "false",
        "MODELPRESS_JOB_LEASE_S": "30",
        "MODELPRESS_HEARTBEAT_INTERVAL_S": "2",
        "MODELPRESS_PROGRESS_WRITE_INTERVAL_S": "0.2",
        # Keys are created, revoked and expired within one test: no auth cache.
        "MODELPRESS_AUTH_CACHE_S": "0",
        # Per-tenant limits off: load and end-to-end tests run many jobs in one tenant. The
        # tests of the limits (test_limits.py) turn them on.
        **LIMITS_OFF,
    }


def settings_from_env(env: dict[str, str], **overrides: object) -> Settings:
    values: dict[str, object] = {k.removeprefix("MODELPRESS_").lower(): v
                                 for k, v in env.items()}
    values.update(overrides)
    return Settings.model_validate(values)


@pytest.fixture(scope="session")
def pg_env_vars(pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory,
                ) -> dict[str, str]:
    return pg_env(pg_url, redis_url, tmp_path_factory.mktemp("pg"))


@pytest.fixture(scope="session")
def settings(pg_env_vars: dict[str, str]) -> Settings:
    return settings_from_env(pg_env_vars)


@pytest.fixture(scope="session")
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


def truncate_all(url: str) -> None:
    tables = ", ".join(t.name for t in metadata.sorted_tables)
    with get_engine(url).begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture
def clean_db(pg_url: str) -> Iterator[None]:
    """Per-test isolation: every table truncated after the test."""
    yield
    truncate_all(pg_url)


@pytest.fixture
def client(app: FastAPI, clean_db: None) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def new_key(settings: Settings, tenant: str) -> str:
    with session_factory(settings)() as s:
        key = create_key(s, tenant)
        s.commit()
    return key


@pytest.fixture
def key(settings: Settings, clean_db: None) -> str:
    return new_key(settings, "tenant-a")


@pytest.fixture
def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- Celery worker processes ------------------------------------------------------------------


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_worker(env: dict[str, str], log: Path, timeout_s: float = 90) -> Worker:
    celery = Path(sys.executable).parent / "celery"
    cmd = [str(celery), "-A", "workers.celery_app", "worker", "-Q", "cpu,gpu", "-c", "1",
           "--pool", "prefork", "-l", "INFO", "-n", f"test-{secrets.token_hex(3)}@%h",
           "--without-gossip", "--without-mingle", "--without-heartbeat"]
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    f = log.open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True)
    worker = Worker(proc, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"celery worker exited ({proc.returncode}):\n{worker.output()[-4000:]}")
        if " ready." in worker.output():
            return worker
        time.sleep(0.2)
    stop_worker(worker)
    pytest.fail(f"celery worker not ready after {timeout_s} s:\n{worker.output()[-4000:]}")


def stop_worker(worker: Worker) -> None:
    if worker.proc.poll() is None:
        # Our own process group (start_new_session): QUIT then KILL the pool children too.
        os.killpg(worker.proc.pid, signal.SIGQUIT)  # cold shutdown: tests leave no work
        try:
            worker.proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            os.killpg(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait(timeout=5)


@pytest.fixture(scope="session")
def pg_worker(pg_env_vars: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
              ) -> Iterator[Worker]:
    w = start_worker(pg_env_vars, tmp_path_factory.mktemp("worker") / "worker.log")
    yield w
    stop_worker(w)


# --- a real tiny model and its data ---------------------------------------------------------


@pytest.fixture(scope="session")
def mlp_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """examples.zoo.MLP (hidden 256) trained 2 epochs on digits, saved with torch.export.save
    (dynamic batch), plus the digits arrays as .npy for building data files under any key.

    Hidden 256 rather than the default 64: at 64 the int8 model is slower than fp32 in ONNX
    Runtime (quantize/dequantize overhead dominates a 0.01 ms model) and the engine rightly
    refuses to ship it; at 256 and batch 64 int8 measured about 2x faster here.
    """
    import numpy as np
    import torch

    from examples.zoo import MLP, digits, train

    x, y = digits()
    model = train(MLP(hidden=HIDDEN), x, y, epochs=2)
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(model, (x[:8],), dynamic_shapes=({0: batch},))
    out = tmp_path_factory.mktemp("mlp")
    torch.export.save(ep, out / "mlp.pt2")
    np.save(out / "x.npy", x.numpy())
    np.save(out / "y.npy", y.numpy())
    with torch.no_grad():
        np.save(out / "logits.npy", model(x).numpy())
    return {"pt2": out / "mlp.pt2", "x": out / "x.npy", "y": out / "y.npy",
            "logits": out / "logits.npy"}


def npz_bytes(**arrays: object) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


# --- API with a broker no worker listens to (jobs stay queued; messages can be inspected) -----


@dataclass
class QuietBroker:
    url: str
    client: redis.Redis

    def messages(self, queue: str = "cpu") -> list[dict[str, object]]:
        """Decoded Celery messages waiting in ``queue`` (kombu's Redis list)."""
        import base64
        import json

        out = []
        for raw in self.client.lrange(queue, 0, -1):
            msg = json.loads(raw)
            body = json.loads(base64.b64decode(msg["body"]))
            out.append({"task": msg["headers"]["task"], "args": body[0]})
        return out


@pytest.fixture
def quiet_broker(redis_url: str) -> Iterator[QuietBroker]:
    url = f"{REDIS_BASE}/{REDIS_DB + 1}"
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    client.flushdb()
    yield QuietBroker(url, client)
    client.flushdb()


@pytest.fixture
def api(settings: Settings, quiet_broker: QuietBroker, clean_db: None) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={"broker_url": quiet_broker.url}))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def seed_model_and_data(settings: Settings, key: str) -> tuple[str, str]:
    """Rows only (no bytes): for API tests that never reach a worker."""
    from sqlalchemy import select as _select

    from app.db.models import ApiKey, Dataset, Model
    from app.services.auth import hash_key

    spec = [{"name": "x", "shape": [None, 1, 8, 8], "dtype": "float32"}]
    with session_factory(settings)() as s:
        tenant_id = s.scalar(_select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(key)))
        assert tenant_id is not None
        m = Model(tenant_id=tenant_id, filename="m.pt2", format="pt2", inputs=spec,
                  outputs=[], parameters=1, sha256="0" * 64, size_bytes=1,
                  storage_key="models/none/model.pt2")
        s.add(m)
        s.flush()
        d = Dataset(tenant_id=tenant_id, model_id=m.id, filename="d.npz", format="npz",
                    samples=10, inputs=spec, has_labels=True, num_classes=10, sha256="0" * 64,
                    size_bytes=1, storage_key="datasets/none/data.npz")
        s.add(d)
        s.commit()
        return m.id, d.id


# --- S3: a local moto_server unless a real endpoint is configured ---------------------------


@dataclass
class S3Target:
    endpoint: str
    bucket: str
    access_key_id: str | None
    secret_access_key: str | None
    region: str


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def s3_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Target]:
    """MODELPRESS_TEST_S3_ENDPOINT + _S3_BUCKET (+ _S3_KEY, _S3_SECRET, _S3_REGION) when set;
    otherwise moto's S3 server (moto[server], a dev dependency) on a free 127.0.0.1 port, with
    a fresh bucket. moto missing or not starting is a FAILURE, never a skip."""
    region = os.environ.get("MODELPRESS_TEST_S3_REGION", "us-east-1")
    endpoint = os.environ.get("MODELPRESS_TEST_S3_ENDPOINT")
    if endpoint:
        yield S3Target(endpoint, os.environ["MODELPRESS_TEST_S3_BUCKET"],
                       os.environ.get("MODELPRESS_TEST_S3_KEY"),
                       os.environ.get("MODELPRESS_TEST_S3_SECRET"), region)
        return
    import boto3

    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    endpoint = f"http://127.0.0.1:{port}"
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        # Fake credentials: moto accepts any; never let boto3 look for real ones.
        client = boto3.client("s3", endpoint_url=endpoint, region_name=region,
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        bucket = f"modelpress-test-{secrets.token_hex(4)}"
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited ({proc.returncode}):\n"
                            f"{log.read_text(errors='replace')[-3000:]}", pytrace=False)
            try:
                client.create_bucket(Bucket=bucket)
                break
            except Exception as e:  # connection refused until the server listens
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server not up after 30 s: {e}", pytrace=False)
                time.sleep(0.1)
        yield S3Target(endpoint, bucket, "testing", "testing", region)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
