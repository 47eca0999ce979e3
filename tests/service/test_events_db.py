"""Event numbering, the writers outside the worker, and the webhook sender's address policy,
against real Postgres and SQLite (no worker needed)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.base import utcnow
from app.db.migrate import upgrade
from app.db.models import Job
from app.db.repositories import job_events
from app.db.session import get_engine, session_factory
from app.services import events, maintenance, webhooks
from app.services import jobs as job_service
from tests.service.conftest import new_key, seed_model_and_data

pytestmark = pytest.mark.service


@pytest.fixture(params=["postgres", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "postgres":
        request.getfixturevalue("clean_db")  # truncates every table after the test
        yield request.getfixturevalue("settings")
        return
    url = f"sqlite:///{tmp_path}/events.db"
    upgrade(url)
    yield Settings(database_url=url, storage_dir=tmp_path / "artifacts")


def _job(settings: Settings, tenant: str, **fields: Any) -> str:
    model_id, dataset_id = seed_model_and_data(settings, new_key(settings, tenant))
    with session_factory(settings)() as s:
        from app.db.models import Model

        model = s.get(Model, model_id)
        assert model is not None
        job = Job(**{"tenant_id": model.tenant_id, "model_id": model_id,
                     "dataset_id": dataset_id, "constraints": {"max_size_mb": 1.0},
                     "device": "cpu", "queue": "cpu", "max_attempts": 3, "progress": 0.0,
                     "attempt": 0, "cancel_requested": False, "seed": 0, "status": "running",
                     **fields})
        s.add(job)
        s.commit()
        return job.id


def test_event_ids_commit_in_order_under_concurrent_writers(db: Settings) -> None:
    """Writers append concurrently (each after its UPDATE of the job row, as the worker and
    the reaper do); a reader polling "after my last id" must never see a gap that fills in
    later: that is what makes Last-Event-ID resumption lossless."""
    job_id = _job(db, f"seq-{db.is_sqlite}")
    sessions: sessionmaker[Session] = session_factory(db)
    writers, per_writer = 4, 25
    done = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def write(w: int) -> None:
        try:
            for k in range(per_writer):
                with sessions() as s:
                    s.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()))
                    events.record(s, job_id, "progress", status="running", stage="prune",
                                  progress=k / per_writer, message=f"writer {w} #{k}")
                    s.commit()
        except BaseException as e:
            errors.append(e)

    def read() -> None:
        engine = get_engine(db.database_url)
        while True:
            last = done.is_set()
            with engine.connect() as conn:
                rows = job_events.after(conn, job_id, seen[-1] if seen else 0)
            seen.extend(seq for seq, _, _ in rows)
            if last:
                return

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    reader = threading.Thread(target=read)
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    assert not errors, errors
    assert seen == list(range(1, writers * per_writer + 1)), seen


def test_reaper_and_cancel_write_their_events(db: Settings) -> None:
    past = utcnow() - timedelta(minutes=5)
    lost = _job(db, f"reap-{db.is_sqlite}", attempt=3, lease_owner="h:1:t",
                lease_expires_at=past, stage="distill", progress=0.4)
    retried = _job(db, f"retry-{db.is_sqlite}", attempt=1, lease_owner="h:2:t",
                   lease_expires_at=past, stage="prune", progress=0.2)
    queued = _job(db, f"queued-{db.is_sqlite}", status="queued")
    with session_factory(db)() as s:
        maintenance.reap_expired(s)
        tenant = s.get_one(Job, queued).tenant_id
        job_service.cancel_job(s, tenant, queued)
        s.commit()
    engine = get_engine(db.database_url)
    with engine.connect() as conn:
        (seq, kind, data), = job_events.after(conn, lost, 0)
        assert (seq, kind, data["status"], data["stage"]) == (1, "outcome", "failed", "distill")
        assert data["error"]["code"] == "worker_lost" and data["progress"] == 0.4
        (seq, kind, data), = job_events.after(conn, retried, 0)
        assert (kind, data["status"], data["stage"]) == ("stage", "queued", None)
        assert data["message"] == "requeued: worker heartbeat stopped"
        (seq, kind, data), = job_events.after(conn, queued, 0)
        assert (kind, data["status"], data["error"]["code"]) == ("outcome", "cancelled",
                                                                 "cancelled")


def test_progress_events_are_coalesced() -> None:
    p = events.ProgressEvents(step=0.01, interval_s=1.0)
    assert p.kind(True, 0.0, "a", now=0.0) == "stage"
    assert p.kind(False, 0.005, "a", now=0.2) is None  # < 1 point, < 1 s
    assert p.kind(False, 0.0101, "a", now=0.4) == "progress"  # a point up
    assert p.kind(False, 0.0101, "a", now=5.0) is None  # a second, but nothing changed
    assert p.kind(False, 0.0102, "b", now=5.1) == "progress"  # a second and a change
    assert p.kind(False, 0.0103, "c", now=5.2) is None
    assert p.kind(True, 0.0103, "c", now=5.3) == "stage"  # stage changes always emit
    # 10 000 ticks over 0..1 in 100 s: about 100 events, not 10 000.
    n = sum(p.kind(False, i / 10_000, "x", now=6 + i / 100) is not None
            for i in range(10_001))
    assert 95 <= n <= 105, n


def test_signature_matches_the_published_standard_webhooks_vector() -> None:
    # From the Standard Webhooks reference libraries' test suites.
    got = webhooks.sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                        "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, '{"test": 2432232314}')
    assert got == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert webhooks.check_secret(webhooks.new_secret()).startswith("whsec_")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
def test_private_addresses_are_refused_without_connecting(host: str) -> None:
    """Default settings: a URL on loopback gets no connection at all (a listening socket
    sees none), and the attempt records why; with the setting on, it is reached."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        srv.settimeout(0.5)
        port = srv.getsockname()[1]
        url = f"http://{host}:{port}/hook"
        secret = webhooks.new_secret()
        import httpx

        with httpx.Client(timeout=2, follow_redirects=False) as client:
            res = webhooks.post(client, Settings(), url, secret, "msg_1", "{}")
            assert res.status_code is None and res.error is not None, res
            assert res.error.startswith("refused:") and "ALLOW_PRIVATE" in res.error, res
            with pytest.raises(TimeoutError):
                srv.accept()
            if host.startswith("[::ffff"):
                return  # the IPv4-mapped form is only checked for refusal
            allowed = Settings(webhook_allow_private=True, webhook_timeout_s=1)
            hit: list[bytes] = []

            def serve() -> None:
                conn, _ = srv.accept()
                with conn:
                    hit.append(conn.recv(65536))
                    conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")

            t = threading.Thread(target=serve)
            t.start()
            res = webhooks.post(client, allowed, url, secret, "msg_1", "{}")
            t.join()
            assert res.status_code == 204 and res.error is None, res
            head = hit[0].decode()
            assert "webhook-id: msg_1" in head and f"host: {host}:{port}" in head.lower()


def test_metadata_and_private_ranges_are_not_global() -> None:
    import ipaddress

    for ip in ("169.254.169.254", "10.0.0.1", "192.168.1.1", "172.16.0.1", "::1", "fc00::1",
               "0.0.0.0", "100.64.0.1", "224.0.0.1"):
        assert not webhooks._allowed(ipaddress.ip_address(ip), False), ip
    assert webhooks._allowed(ipaddress.ip_address("93.184.216.34"), False)


def test_stream_on_the_embedded_default(tmp_path: Path) -> None:
    """The same route on SQLite (the embedded default): replay, resume, end at the outcome."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    url = f"sqlite:///{tmp_path}/embedded.db"
    upgrade(url)
    settings = Settings(database_url=url, broker_url=f"sqla+sqlite:///{tmp_path}/broker.db",
                        storage_dir=tmp_path / "artifacts", dev_key_bootstrap=False,
                        events_poll_interval_s=0.05)
    job_id = _job(settings, "embedded")
    key = new_key(settings, "embedded")  # the same tenant: create_key reuses it by name
    with session_factory(settings)() as s:
        for kind, stage, status in [("stage", "load", "running"),
                                    ("progress", "load", "running"),
                                    ("outcome", "done", "succeeded")]:
            s.execute(update(Job).where(Job.id == job_id).values(status=status, stage=stage))
            events.record_job(s, job_id, kind)
        s.commit()
    with TestClient(create_app(settings)) as c:
        auth = {"Authorization": f"Bearer {key}"}
        r = c.get(f"/v1/jobs/{job_id}/events", headers=auth)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        blocks = r.text.split("\n\n")
        assert blocks[0].split("\n")[:2] == ["id: 1", "event: stage"], r.text
        assert [b.split("\n")[0] for b in blocks if b] == ["id: 1", "id: 2", "id: 3"]
        r = c.get(f"/v1/jobs/{job_id}/events", headers={**auth, "Last-Event-ID": "2"})
        assert r.text.startswith("id: 3\nevent: outcome\ndata: {") and r.text.endswith("}\n\n")


def test_dispatch_survives_a_webhook_deleted_mid_send(db: Settings) -> None:
    """The receiver's answer arrives after the endpoint (and its log) was deleted: the pass
    goes on to the next delivery instead of failing on the missing row."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from app.db.models import Webhook, WebhookDelivery
    from app.schemas.events import WebhookCreate

    job_id = _job(db, f"del-{db.is_sqlite}")
    sessions = session_factory(db)
    with sessions() as s:
        tenant = s.get_one(Job, job_id).tenant_id
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    with sessions() as s:
        doomed = webhooks.create(s, tenant, WebhookCreate(url=f"http://127.0.0.1:{port}/d",
                                                          description=None, secret=None))
        kept = webhooks.create(s, tenant, WebhookCreate(url=f"http://127.0.0.1:{port}/k",
                                                        description=None, secret=None))
        s.execute(update(Job).where(Job.id == job_id).values(status="succeeded"))
        events.record_job(s, job_id, "outcome")
        s.commit()
        doomed_id, kept_id = doomed.id, kept.id

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            if self.path == "/d":
                with sessions() as s2:
                    s2.delete(s2.get_one(Webhook, doomed_id))
                    s2.commit()
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server.RequestHandlerClass = Handler
    t = threading.Thread(target=server.serve_forever)
    t.start()
    try:
        made = webhooks.dispatch_once(
            sessions, Settings(database_url=db.database_url, webhook_allow_private=True))
    finally:
        server.shutdown()
        t.join()
    assert made == 1  # the kept one; the deleted one's attempt had nowhere to go
    with sessions() as s:
        rows = s.query(WebhookDelivery).all()
        assert [(d.webhook_id, d.status, d.attempts) for d in rows] == [(kept_id, "delivered",
                                                                         1)]
