"""Job events: recorded in the transaction that changes the job row, served as SSE.

Writers (the worker's progress callback and outcome, the reaper, a cancel) call ``record``
right after their UPDATE of the job; the stream polls ``job_events`` so any API process can
serve any job, on Postgres and SQLite alike.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from anyio import to_thread
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models.job import TERMINAL, Job
from app.db.repositories import job_events as repo
from app.db.session import run_read
from app.services import webhooks

KEEPALIVE = b": keep-alive\n\n"
KEEPALIVE_S = 15.0  # idle seconds between comments that keep proxies from closing the stream
BATCH = 500  # events per read


def record(session: Session, job_id: str, type_: str, *, status: str,
           candidate: dict[str, Any] | None = None, error: dict[str, Any] | None = None,
           **state: Any) -> int:
    """Append one event (and its webhook deliveries) in the caller's transaction, which must
    already have UPDATEd the job's row (see job_events.append). ``state``: the job fields
    just written (stage, progress, message, and any other progress field). Returns the id."""
    data: dict[str, Any] = {"job_id": job_id, "status": status, "stage": None,
                            "progress": 0.0, "message": None, **state,
                            "at": utcnow().isoformat(), "candidate": candidate, "error": error}
    seq = repo.append(session, job_id, type_, data)
    webhooks.enqueue(session, job_id, {"id": seq, "type": type_, **data})
    return seq


def record_job(session: Session, job_id: str, type_: str,
               candidate: dict[str, Any] | None = None) -> int:
    """``record`` with the job row's current state (read after the caller's UPDATE)."""
    job = session.get_one(Job, job_id, populate_existing=True)
    error = None if job.error_code is None else {"code": job.error_code,
                                                 "detail": job.error_detail}
    return record(session, job_id, type_, status=job.status, stage=job.stage,
                  progress=job.progress, message=job.message, candidate=candidate, error=error)


class ProgressEvents:
    """Which progress write also becomes an event: every stage change; otherwise progress
    up by ``step`` (0.01 = 1 point) or ``interval_s`` seconds since the last event with
    something changed. Bounds the table to ~100 progress rows per stage change, plus one a
    second while only the message moves."""

    def __init__(self, step: float, interval_s: float) -> None:
        self.step, self.interval_s = step, interval_s
        self._progress = -math.inf
        self._message: str | None = None
        self._at = -math.inf  # monotonic seconds

    def kind(self, stage_changed: bool, progress: float, message: str | None,
             now: float) -> str | None:
        moved = progress - self._progress >= self.step - 1e-9
        stale = now - self._at >= self.interval_s and (progress != self._progress
                                                       or message != self._message)
        if not (stage_changed or moved or stale):
            return None
        self._progress, self._message, self._at = progress, message, now
        return "stage" if stage_changed else "progress"


def sse(seq: int, type_: str, data: dict[str, Any]) -> bytes:
    """``id: <n>\\nevent: <type>\\ndata: <json>\\n\\n`` (json.dumps keeps it on one line)."""
    body = json.dumps({"id": seq, "type": type_, **data}, separators=(",", ":"))
    return f"id: {seq}\nevent: {type_}\ndata: {body}\n\n".encode()


async def stream(engine: Engine, job_id: str, after: int, poll_s: float,
                 max_s: float = math.inf) -> AsyncIterator[bytes]:
    """The job's events after id ``after``, then new ones as they are committed; ends after
    the outcome (or at once when the job has ended and nothing is left to send), or at an
    idle moment after ``max_s`` seconds."""
    idle = 0.0
    deadline = time.monotonic() + max_s

    def read(conn: Any) -> list[tuple[int, str, dict[str, Any]]]:
        return repo.after(conn, job_id, after, BATCH)

    while True:
        rows = await to_thread.run_sync(run_read, engine, read)
        for seq, type_, data in rows:
            yield sse(seq, type_, data)
            after = seq
            if type_ == "outcome":
                return
        if len(rows) == BATCH:
            continue
        if not rows:
            status = await to_thread.run_sync(
                run_read, engine, lambda conn: repo.job_status(conn, job_id))
            if status is None or status in TERMINAL:
                # The outcome commits with the status: one more read has all there is
                # (a job that ended before events existed has none and ends here).
                for seq, type_, data in await to_thread.run_sync(run_read, engine, read):
                    yield sse(seq, type_, data)
                return
            if time.monotonic() >= deadline:
                return
            idle += poll_s
            if idle >= KEEPALIVE_S:
                idle = 0.0
                yield KEEPALIVE
        else:
            idle = 0.0
        await anyio.sleep(poll_s)
