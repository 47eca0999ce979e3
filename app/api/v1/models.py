from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from app.api.idempotency import replay
from app.api.responses import AUTHED, READ, UPLOAD, problems
from app.api.uploads import filename_from, store_upload
from app.db.repositories import models as repo
from app.db.repositories.pagination import CursorError
from app.errors import NotFound, ValidationFailed
from app.schemas.models import ModelOut, ModelPage
from app.services import idempotency as idem
from app.services.uploads import clean_filename, ingest_model, model_format

router = APIRouter(prefix="/v1/models", tags=["models"])

IdemHeader = Annotated[str | None, Header(
    alias="Idempotency-Key", max_length=255,
    description="a retry with the same key returns the first response")]
# The file name, if not in ?filename= (what curl -T and browsers send).
XFilename = Annotated[str | None, Header(alias="X-Filename", max_length=255)]
ContentDisposition = Annotated[str | None, Header(
    alias="Content-Disposition", max_length=1000, description='`attachment; filename="m.pt2"`')]
LOCATION = {"Location": {"description": "URL of the new resource", "schema": {"type": "string"}}}
CREATED: dict[int | str, dict[str, Any]] = {
    201: {"description": "Stored and validated", "headers": LOCATION}, **UPLOAD}


@router.post("", status_code=201, response_model=ModelOut, responses=CREATED,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string",
                                                         "format": "binary"}}}}})
async def upload_model(request: Request, tenant: TenantDep, session: SessionDep,
                       store: StoreDep, settings: SettingsDep,
                       filename: Annotated[str | None, Query(max_length=255)] = None,
                       idempotency_key: IdemHeader = None, x_filename: XFilename = None,
                       content_disposition: ContentDisposition = None) -> Response:
    """Upload a `.pt2` (torch.export.save) or `.onnx` file as the raw request body."""
    fp = idem.fingerprint("POST", request.url.path, request.url.query)
    if idempotency_key:
        stored = await run_in_threadpool(idem.find, session, tenant.tenant_id, idempotency_key,
                                         fp)
        if stored is not None:
            return replay(stored)
    name = clean_filename(filename_from(filename, x_filename, content_disposition))
    return await store_upload(
        request, session, store, tenant.tenant_id, idempotency_key, fp, kind="model",
        name=name, cap_bytes=settings.max_model_bytes, settings=settings,
        detect_format=model_format,
        ingest=lambda path, fmt: ingest_model(session, store, settings, tenant.tenant_id, path,
                                              name, fmt),
        render=lambda row: ModelOut.model_validate(row).model_dump_json(),
        location_prefix="/v1/models")


@router.get("", response_model=ModelPage, responses=problems(*AUTHED))
def list_models(tenant: TenantDep, session: SessionDep,
                limit: Annotated[int, Query(ge=1, le=100)] = 20,
                cursor: str | None = None) -> ModelPage:
    try:
        rows, nxt = repo.list_page(session, tenant.tenant_id, limit, cursor)
    except CursorError as e:
        raise ValidationFailed(str(e)) from e
    return ModelPage(items=[ModelOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/{model_id}", response_model=ModelOut, responses=READ)
def get_model(model_id: str, tenant: TenantDep, session: SessionDep) -> ModelOut:
    row = repo.get(session, tenant.tenant_id, model_id)
    if row is None:
        raise NotFound(f"model {model_id} not found")
    return ModelOut.model_validate(row)
