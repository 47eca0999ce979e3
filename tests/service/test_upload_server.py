"""Uploads against a real uvicorn process on a free loopback port, driven by a raw socket
client (the in-process TestClient hands the app the whole body at once: it cannot trickle,
stop half-way or hold a body back).

- a client that pauses longer than MODELPRESS_UPLOAD_IDLE_TIMEOUT_S gets 408 and nothing is
  stored, no temp file left;
- a client that goes away before its Content-Length is complete leaves nothing behind;
- a Content-Length past the tenant's remaining quota is refused before any body byte is sent;
- the server's memory stays bounded while it receives 256 MiB (peak RSS, VmHWM, of the
  server process itself, read from /proc).
"""

from __future__ import annotations

import json
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
from sqlalchemy import func, select

from app.config import Settings
from app.db.models import BlobChunk, Model
from app.db.repositories import tenants as tenant_repo
from app.db.session import session_factory

pytestmark = pytest.mark.service

ROOT = Path(__file__).resolve().parents[2]
IDLE_TIMEOUT_S = 2.0  # the trickle below pauses 0.8 s: far enough below it on a loaded machine
MiB = 1024 * 1024


@dataclass
class Server:
    port: int
    pid: int
    tmp_dir: Path
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def server(pg_env_vars: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("upload-server")
    port, log = _free_port(), base / "api.log"
    env = {**os.environ, **pg_env_vars, "PYTHONUNBUFFERED": "1",
           "MODELPRESS_TMP_DIR": str(base / "tmp"),
           "MODELPRESS_UPLOAD_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S)}
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
           "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"uvicorn exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"uvicorn not up after 60 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
        yield Server(port, proc.pid, base / "tmp", log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _head(path: str, key: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
            ).encode()


def _read_response(sock: socket.socket, timeout_s: float) -> tuple[int, dict[str, object]]:
    """Status and JSON body of one response (Content-Length framed), within timeout_s."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while b"\r\n\r\n" not in data or len(data) < _framed_length(data):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete response within {timeout_s} s: {data[:200]!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


def _framed_length(data: bytes) -> int:
    head, sep, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + len(sep) + int(value)
    return len(data) + 1


def _counts(settings: Settings) -> tuple[int, int]:
    with session_factory(settings)() as s:
        return (s.scalar(select(func.count()).select_from(Model)) or 0,
                s.scalar(select(func.count()).select_from(BlobChunk)) or 0)


def _wait_no_temp_files(server: Server, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while server.tmp_dir.exists() and any(server.tmp_dir.iterdir()):
        assert time.monotonic() < deadline, f"temp files left: {list(server.tmp_dir.iterdir())}"
        time.sleep(0.05)


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def test_trickling_upload_hits_the_idle_timeout(server: Server, settings: Settings,
                                                key: str) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(_head("/v1/models?filename=slow.pt2", key, 10_000))
        # Trickle with gaps below the timeout: the upload stays alive...
        for i in range(4):
            if i:
                time.sleep(IDLE_TIMEOUT_S * 0.4)
            sock.sendall(b"PK\x03\x04" * 4)
        # ...then a gap above it.
        stalled_at = time.monotonic()
        status, body = _read_response(sock, timeout_s=IDLE_TIMEOUT_S + 10)
        waited = time.monotonic() - stalled_at
    assert status == 408 and body["code"] == "upload_timeout", body
    assert IDLE_TIMEOUT_S * 0.9 <= waited < IDLE_TIMEOUT_S + 5, waited
    _wait_no_temp_files(server)
    assert _counts(settings) == (0, 0)


def test_truncated_body_leaves_nothing(server: Server, settings: Settings, key: str) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(_head("/v1/models?filename=cut.pt2", key, 1_000_000))
        sock.sendall(b"PK\x03\x04" + b"\x00" * 50_000)
        # Wait until the server has the upload's temp file, then go away mid-body.
        deadline = time.monotonic() + 10
        while not (server.tmp_dir.exists() and any(server.tmp_dir.iterdir())):
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.02)
        sock.shutdown(socket.SHUT_WR)
    _wait_no_temp_files(server)
    assert _counts(settings) == (0, 0)
    assert "Traceback" not in server.log.read_text(errors="replace")


def test_content_length_past_quota_refused_before_the_body(server: Server, settings: Settings,
                                                           key: str) -> None:
    from app.db.models import ApiKey
    from app.services.auth import hash_key

    with session_factory(settings)() as s:
        tenant_id = s.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(key)))
        assert tenant_id is not None
        tenant_repo.set_quotas(s, tenant_id, None, 1000)  # bytes
        s.commit()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(_head("/v1/models?filename=big.pt2", key, 10 * MiB))  # no body at all
        # Answered at once: waiting for the body would end in the idle timeout (408).
        status, body = _read_response(sock, timeout_s=IDLE_TIMEOUT_S * 0.8)
    assert status == 413 and body["code"] == "quota_exceeded", body
    _wait_no_temp_files(server)


def test_server_memory_bounded_while_receiving_256_mib(server: Server, settings: Settings,
                                                       key: str) -> None:
    size = 256 * MiB
    piece = os.urandom(MiB)

    def upload(nbytes: int) -> tuple[int, dict[str, object]]:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(_head("/v1/models?filename=big.pt2", key, nbytes))
            sent = 0
            while sent < nbytes:
                n = min(len(piece), nbytes - sent)
                sock.sendall(piece[:n])
                sent += n
            return _read_response(sock, timeout_s=120)

    # Warm-up on the same path: imports and thread stacks count in the baseline, not the delta.
    status, _ = upload(4 * MiB)
    assert status == 422
    before = _vm_hwm_kib(server.pid)
    status, body = upload(size)
    after = _vm_hwm_kib(server.pid)
    # Received whole, hashed, written, then refused by the loader (random bytes).
    assert status == 422 and body["code"] in {"invalid_model", "unsafe_model"}, body
    grown_mib = (after - before) / 1024
    print(f"API peak RSS +{grown_mib:.1f} MiB for a {size // MiB} MiB upload")
    assert grown_mib < 64, f"peak RSS grew {grown_mib:.0f} MiB for a 256 MiB upload"
    _wait_no_temp_files(server)
    assert _counts(settings) == (0, 0)
