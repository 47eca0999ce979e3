"""Client tests run the real ``modelpress`` CLI (a subprocess) against a real HTTP server:
uvicorn serving ``app.main:create_app`` on a free loopback port, Postgres migrated by Alembic,
Redis, and a real Celery worker process.

The database, Celery worker and model fixtures are the service suite's (tests/service/
conftest.py), imported here rather than duplicated. Redis is overridden to its own DB number so
this suite's worker never takes messages meant for the service suite's worker (both are
session-scoped and alive at once when the whole suite runs).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.config import Settings
from tests.service import conftest as service
from tests.service.conftest import new_key

# The service suite's fixtures, registered here by name (pytest collects conftest globals).
pg_url = service.pg_url
pg_env_vars = service.pg_env_vars
settings = service.settings
pg_worker = service.pg_worker
mlp_files = service.mlp_files

ROOT = Path(__file__).resolve().parents[2]
CLIENT_REDIS_DB = int(os.environ.get("MODELPRESS_TEST_CLIENT_REDIS_DB", "13"))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    yield from service.flushed_redis_db(CLIENT_REDIS_DB)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} not up after {timeout_s} s:\n{log.read_text()[-4000:]}")


def stop_proc(proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def live_server(pg_env_vars: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
                ) -> Iterator[str]:
    """The API over real HTTP (uvicorn), configured like production (Postgres + Redis)."""
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "api.log"
    env = {**os.environ, **pg_env_vars, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
           "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", proc, log)
        yield url
    finally:
        stop_proc(proc)


@dataclass
class Result:
    rc: int
    out: str
    err: str


@dataclass
class Cli:
    """Runs ``python -m app.cli ...`` as a user would, with URL and key from the env."""

    url: str
    key: str
    cwd: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
        env.update(MODELPRESS_URL=self.url, MODELPRESS_API_KEY=self.key, COLUMNS="100")
        env.update(extra)
        return env

    def __call__(self, *args: str, timeout_s: float = 300,
                 env: dict[str, str] | None = None) -> Result:
        res = subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=self.cwd,
                             env=self.env(**(env or {})), capture_output=True, text=True,
                             timeout=timeout_s)
        return Result(res.returncode, res.stdout, res.stderr)


@pytest.fixture(scope="session")
def client_key(settings: Settings, live_server: str) -> str:
    return new_key(settings, "client-tests")


@pytest.fixture
def cli(live_server: str, client_key: str, tmp_path: Path) -> Cli:
    return Cli(live_server, client_key, tmp_path)
