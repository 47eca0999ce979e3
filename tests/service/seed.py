"""Rows (and artifact bytes) of one tenant, for tests that need every kind of id to exist:
a model, a data set, a finished job with a report and a downloadable artifact, and a queued
job (cancellable). No worker is involved."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from app.config import Settings
from app.db.base import utcnow
from app.db.models import Artifact, Job, Webhook
from app.db.session import session_factory
from app.engine.types import Candidate, Constraints, JobSpec, Metrics, Recipe
from app.services.webhooks import new_secret
from app.storage import get_store
from tests.service.conftest import seed_model_and_data

ARTIFACT_BYTES = b"artifact bytes " * 64  # 960 bytes: enough for Range requests


def sample_result() -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, report) of a finished job in the shapes the worker stores them, built from
    the engine's own types (app/engine/pipeline.py ``report``, app/services/pipeline.py
    ``metrics``): two candidates, the second chosen."""
    base = Metrics(quality=0.95, quality_kind="accuracy", latency_p50_ms=0.2,
                   latency_p95_ms=0.25, size_bytes=80_000, parameters=20_000, macs=20_000,
                   per_class_accuracy={"0": 0.9, "1": 1.0}, agreement=None)
    small = dataclasses.replace(base, quality=0.94, latency_p50_ms=0.1, size_bytes=21_000,
                                agreement=0.98)
    c = Constraints(max_size_mb=1.0)
    cands = [Candidate(Recipe(quant="fp16"), dataclasses.replace(small, size_bytes=41_000),
                       feasible=True, distilled=False),
             Candidate(Recipe(), small, feasible=True, distilled=False)]
    best = cands[1]
    entry = {"file": "model.onnx", "sha256": "0" * 64, "size_bytes": small.size_bytes}
    report: dict[str, Any] = {
        "status": "succeeded", "message": "chosen: prune 0%, int8_static", "seed": 0,
        "device": "cpu", "spec": JobSpec(constraints=c).to_dict(), "constraints": c.to_dict(),
        "recipe": best.recipe.to_dict(), "baseline": base.to_dict(), "chosen": best.to_dict(),
        "chosen_index": 1, "candidates": [x.to_dict() for x in cands], "pareto_front": [1],
        "skipped": [], "ratios": {"size": 80 / 21, "speedup": 2.0, "quality_drop": 0.01},
        "onnx_parity_max_abs": 1e-4,
        "data": {"train": 800, "validation": 150, "holdout": 250, "holdout_source": "split"},
        "elapsed_s": 12.5,
        "manifest": {"inputs": {"model": {**entry, "file": "model.pt2"}},
                     "outputs": {"model.onnx": entry}, "library_versions": {"torch": "2"}},
    }
    metrics: dict[str, Any] = {
        "baseline": base.to_dict(),
        "best": {**small.to_dict(), "recipe": best.recipe.to_dict(), "feasible": True,
                 "reasons": []},
        "candidates": [{"recipe": x.recipe.to_dict(), "feasible": x.feasible,
                        "distilled": x.distilled, "quality": x.metrics.quality,
                        "latency_p50_ms": x.metrics.latency_p50_ms,
                        "size_bytes": x.metrics.size_bytes, "reasons": []} for x in cands],
        "stage_seconds": {"load": 1.0, "baseline": 2.0},
    }
    return metrics, report


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
        metrics, report = sample_result()
        common = dict(tenant_id=tenant_id, model_id=model_id, dataset_id=dataset_id,
                      constraints={"max_size_mb": 1.0}, device="cpu", queue="cpu",
                      max_attempts=3, progress=0.0, attempt=0, cancel_requested=False,
                      seed=0)
        done = Job(**common, status="succeeded", stage="export", started_at=now,
                   finished_at=now, metrics=metrics, report=report)
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
