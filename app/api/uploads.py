"""Stream a raw request body to a temp file with a byte cap, hashing on the way."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from fastapi import Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from app.api.idempotency import commit_and_remember
from app.api.metrics import UPLOAD_BYTES
from app.config import Settings
from app.errors import (
    ContentLengthMismatch,
    PayloadTooLarge,
    QuotaExceeded,
    RequestTimeout,
    UnsupportedMediaType,
)
from app.services import quotas
from app.services.idempotency import StoredResponse
from app.services.uploads import discard
from app.storage import ArtifactStore

DEFAULT_STEMS = {"model": "model", "dataset": "data"}
WRITE_BYTES = 1024 * 1024  # buffer this much before a write: fewer syscalls, bounded memory


@dataclass
class Received:
    """A streamed upload in its own temp directory (``discard`` removes both)."""

    path: Path
    size: int
    sha256: str
    head: bytes  # first bytes, to sniff the format when there is no file name

    def rename(self, name: str) -> Path:
        """Give the file its user-facing name (error messages of the loaders quote it)."""
        target = self.path.with_name(name)
        self.path = self.path.rename(target)
        return self.path

    def discard(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)


def filename_from(query_name: str | None, x_filename: str | None,
                  content_disposition: str | None) -> str | None:
    """The upload's file name: ``?filename=``, else ``X-Filename``, else the
    ``Content-Disposition`` ``filename`` parameter (the routes declare all three)."""
    if query_name:
        return query_name
    if x_filename:
        return x_filename
    for part in (content_disposition or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "filename" and value:
            return value.strip('"')
    return None


async def receive_to_file(request: Request, cap_bytes: int, tmp_dir: Path | None,
                          suffix: str = "", *, idle_timeout_s: float | None = None,
                          quota_bytes: int | None = None) -> Received:
    """Stream the body to a new temp file: at most ``cap_bytes`` (413 ``payload_too_large``)
    and ``quota_bytes`` (the tenant's remaining quota: 413 ``quota_exceeded``), exactly the
    declared ``Content-Length`` if any (400 ``content_length_mismatch``), and no gap longer than
    ``idle_timeout_s`` between two chunks (408 ``upload_timeout``). Any refusal removes the temp
    file before the error leaves."""
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith(("multipart/", "application/x-www-form-urlencoded")):
        # A form would be stored as its envelope and fail validation with a confusing message.
        raise UnsupportedMediaType("send the file as the raw request body "
                                   "(Content-Type: application/octet-stream), not as a form")
    raw_length = request.headers.get("content-length")
    declared = int(raw_length) if raw_length is not None and raw_length.isdigit() else None
    if declared is not None and declared > cap_bytes:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of "
                              f"{cap_bytes} bytes")
    if declared is not None and quota_bytes is not None and declared > quota_bytes:
        raise _over_quota(quota_bytes)
    if tmp_dir is not None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="upload-", dir=tmp_dir)) / f"upload{suffix}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    digest, size, head = hashlib.sha256(), 0, b""
    buf = bytearray()
    chunks = request.stream().__aiter__()
    try:
        with os.fdopen(fd, "wb") as f:
            while True:
                try:
                    with anyio.fail_after(idle_timeout_s or None):  # 0 = no timeout
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise RequestTimeout(f"no body bytes for {idle_timeout_s} s after {size} "
                                         "bytes; upload refused") from None
                except ClientDisconnect:
                    raise ContentLengthMismatch(
                        f"the client went away after {size} bytes"
                        + (f" of {declared}" if declared is not None else "")) from None
                if not chunk:
                    continue
                size += len(chunk)
                if size > cap_bytes:
                    raise PayloadTooLarge(f"body exceeds the limit of {cap_bytes} bytes")
                if quota_bytes is not None and size > quota_bytes:
                    raise _over_quota(quota_bytes)
                if declared is not None and size > declared:
                    raise ContentLengthMismatch(f"body longer than its Content-Length of "
                                                f"{declared} bytes")
                if len(head) < 64:
                    head += chunk[: 64 - len(head)]
                buf += chunk
                if len(buf) >= WRITE_BYTES:
                    data = bytes(buf)
                    buf.clear()
                    # Hash + write off the event loop: a 1 GiB upload must not stall others.
                    await run_in_threadpool(_consume, f, digest, data)
            if declared is not None and size != declared:
                raise ContentLengthMismatch(f"body of {size} bytes is shorter than its "
                                            f"Content-Length of {declared} bytes (truncated)")
            if buf:
                await run_in_threadpool(_consume, f, digest, bytes(buf))
    except BaseException:
        shutil.rmtree(path.parent, ignore_errors=True)
        raise
    return Received(path=path, size=size, sha256=digest.hexdigest(), head=head)


def _over_quota(quota_bytes: int) -> QuotaExceeded:
    return QuotaExceeded(f"this upload would exceed the tenant's stored-bytes quota "
                         f"({quota_bytes} bytes left)", status=413)


def _consume(f: object, digest: object, data: bytes) -> None:
    f.write(data)  # type: ignore[attr-defined]
    digest.update(data)  # type: ignore[attr-defined]


async def store_upload(
    request: Request,
    session: Session,
    store: ArtifactStore,
    tenant_id: str,
    idempotency_key: str | None,
    fp: str,
    *,
    kind: str,  # metrics label, and the file stem when the client sent no name
    name: str | None,
    cap_bytes: int,
    settings: Settings,
    detect_format: Callable[[str | None, bytes], str],
    ingest: Callable[[Path, str], Any],
    render: Callable[[Any], str],
    location_prefix: str,
) -> Response:
    """The shared body of the upload routes: stream, sniff, ingest, commit, answer 201.

    ``ingest(path, fmt)`` validates and stores the file and adds its row (flushed, not
    committed); ``render(row)`` gives the JSON body. The commit goes with the idempotency
    record; if it fails, the stored bytes are deleted, so nothing is left half-written.
    """
    def allowance() -> int | None:
        try:
            return quotas.upload_allowance(session, settings, tenant_id)
        finally:
            session.rollback()  # no transaction left open while the body streams

    received = await receive_to_file(request, cap_bytes, settings.tmp_dir,
                                     idle_timeout_s=settings.upload_idle_timeout_s,
                                     quota_bytes=await run_in_threadpool(allowance))
    UPLOAD_BYTES.labels(kind).inc(received.size)
    try:
        fmt = detect_format(name, received.head)
        path = received.rename(name or f"{DEFAULT_STEMS.get(kind, kind)}.{fmt}")

        def work() -> StoredResponse:
            try:
                row = ingest(path, fmt)
            except BaseException:
                session.rollback()
                raise
            out = StoredResponse(201, render(row), {"Location": f"{location_prefix}/{row.id}"})
            resp, _ = commit_and_remember(session, tenant_id, idempotency_key, fp, out,
                                          undo=lambda: discard(store, row.storage_key))
            return resp

        result = await run_in_threadpool(work)
    finally:
        received.discard()
    return Response(result.body, status_code=result.status_code, headers=result.headers,
                    media_type="application/json")
