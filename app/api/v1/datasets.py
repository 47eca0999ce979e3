from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from app.api.idempotency import replay
from app.api.responses import AUTHED, READ, problems
from app.api.uploads import filename_from, store_upload
from app.api.v1.models import CREATED, ContentDisposition, IdemHeader, XFilename
from app.db.repositories import datasets as repo
from app.db.repositories.pagination import CursorError
from app.errors import NotFound, ValidationFailed
from app.schemas.datasets import DatasetOut, DatasetPage
from app.services import idempotency as idem
from app.services.uploads import clean_filename, data_format, ingest_dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=DatasetOut, responses=CREATED,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string",
                                                         "format": "binary"}}}}})
async def upload_dataset(request: Request, tenant: TenantDep, session: SessionDep,
                         store: StoreDep, settings: SettingsDep,
                         model_id: Annotated[str, Query(max_length=64)],
                         filename: Annotated[str | None, Query(max_length=255)] = None,
                         idempotency_key: IdemHeader = None, x_filename: XFilename = None,
                         content_disposition: ContentDisposition = None) -> Response:
    """Upload a `.npz` or `.safetensors` file (keys = the model's input names, optional
    `labels`) as the raw request body; it is validated against `model_id`'s inputs."""
    fp = idem.fingerprint("POST", request.url.path, request.url.query)
    if idempotency_key:
        stored = await run_in_threadpool(idem.find, session, tenant.tenant_id, idempotency_key,
                                         fp)
        if stored is not None:
            return replay(stored)
    name = clean_filename(filename_from(filename, x_filename, content_disposition))
    return await store_upload(
        request, session, store, tenant.tenant_id, idempotency_key, fp, kind="dataset",
        name=name, cap_bytes=settings.max_dataset_bytes, settings=settings,
        detect_format=data_format,
        ingest=lambda path, fmt: ingest_dataset(session, store, settings, tenant.tenant_id,
                                                path, name, fmt, model_id),
        render=lambda row: DatasetOut.model_validate(row).model_dump_json(),
        location_prefix="/v1/datasets")


@router.get("", response_model=DatasetPage, responses=problems(*AUTHED))
def list_datasets(tenant: TenantDep, session: SessionDep,
                  limit: Annotated[int, Query(ge=1, le=100)] = 20,
                  cursor: str | None = None) -> DatasetPage:
    try:
        rows, nxt = repo.list_page(session, tenant.tenant_id, limit, cursor)
    except CursorError as e:
        raise ValidationFailed(str(e)) from e
    return DatasetPage(items=[DatasetOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/{dataset_id}", response_model=DatasetOut, responses=READ)
def get_dataset(dataset_id: str, tenant: TenantDep, session: SessionDep) -> DatasetOut:
    row = repo.get(session, tenant.tenant_id, dataset_id)
    if row is None:
        raise NotFound(f"dataset {dataset_id} not found")
    return DatasetOut.model_validate(row)
