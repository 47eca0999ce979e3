"""Job events (SSE) and webhooks against the real stack: Postgres, Redis, a real Celery
worker, two uvicorn API processes and a webhook receiver process on 127.0.0.1.

The module has its own Postgres database and Redis DB (MODELPRESS_TEST_EVENTS_REDIS_DB,
default 15): its worker allows loopback webhooks (MODELPRESS_WEBHOOK_ALLOW_PRIVATE), and the
session worker of the other service tests must not send (or refuse) this module's deliveries.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.db.migrate import upgrade
from app.services.webhooks import new_secret
from tests.faults.servers import (
    Api,
    Proc,
    free_port,
    job_body,
    new_key,
    poll,
    start_api,
    start_worker,
    stop_worker,
    tiny_mlp,
    upload,
)
from tests.service.conftest import ROOT, create_database, drop_database, flushed_redis_db, pg_env

pytestmark = pytest.mark.service

EVENTS_REDIS_DB = int(os.environ.get("MODELPRESS_TEST_EVENTS_REDIS_DB", "15"))
TERMINAL = {"succeeded", "failed", "cancelled"}
RETRY_BASE_S, RETRY_MAX_S = 1.0, 4.0  # seconds: 1, 2, 4, 4, ... while the receiver is down


@dataclass
class Stack:
    apis: list[Api]
    worker: Proc
    key: str
    other_key: str
    database_url: str

    def client(self, i: int = 0, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.apis[i].url, timeout=120,
                            headers={"Authorization": f"Bearer {key or self.key}"})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("events")
    url = create_database("mp_events")
    upgrade(url)
    redis_gen = flushed_redis_db(EVENTS_REDIS_DB)
    redis_url = next(redis_gen)
    env = {**pg_env(url, redis_url, tmp),
           "MODELPRESS_WEBHOOK_ALLOW_PRIVATE": "true",  # the receiver is on 127.0.0.1
           "MODELPRESS_WEBHOOK_RETRY_BASE_S": str(RETRY_BASE_S),
           "MODELPRESS_WEBHOOK_RETRY_MAX_S": str(RETRY_MAX_S),
           "MODELPRESS_WEBHOOK_MAX_ATTEMPTS": "100",
           "MODELPRESS_WEBHOOK_POLL_INTERVAL_S": "0.2",
           "MODELPRESS_EVENTS_POLL_INTERVAL_S": "0.2"}
    apis: list[Api] = []
    worker = None
    try:
        apis = [start_api(env, tmp / f"api{i}.log") for i in range(2)]
        worker = start_worker(env, tmp / "worker.log")
        yield Stack(apis, worker, new_key(url, "events-a"), new_key(url, "events-b"), url)
    finally:
        if worker is not None:
            stop_worker(worker)
        for api in apis:
            api.proc.stop()
        drop_database(url)
        next(redis_gen, None)


@pytest.fixture(scope="module")
def uploaded(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Any:
    # Hidden 256 at batch 64: int8 beats fp32 there (tests/service/conftest.py, mlp_files),
    # so the job succeeds rather than refusing to ship a slower model.
    files = tiny_mlp(tmp_path_factory.mktemp("mlp"), hidden=256, samples=600)
    with stack.client() as c:
        return upload(c, files)


def submit_body(up: Any) -> dict[str, Any]:
    return job_body(up, batch_size=64)


# --- reading the stream ---------------------------------------------------------------------


@dataclass
class Event:
    id: int
    type: str
    data: dict[str, Any]


def read_events(c: httpx.Client, job_id: str, *, headers: dict[str, str] | None = None,
                params: dict[str, Any] | None = None, stop_after: int | None = None,
                timeout_s: float = 240) -> list[Event]:
    """Parse the SSE stream as a fetch()-reader client would; return after ``stop_after``
    events (closing the connection mid-stream) or when the server ends the stream."""
    out: list[Event] = []
    fields: dict[str, str] = {}
    with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, params=params,
                  timeout=timeout_s) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line == "":
                if fields:
                    ev = Event(int(fields["id"]), fields["event"], json.loads(fields["data"]))
                    assert ev.data["id"] == ev.id and ev.data["type"] == ev.type, fields
                    out.append(ev)
                    fields = {}
                    if stop_after is not None and len(out) >= stop_after:
                        return out
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            assert name not in fields, f"field {name} twice in one event"
            fields[name] = value
    assert not fields, f"stream ended inside an event: {fields}"
    return out


def test_every_event_once_in_order_across_a_reconnect(stack: Stack, uploaded: Any) -> None:
    a, b = stack.client(0), stack.client(1)
    r = a.post("/v1/jobs", json=submit_body(uploaded))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    first = read_events(a, job_id, stop_after=3)  # then the client drops the connection
    assert [e.id for e in first] == [1, 2, 3], first
    assert first[-1].type != "outcome", "the job ended before the reconnect: test is moot"
    # Resume on ANOTHER API process: the events come from the database.
    rest = read_events(b, job_id, headers={"Last-Event-ID": str(first[-1].id)})
    job = a.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]

    whole = read_events(a, job_id)  # a late subscriber replays everything, then it ends
    got = first + rest
    assert [(e.id, e.type, e.data) for e in got] == [(e.id, e.type, e.data) for e in whole]
    assert [e.id for e in whole] == list(range(1, len(whole) + 1)), [e.id for e in whole]
    types = [e.type for e in whole]
    assert types.count("outcome") == 1 and types[-1] == "outcome", types
    out = whole[-1].data
    assert (out["status"], out["stage"], out["progress"]) == ("succeeded", "done", 1.0)
    assert out["job_id"] == job_id and out["error"] is None

    stages = [e.data["stage"] for e in whole if e.type == "stage"]
    assert stages[0] == "load" and len(stages) == len(set(stages)), stages
    assert {"load", "baseline", "export", "store"} <= set(stages), stages
    cands = [e.data["candidate"] for e in whole if e.type == "candidate"]
    assert [c["index"] for c in cands] == list(range(len(job["metrics"]["candidates"])))
    assert [c["size_bytes"] for c in cands] == [
        c["size_bytes"] for c in job["metrics"]["candidates"]]
    assert cands[0]["recipe"]["quant"] == "int8_static" and cands[0]["size_bytes"] > 0
    running = [e.data["progress"] for e in whole if e.type in ("stage", "progress")]
    assert running == sorted(running), running
    # Coalescing: between two progress events of one stage, progress rose >= 1 point or
    # >= ~1 s passed (the progress writes themselves come every 0.2 s here).
    prev = None
    for e in whole:
        if e.type == "progress" and prev is not None and prev.type in ("stage", "progress"):
            dp = e.data["progress"] - prev.data["progress"]
            dt = (datetime.fromisoformat(e.data["at"])
                  - datetime.fromisoformat(prev.data["at"])).total_seconds()
            assert dp >= 0.01 - 1e-9 or dt >= 0.9, (prev, e)
        prev = e

    # ?after= for clients that cannot set headers; the header wins over it.
    k = len(whole) // 2
    tail = read_events(b, job_id, params={"after": k})
    assert [e.id for e in tail] == [e.id for e in whole[k:]]
    tail = read_events(b, job_id, params={"after": 1}, headers={"Last-Event-ID": str(k)})
    assert [e.id for e in tail] == [e.id for e in whole[k:]]
    assert read_events(b, job_id, headers={"Last-Event-ID": str(len(whole))}) == []
    print(f"\n{len(whole)} events: {types.count('stage')} stage, {types.count('progress')} "
          f"progress, {len(cands)} candidate, 1 outcome; first read {len(first)}, "
          f"resumed on the second API with {len(rest)}")


def test_stream_is_tenant_scoped_and_checks_its_input(stack: Stack, uploaded: Any) -> None:
    a = stack.client(0)
    r = a.post("/v1/jobs", json=submit_body(uploaded))
    job_id = r.json()["id"]
    r = stack.client(1, key=stack.other_key).get(f"/v1/jobs/{job_id}/events")
    assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
    r = a.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "abc"})
    assert r.status_code == 422 and "Last-Event-ID" in r.json()["detail"], r.text
    r = a.get(f"/v1/jobs/{job_id}/events", params={"after": -1})
    assert r.status_code == 422, r.text
    r = httpx.get(stack.apis[0].url + f"/v1/jobs/{job_id}/events")
    assert r.status_code == 401, r.text
    poll("job ends", lambda: a.get(f"/v1/jobs/{job_id}").json()["status"] in TERMINAL or None,
         240)


# --- webhooks -------------------------------------------------------------------------------


@dataclass
class Receiver:
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, secrets: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.service.webhook_receiver", str(self.port),
             json.dumps(secrets), str(self.log)], cwd=ROOT, stdout=subprocess.PIPE,
            start_new_session=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == b"listening\n"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)

    def requests(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    rec = Receiver(free_port(), tmp_path / "received.jsonl")
    yield rec
    rec.stop()


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_webhook_signed_retried_until_the_receiver_is_up(stack: Stack, uploaded: Any,
                                                         receiver: Receiver) -> None:
    a = stack.client(0)
    base = f"http://127.0.0.1:{receiver.port}"
    assert _refused(receiver.port)
    r = a.post("/v1/webhooks", json={"url": f"{base}/tenant", "description": "all jobs",
                                     "event_types": ["job.succeeded", "job.stage"]})
    assert r.status_code == 201, r.text
    hook = r.json()
    assert hook["secret"].startswith("whsec_") and hook["job_id"] is None
    assert "secret" not in a.get(f"/v1/webhooks/{hook['id']}").json()
    job_secret = new_secret()
    r = a.post("/v1/jobs", json={**submit_body(uploaded), "webhook_url": f"{base}/job",
                                 "webhook_secret": job_secret})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    def deliveries() -> list[dict[str, Any]]:
        r = a.get(f"/v1/jobs/{job_id}/webhook-deliveries")
        assert r.status_code == 200, r.text
        items: list[dict[str, Any]] = r.json()["items"]
        return items

    # The receiver is down: the job still runs to the end (the worker never waits on it),
    # and the outcome's deliveries have failed at least once.
    poll("job ends", lambda: a.get(f"/v1/jobs/{job_id}").json()["status"] in TERMINAL or None,
         240)
    assert a.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"

    def outcome_failed_once() -> list[dict[str, Any]] | None:
        ds = [d for d in deliveries() if d["event_type"] == "job.succeeded"]
        return ds if len(ds) == 2 and all(d["attempts"] >= 1 for d in ds) else None

    ds = poll("outcome deliveries attempted", outcome_failed_once, 60)
    for d in ds:
        assert d["status"] == "pending", d
        first = d["attempt_log"][0]
        assert first["status_code"] is None and "Connect" in first["error"], first
    assert receiver.requests() == []

    receiver.start({"/tenant": hook["secret"], "/job": job_secret})

    def all_delivered() -> list[dict[str, Any]] | None:
        ds = deliveries()
        return ds if ds and all(d["status"] == "delivered" for d in ds) else None

    ds = poll("every delivery delivered", all_delivered, 120,
              on_timeout=lambda: json.dumps(deliveries(), indent=1)[-3000:])
    got = receiver.requests()
    assert got and all(g["error"] is None for g in got), got  # every signature verified
    by_id = {g["headers"]["webhook-id"]: g for g in got}
    assert len(by_id) == len(got), "a delivered message was sent twice"
    assert set(by_id) == {d["id"] for d in ds}

    whole = read_events(a, job_id)
    outcome = whole[-1]
    stage_ids = [e.id for e in whole if e.type == "stage"]
    tenant = [d for d in ds if d["webhook_id"] == hook["id"]]
    own = [d for d in ds if d["webhook_id"] != hook["id"]]
    # The tenant endpoint asked for stages and success; the job's own gets its outcome only.
    assert sorted(d["event_id"] for d in tenant) == sorted([*stage_ids, outcome.id])
    assert [(d["event_type"], d["event_id"]) for d in own] == [("job.succeeded", outcome.id)]
    for d in ds:
        req = by_id[d["id"]]
        assert req["path"] == ("/tenant" if d in tenant else "/job")
        body = json.loads(req["body"])
        assert body["type"] == d["event_type"] and body["data"]["id"] == d["event_id"]
        assert req["headers"]["content-type"] == "application/json"
        assert abs(int(req["headers"]["webhook-timestamp"]) - time.time()) < 300
    own_body = json.loads(by_id[own[0]["id"]]["body"])
    assert own_body["data"] == outcome.data
    assert own_body["data"]["status"] == "succeeded"

    # The log: a refused attempt or more, then the 204; backoff doubles from RETRY_BASE_S.
    for d in [*own, *[t for t in tenant if t["event_type"] == "job.succeeded"]]:
        log = d["attempt_log"]
        assert d["attempts"] == len(log) >= 2, d
        assert [x["number"] for x in log] == list(range(1, len(log) + 1))
        assert all(x["status_code"] is None for x in log[:-1]) and log[-1]["status_code"] == 204
        assert d["delivered_at"] and d["last_status_code"] == 204 and d["last_error"] is None
        at = [datetime.fromisoformat(x["at"]) for x in log]
        for n in range(1, len(at)):
            gap = (at[n] - at[n - 1]).total_seconds()
            assert gap >= min(RETRY_BASE_S * 2 ** (n - 1), RETRY_MAX_S) - 0.05, (n, gap, log)
    r = a.get(f"/v1/webhooks/{hook['id']}/deliveries")
    assert {d["id"] for d in r.json()["items"]} == {d["id"] for d in tenant}
    # A wrong secret does not verify: the receiver's check is not a rubber stamp.
    from tests.service.webhook_receiver import verify

    req = by_id[own[0]["id"]]
    assert verify(job_secret, req["headers"], req["body"].encode()) is None
    assert verify(hook["secret"], req["headers"], req["body"].encode()) is not None
    assert verify(job_secret, req["headers"], req["body"].encode() + b" ") is not None
    a.delete(f"/v1/webhooks/{hook['id']}")


def test_webhook_input_checks_and_tenancy(stack: Stack, uploaded: Any) -> None:
    a, other = stack.client(0), stack.client(1, key=stack.other_key)
    for url in ("ftp://example.com/x", "http://user:pw@example.com/x", "/relative", "http://"):
        r = a.post("/v1/webhooks", json={"url": url})
        assert r.status_code == 422 and r.json()["code"] == "validation_error", (url, r.text)
    r = a.post("/v1/webhooks", json={"url": "https://example.com/x", "secret": "whsec_abc"})
    assert r.status_code == 422 and "whsec_" in r.json()["detail"], r.text
    r = a.post("/v1/jobs", json={**submit_body(uploaded), "webhook_url": "https://example.com/h"})
    assert r.status_code == 422 and "webhook_secret" in r.json()["detail"], r.text
    r = a.post("/v1/webhooks", json={"url": "https://example.com/x", "event_types": ["job.x"]})
    assert r.status_code == 422, r.text

    hook = a.post("/v1/webhooks", json={"url": "https://example.com/x"}).json()
    assert hook["event_types"] == ["job.succeeded", "job.failed", "job.cancelled"]
    assert other.get(f"/v1/webhooks/{hook['id']}").status_code == 404
    assert other.get(f"/v1/webhooks/{hook['id']}/deliveries").status_code == 404
    assert other.delete(f"/v1/webhooks/{hook['id']}").status_code == 404
    assert hook["id"] not in {h["id"] for h in other.get("/v1/webhooks").json()["items"]}
    r = a.patch(f"/v1/webhooks/{hook['id']}", json={"enabled": False,
                                                      "event_types": ["job.failed"]})
    assert r.status_code == 200 and r.json()["enabled"] is False, r.text
    assert r.json()["event_types"] == ["job.failed"]
    assert a.delete(f"/v1/webhooks/{hook['id']}").status_code == 204
    assert a.get(f"/v1/webhooks/{hook['id']}").status_code == 404
