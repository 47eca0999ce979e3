"""Job use cases: submit, read, list, cancel."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.base import utcnow
from app.db.models import Dataset, Job, JobStatus, Model
from app.db.repositories import datasets as dataset_repo
from app.db.repositories import jobs as repo
from app.db.repositories import models as model_repo
from app.db.session import run_read
from app.engine.errors import InputMismatch, InvalidRecipe
from app.errors import Conflict, NotFound, Unauthorized, ValidationFailed
from app.schemas.jobs import JobActivity, JobCreate, JobError, JobOut, QualityMetricName
from app.services import events, quotas, webhooks
from app.services.auth import Principal

QUEUE_FOR_DEVICE = {"cpu": "cpu", "cuda": "gpu"}


def _check_inputs(model: Model, dataset: Dataset, which: str) -> None:
    """A data set recorded against another model must still match this model's inputs."""
    if dataset.model_id == model.id:
        return
    want = {s["name"]: s for s in model.inputs}
    have = {s["name"]: s for s in dataset.inputs}
    missing = sorted(set(want) - set(have))
    if missing:
        raise InputMismatch(f"{which} lacks model input {missing[0]!r}",
                            details={"input": missing[0]})
    for name, spec in want.items():
        got = have[name]
        if got["dtype"] != spec["dtype"] or len(got["shape"]) != len(spec["shape"]) or any(
                w is not None and g is not None and w != g
                for w, g in list(zip(spec["shape"], got["shape"], strict=True))[1:]):
            raise InputMismatch(
                f"{which} input {name!r}: expected {spec['dtype']}{spec['shape']}, "
                f"found {got['dtype']}{got['shape']}", details={"input": name})


def _check_metric(model: Model, dataset: Dataset, ev: Dataset | None,
                  metric: QualityMetricName) -> None:
    """The metric checks that need no run: labels present / in range of the output width.
    The hold-out is the eval dataset when given, else a split of the dataset."""
    from app.engine.stages.quality import check_declared

    outputs = model.outputs or []
    shape = outputs[0]["shape"] if outputs else None
    tops = [d.num_classes - 1 for d in (dataset, ev) if d is not None and d.num_classes]
    holdout = ev if ev is not None else dataset
    check_declared(metric, shape, has_labels=holdout.has_labels,
                   label_max=max(tops) if tops else None,
                   source="the eval dataset" if ev is not None else "the dataset")


def _check_recipe(model: Model, body: JobCreate) -> None:
    """What a recipe asks must apply to the model's format (the engine checks it again)."""
    r = body.recipe
    if r is None:
        return
    if model.format == "onnx" and (r.prune_ratio > 0 or r.distill_epochs > 0):
        raise InvalidRecipe(
            f"recipe asks for prune_ratio {r.prune_ratio:g} / distill_epochs "
            f"{r.distill_epochs}, but model {model.id} is ONNX: pruning and distillation need "
            "the PyTorch graph and are not applicable; use prune_ratio 0 and distill_epochs 0 "
            "(ONNX Runtime quantization only), or upload a .pt2",
            details={"model_format": "onnx"})
    if model.format != "onnx" and r.keep_fp32:
        raise InvalidRecipe("recipe keep_fp32 applies to ONNX models only",
                            details={"model_format": model.format})


def create_job(session: Session, settings: Settings, tenant_id: str, body: JobCreate) -> Job:
    model = model_repo.get(session, tenant_id, body.model_id)
    if model is None:
        raise NotFound(f"model {body.model_id} not found")
    dataset = dataset_repo.get(session, tenant_id, body.dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {body.dataset_id} not found")
    _check_inputs(model, dataset, "dataset")
    _check_recipe(model, body)
    ev = None
    if body.eval_dataset_id is not None:
        ev = dataset_repo.get(session, tenant_id, body.eval_dataset_id)
        if ev is None:
            raise NotFound(f"dataset {body.eval_dataset_id} not found")
        _check_inputs(model, ev, "eval dataset")
    _check_metric(model, dataset, ev, body.constraints.metric)
    hook_url, hook_secret = body.webhook_url, body.webhook_secret
    if hook_url is not None:  # checked before the quota lock is taken
        webhooks.check_url(hook_url)
        if hook_secret is None:
            raise ValidationFailed("webhook_secret is required with webhook_url (whsec_ + "
                                   "base64 of 24 to 64 random bytes; the receiver verifies "
                                   "with it)")
        webhooks.check_secret(hook_secret)
    queue = QUEUE_FOR_DEVICE.get(body.device, settings.auto_queue)
    quotas.reserve_job_slot(session, settings, tenant_id)  # last: the lock lasts to the commit
    job = repo.add(session, Job(
        tenant_id=tenant_id, model_id=model.id, dataset_id=dataset.id,
        eval_dataset_id=body.eval_dataset_id, status=JobStatus.queued.value,
        constraints=body.constraints.model_dump(),
        recipe=None if body.recipe is None else body.recipe.model_dump(),
        device=body.device, queue=queue, seed=body.seed, max_attempts=settings.max_attempts,
        progress=0.0, attempt=0, cancel_requested=False,
        # Set before the commit: if the send after it fails, the reconciler re-sends later.
        enqueued_at=utcnow()))
    if hook_url is not None and hook_secret is not None:
        webhooks.create_for_job(session, tenant_id, job.id, hook_url, hook_secret)
    return job


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = repo.get(session, tenant_id, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def list_jobs(session: Session, tenant_id: str, status: str | None, limit: int,
              cursor: str | None) -> tuple[Sequence[Job], str | None]:
    return repo.list_page(session, tenant_id, status, limit, cursor)


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """queued -> cancelled now; running -> cancel_requested (stops at the next progress point)."""
    job = get_job(session, tenant_id, job_id)
    if repo.cancel_if_queued(session, job.id):
        events.record_job(session, job.id, "outcome")
    elif not repo.request_cancel(session, job.id):
        session.refresh(job)
        if job.status == JobStatus.cancelled.value:
            return job
        raise Conflict(f"job {job_id} is already {job.status}")
    session.refresh(job)
    return job


def _activity(value: dict[str, Any] | None) -> JobActivity | None:
    return None if value is None else JobActivity.model_validate(value)


def to_out(job: Job) -> JobOut:
    return _out_from_row({c.key: getattr(job, c.key) for c in repo.OUT_COLUMNS})


def _out_from_row(row: Any) -> JobOut:
    """``row``: the columns of ``repo.OUT_COLUMNS`` by name (a Core row or the ORM object's)."""
    return JobOut(
        id=row["id"], status=row["status"], stage=row["stage"], progress=row["progress"],
        eta_s=row["eta_s"], activity=_activity(row["activity"]), message=row["message"],
        attempt=row["attempt"], max_attempts=row["max_attempts"],
        model_id=row["model_id"], dataset_id=row["dataset_id"],
        eval_dataset_id=row["eval_dataset_id"], device=row["device"], queue=row["queue"],
        constraints=row["constraints"], recipe=row["recipe"], metrics=row["metrics"],
        error=None if row["error_code"] is None else JobError(code=row["error_code"],
                                                              detail=row["error_detail"]),
        cancel_requested=row["cancel_requested"], created_at=row["created_at"],
        started_at=row["started_at"], finished_at=row["finished_at"],
        updated_at=row["updated_at"])


def _principal_from_row(row: Any) -> Principal:
    """The checks of ``app.services.auth.authenticate``, on the joined row's key columns."""
    now = utcnow()
    if row["key_revoked_at"] is not None and row["key_revoked_at"] <= now:
        raise Unauthorized("API key revoked")
    if row["key_expires_at"] is not None and row["key_expires_at"] <= now:
        raise Unauthorized("API key expired")
    return Principal(tenant_id=row["key_tenant_id"], key_id=row["key_id"])


def read_job_json(engine: Engine, key_hash: str, principal: Principal | None,
                  job_id: str, admit: Callable[[Principal], None] | None = None,
                  ) -> tuple[Principal, bytes]:
    """GET /v1/jobs/{id} in one statement: (the caller, the JobOut JSON).

    ``principal`` is the auth cache's answer for ``key_hash``; without it the key is checked in
    the same query as the job is read (a join), so a miss costs no extra round trip. Raises
    Unauthorized (key unknown, revoked or expired; checked before the job) or NotFound.
    ``admit(principal)`` runs once the caller is known, before NotFound (the rate limit: an
    unknown id counts like any request).
    """
    def read(conn: Connection) -> Any:
        if principal is not None:
            return repo.get_out_row(conn, principal.tenant_id, job_id)
        return repo.get_out_row_by_key(conn, key_hash, job_id)

    row = run_read(engine, read)
    if principal is None:
        if row is None:
            raise Unauthorized("unknown API key")
        principal = _principal_from_row(row)
    if admit is not None:
        admit(principal)
    if row is None or row["id"] is None:
        raise NotFound(f"job {job_id} not found")
    return principal, _out_from_row(row).model_dump_json().encode()
