"""Rows (and artifact bytes) of one tenant, for tests that need every kind of id to exist:
a model, a data set, a finished job with a report and a downloadable artifact, and a queued
job (cancellable). No worker is involved."""

from __future__ import annotations

from dataclasses import dataclass

from app.config import Settings
from app.db.base import utcnow
from app.db.models import Artifact, Job, Webhook
from app.db.session import session_factory
from app.services.webhooks import new_secret
from app.storage import get_store
from tests.service.conftest import seed_model_and_data

ARTIFACT_BYTES = b"artifact bytes " * 64  # 960 bytes: enough for Range requests


@dataclass(frozen=True)
class Seeded:
    model_id: str
    dataset_id: str
    job_id: str  # succeeded, with a report and ARTIFACT_NAME
    queued_job_id: str
    artifact_name: str
    webhook_id: str

    def path_values(self) -> dict[str, str]:
        """A value for each path parameter name of the API (see the tenancy matrix)."""
        return {"model_id": self.model_id, "dataset_id": self.dataset_id,
                "job_id": self.job_id, "name": self.artifact_name,
                "webhook_id": self.webhook_id}


def seed_tenant(settings: Settings, key: str) -> Seeded:
    model_id, dataset_id = seed_model_and_data(settings, key)
    store = get_store(settings)
    with session_factory(settings)() as s:
        from app.db.models import Model

        model = s.get(Model, model_id)
        assert model is not None
        tenant_id = model.tenant_id
        now = utcnow()
        common = dict(tenant_id=tenant_id, model_id=model_id, dataset_id=dataset_id,
                      constraints={"max_size_mb": 1.0}, device="cpu", queue="cpu",
                      max_attempts=3, progress=0.0, attempt=0, cancel_requested=False,
                      seed=0)
        done = Job(**common, status="succeeded", stage="export", started_at=now,
                   finished_at=now, metrics={"best": {"size_mb": 0.1}},
                   report={"candidates": [], "manifest": {"seed": 0}})
        queued = Job(**common, status="queued", enqueued_at=now)
        hook = Webhook(tenant_id=tenant_id, url="https://example.com/hook",
                       secret=new_secret(), event_types=["job.succeeded"], enabled=True)
        s.add_all([done, queued, hook])
        s.flush()
        key_name = f"jobs/{tenant_id}/{done.id}/model.onnx"
        size, sha = store.put_stream(key_name, iter([ARTIFACT_BYTES]))
        s.add(Artifact(job_id=done.id, name="model.onnx", sha256=sha, size_bytes=size,
                       content_type="application/octet-stream", storage_key=key_name))
        s.commit()
        return Seeded(model_id, dataset_id, done.id, queued.id, "model.onnx", hook.id)
