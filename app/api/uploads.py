"""Stream a raw request body to a temp file with a byte cap, hashing on the way."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from app.errors import PayloadTooLarge, UnsupportedMediaType

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


def filename_from(request: Request, query_name: str | None) -> str | None:
    if query_name:
        return query_name
    if name := request.headers.get("x-filename"):
        return name
    cd = request.headers.get("content-disposition", "")
    for part in cd.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "filename" and value:
            return value.strip('"')
    return None


async def receive_to_file(request: Request, cap_bytes: int, tmp_dir: Path | None,
                          suffix: str = "") -> Received:
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith(("multipart/", "application/x-www-form-urlencoded")):
        # A form would be stored as its envelope and fail validation with a confusing message.
        raise UnsupportedMediaType("send the file as the raw request body "
                                   "(Content-Type: application/octet-stream), not as a form")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap_bytes:
        raise PayloadTooLarge(f"body of {int(declared)} bytes exceeds the limit of "
                              f"{cap_bytes} bytes")
    if tmp_dir is not None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="upload-", dir=tmp_dir)) / f"upload{suffix}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    digest, size, head = hashlib.sha256(), 0, b""
    buf = bytearray()
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                if not chunk:
                    continue
                size += len(chunk)
                if size > cap_bytes:
                    raise PayloadTooLarge(f"body exceeds the limit of {cap_bytes} bytes")
                if len(head) < 64:
                    head += chunk[: 64 - len(head)]
                buf += chunk
                if len(buf) >= WRITE_BYTES:
                    data = bytes(buf)
                    buf.clear()
                    # Hash + write off the event loop: a 1 GiB upload must not stall others.
                    await run_in_threadpool(_consume, f, digest, data)
            if buf:
                await run_in_threadpool(_consume, f, digest, bytes(buf))
    except BaseException:
        shutil.rmtree(path.parent, ignore_errors=True)
        raise
    return Received(path=path, size=size, sha256=digest.hexdigest(), head=head)


def _consume(f: object, digest: object, data: bytes) -> None:
    f.write(data)  # type: ignore[attr-defined]
    digest.update(data)  # type: ignore[attr-defined]
