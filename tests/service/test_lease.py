"""The job lease: one claim at a time, attempts counted, lost leases detected; the reaper
requeues or fails jobs whose heartbeat stopped; the reconciler re-sends lost messages."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from app.config import Settings
from app.db.base import utcnow
from app.db.models import ApiKey, Job
from app.db.repositories import jobs as repo
from app.db.session import session_factory
from app.engine.types import JobSpec, Result
from app.services import maintenance
from app.services.auth import hash_key
from app.services.pipeline import run_job
from app.services.queue import send_jobs
from tests.service.conftest import QuietBroker, seed_model_and_data
from workers.celery_app import create_celery

pytestmark = pytest.mark.service


def _job(settings: Settings, key: str, **kw: Any) -> str:
    model_id, dataset_id = seed_model_and_data(settings, key)
    with session_factory(settings)() as s:
        tenant_id = s.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(key)))
        job = repo.add(s, Job(tenant_id=tenant_id, model_id=model_id, dataset_id=dataset_id,
                              constraints={"max_size_mb": 1}, **kw))
        s.commit()
        return job.id


def _expire(settings: Settings, job_id: str) -> None:
    with session_factory(settings)() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            lease_expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()


def _get(settings: Settings, job_id: str) -> Job:
    with session_factory(settings)() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_claim_is_exclusive_and_counts_attempts(settings: Settings, key: str) -> None:
    job_id = _job(settings, key)
    sessions = session_factory(settings)
    with sessions() as s:
        assert repo.claim(s, job_id, "w1", 30) is not None
        s.commit()
        assert repo.claim(s, job_id, "w2", 30) is None  # lease still valid
        s.rollback()
    _expire(settings, job_id)
    with sessions() as s:
        job = repo.claim(s, job_id, "w2", 30)
        s.commit()
    assert job is not None and job.attempt == 2 and job.lease_owner == "w2"
    with sessions() as s:  # the first worker finds out at its next beat and must stop
        assert repo.heartbeat(s, job_id, "w1", 30) is None
        assert repo.heartbeat(s, job_id, "w2", 30) is False
        assert not repo.finish(s, job_id, "w1", "succeeded")
        s.commit()


def test_reaper_requeues_then_fails(settings: Settings, key: str,
                                    quiet_broker: QuietBroker) -> None:
    job_id = _job(settings, key, max_attempts=2, queue="gpu")
    cancelled = _job(settings, key)
    sessions = session_factory(settings)
    with sessions() as s:
        repo.claim(s, job_id, "w1", 30)
        repo.claim(s, cancelled, "w1", 30)
        repo.request_cancel(s, cancelled)
        s.commit()
    _expire(settings, job_id)
    _expire(settings, cancelled)
    with sessions() as s:
        to_send = maintenance.reap_expired(s)
        s.commit()
    assert to_send == [(job_id, "gpu")]
    assert _get(settings, job_id).status == "queued" and _get(settings, job_id).attempt == 1
    assert _get(settings, cancelled).status == "cancelled"
    celery = create_celery(settings.model_copy(update={"broker_url": quiet_broker.url}))
    assert send_jobs(celery, to_send) == 1
    assert quiet_broker.messages("gpu") == [{"task": "modelpress.jobs.run", "args": [job_id]}]
    with sessions() as s:  # second and last attempt dies too
        assert repo.claim(s, job_id, "w2", 30) is not None
        s.commit()
    _expire(settings, job_id)
    with sessions() as s:
        assert maintenance.reap_expired(s) == []
        s.commit()
    job = _get(settings, job_id)
    assert job.status == "failed" and job.error_code == "worker_lost" and job.attempt == 2
    assert job.finished_at is not None


def test_reconciler_resends_stale_queued(settings: Settings, key: str) -> None:
    old = _job(settings, key, enqueued_at=utcnow() - timedelta(hours=1))
    fresh = _job(settings, key, enqueued_at=utcnow())
    never = _job(settings, key, enqueued_at=None)
    with session_factory(settings)() as s:
        stale = maintenance.reconcile_queued(s, settings)
        s.commit()
    assert {j for j, _ in stale} == {old, never} and fresh not in {j for j, _ in stale}
    with session_factory(settings)() as s:  # just re-sent: not again on the next tick
        assert maintenance.reconcile_queued(s, settings) == []


def _fake_engine(steps: int, on_step: Any = None) -> Any:
    """Stands in for app.engine.pipeline.run: reports progress like the engine does."""
    def run(model: Path, data: Path, spec: JobSpec, out: Path, on_progress: Any,
            eval_data_path: Path | None = None, work_dir: Path | None = None,
            model_format: str | None = None, on_status: Any = None) -> Result:
        assert model.read_bytes() == b"model-bytes" and data.read_bytes() == b"data-bytes"
        for i in range(steps):
            if on_step:
                on_step(i)
            on_progress("prune", i / steps, f"step {i}")
        raise AssertionError("should have been stopped")
    return run


def _stored_job(settings: Settings, key: str) -> str:
    from app.db.models import Dataset, Model
    from app.storage import get_store

    job_id = _job(settings, key)
    store = get_store(settings)
    with session_factory(settings)() as s:
        job = s.get(Job, job_id)
        assert job is not None
        for cls, data in ((Model, b"model-bytes"), (Dataset, b"data-bytes")):
            row: Any = s.get(cls, job.model_id if cls is Model else job.dataset_id)
            store.put_stream(row.storage_key, [data])
        s.commit()
    return job_id


def test_run_job_stops_on_cancel_and_on_lost_lease(settings: Settings, key: str) -> None:
    fast = settings.model_copy(update={"progress_write_interval_s": 0.0})
    job_id = _stored_job(settings, key)

    def cancel_at(i: int) -> None:
        if i == 3:
            with session_factory(settings)() as s:
                repo.request_cancel(s, job_id)
                s.commit()

    run_job(job_id, "w1", settings=fast, engine_run=_fake_engine(100, cancel_at))
    job = _get(settings, job_id)
    assert job.status == "cancelled" and job.error_code == "cancelled"
    assert job.stage == "prune" and job.lease_owner is None and job.attempt == 1

    job_id = _stored_job(settings, key)

    def steal_at(i: int) -> None:
        if i == 3:
            with session_factory(settings)() as s:
                s.execute(update(Job).where(Job.id == job_id).values(lease_owner="w-other"))
                s.commit()

    run_job(job_id, "w1", settings=fast, engine_run=_fake_engine(100, steal_at))
    job = _get(settings, job_id)
    assert job.status == "running" and job.lease_owner == "w-other"  # left to its new owner
    # A duplicate delivery of a finished or leased job is a no-op.
    run_job(job_id, "w2", settings=fast, engine_run=_fake_engine(0))
    assert _get(settings, job_id).lease_owner == "w-other"
