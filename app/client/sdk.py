"""Python client for the ModelPress REST API (httpx). Uses the wire contracts of ``app.schemas``
and nothing else of the server, so it can ship on its own.

    >>> from app.client.sdk import Client
    >>> with Client("http://127.0.0.1:8000", key) as mp:        # doctest: +SKIP
    ...     model = mp.upload_model("examples/out/model.pt2")
    ...     data = mp.upload_dataset("examples/out/data.npz", model.id)
    ...     job = mp.submit(JobCreate(model_id=model.id, dataset_id=data.id,
    ...                               constraints=ConstraintsIn(max_size_mb=2)))
    ...     job = mp.wait(job.id)
    ...     mp.download(job.id, "model.onnx", Path("out"))
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from pydantic import ValidationError

from app.schemas.common import ErrorCode, Problem
from app.schemas.datasets import DatasetOut, DatasetPage
from app.schemas.jobs import ArtifactList, JobCreate, JobOut, JobPage, JobReport
from app.schemas.models import ModelOut, ModelPage

DEFAULT_URL = "http://127.0.0.1:8000"
# Where ``modelpress serve`` saves the development key (Settings.dev_key_file's default).
DEFAULT_KEY_FILE = Path("var/dev-api-key")
CHUNK_BYTES = 1024 * 1024  # upload / download buffer: bounded memory for any file size
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class ApiError(Exception):
    """A problem (RFC 9457) answered by the server, or a transport failure (status 0)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(f"{problem.title} ({problem.status} {problem.code})"
                         + (f": {problem.detail}" if problem.detail else ""))
        self.problem = problem

    @property
    def status(self) -> int:
        return self.problem.status

    @property
    def code(self) -> str:
        return self.problem.code


def resolve_url(url: str | None = None) -> str:
    return (url or os.environ.get("MODELPRESS_URL") or DEFAULT_URL).rstrip("/")


def resolve_key(key: str | None = None) -> str | None:
    """--key, else MODELPRESS_API_KEY, else the dev key file the embedded server wrote."""
    if key:
        return key
    if env := os.environ.get("MODELPRESS_API_KEY"):
        return env
    path = Path(os.environ.get("MODELPRESS_DEV_KEY_FILE") or DEFAULT_KEY_FILE)
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _file_chunks(path: Path, progress: Callable[[int], None] | None) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            if progress is not None:
                progress(len(chunk))
            yield chunk


def _problem_from(resp: httpx.Response) -> Problem:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "code" in body:
        body.setdefault("title", resp.reason_phrase)
        body.setdefault("status", resp.status_code)
        try:
            return Problem.model_validate(body)
        except ValidationError:
            # A code this client does not know yet (a newer server): keep its words.
            detail = f"{body.get('code')}: {body.get('detail')}"
            return Problem(title=str(body["title"]), status=resp.status_code,
                           code=ErrorCode.http_error, detail=detail)
    text = resp.text[:500]
    return Problem(title=resp.reason_phrase or "HTTP error", status=resp.status_code,
                   code=ErrorCode.http_error, detail=text or None)


class Client:
    """One API key, one server. Every method raises :class:`ApiError` on a problem answer."""

    def __init__(self, url: str | None = None, key: str | None = None, *,
                 timeout_s: float = 60.0, transport: httpx.BaseTransport | None = None) -> None:
        self.url = resolve_url(url)
        self.key = resolve_key(key)
        headers = {"User-Agent": "modelpress-client/0.1"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        # Uploads and downloads can be long: the read timeout is per chunk, not per request.
        self._http = httpx.Client(base_url=self.url, headers=headers, transport=transport,
                                  timeout=httpx.Timeout(timeout_s, connect=10.0))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- plumbing --------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ApiError(Problem(title="Connection failed", status=0, code=ErrorCode.unreachable,
                                   detail=f"{self.url}: {e}")) from e
        if resp.status_code >= 400:
            raise ApiError(_problem_from(resp))
        return resp

    def _upload(self, path: str, file: Path, params: dict[str, str],
                idempotency_key: str | None,
                progress: Callable[[int], None] | None) -> httpx.Response:
        size = file.stat().st_size
        # Content-Length lets the server refuse an oversized body before reading it (413).
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return self._request("POST", path, params={"filename": file.name, **params},
                             content=_file_chunks(file, progress), headers=headers,
                             timeout=httpx.Timeout(600.0, connect=10.0))

    # --- models and data -------------------------------------------------------------------

    def upload_model(self, file: str | Path, *, idempotency_key: str | None = None,
                     progress: Callable[[int], None] | None = None) -> ModelOut:
        """Stream a ``.pt2`` or ``.onnx`` file; the server validates it before answering."""
        resp = self._upload("/v1/models", Path(file), {}, idempotency_key, progress)
        return ModelOut.model_validate_json(resp.content)

    def upload_dataset(self, file: str | Path, model_id: str, *,
                       idempotency_key: str | None = None,
                       progress: Callable[[int], None] | None = None) -> DatasetOut:
        """Stream a ``.npz`` / ``.safetensors`` file, validated against ``model_id``'s inputs."""
        resp = self._upload("/v1/datasets", Path(file), {"model_id": model_id},
                            idempotency_key, progress)
        return DatasetOut.model_validate_json(resp.content)

    def get_model(self, model_id: str) -> ModelOut:
        return ModelOut.model_validate_json(self._request("GET", f"/v1/models/{model_id}").content)

    def list_models(self, limit: int = 20, cursor: str | None = None) -> ModelPage:
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        return ModelPage.model_validate_json(
            self._request("GET", "/v1/models", params=params).content)

    def get_dataset(self, dataset_id: str) -> DatasetOut:
        return DatasetOut.model_validate_json(
            self._request("GET", f"/v1/datasets/{dataset_id}").content)

    def list_datasets(self, limit: int = 20, cursor: str | None = None) -> DatasetPage:
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        return DatasetPage.model_validate_json(
            self._request("GET", "/v1/datasets", params=params).content)

    # --- jobs ------------------------------------------------------------------------------

    def submit(self, body: JobCreate, *, idempotency_key: str | None = None) -> JobOut:
        headers = {"Content-Type": "application/json"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        resp = self._request("POST", "/v1/jobs", headers=headers,
                             content=body.model_dump_json(exclude_unset=True).encode())
        return JobOut.model_validate_json(resp.content)

    def get_job(self, job_id: str) -> JobOut:
        return JobOut.model_validate_json(self._request("GET", f"/v1/jobs/{job_id}").content)

    def list_jobs(self, status: str | None = None, limit: int = 20,
                  cursor: str | None = None) -> JobPage:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        return JobPage.model_validate_json(self._request("GET", "/v1/jobs", params=params).content)

    def cancel(self, job_id: str) -> JobOut:
        return JobOut.model_validate_json(
            self._request("POST", f"/v1/jobs/{job_id}:cancel").content)

    def report(self, job_id: str) -> JobReport:
        """The job's result (also there for a job that failed ``constraints_unsatisfiable``)."""
        return JobReport.model_validate_json(
            self._request("GET", f"/v1/jobs/{job_id}/report").content)

    def artifacts(self, job_id: str) -> ArtifactList:
        return ArtifactList.model_validate_json(
            self._request("GET", f"/v1/jobs/{job_id}/artifacts").content)

    def wait(self, job_id: str, *, poll_s: float = 0.5, timeout_s: float | None = None,
             on_update: Callable[[JobOut], None] | None = None) -> JobOut:
        """Poll until the job is succeeded, failed or cancelled (or ``timeout_s`` passes,
        which raises TimeoutError). ``on_update`` sees every polled state."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)
            if on_update is not None:
                on_update(job)
            if job.status in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout_s} s")
            time.sleep(poll_s)

    def download(self, job_id: str, name: str, out_dir: str | Path, *,
                 progress: Callable[[int, int | None], None] | None = None) -> Path:
        """Stream artifact ``name`` into ``out_dir`` and check its sha256 against the ETag.

        Written to a temporary name first: a truncated or corrupt file never appears under
        the real name. Returns the final path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        final = out / Path(name).name
        tmp = out / f".{final.name}.part"
        digest, done = hashlib.sha256(), 0
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}",
                                   timeout=httpx.Timeout(600.0, connect=10.0)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise ApiError(_problem_from(resp))
                etag = resp.headers.get("etag", "").removeprefix("W/").strip('"')
                length = resp.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                with tmp.open("wb") as f:
                    for chunk in resp.iter_bytes(CHUNK_BYTES):
                        f.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
        except httpx.TransportError as e:
            tmp.unlink(missing_ok=True)
            raise ApiError(Problem(title="Connection failed", status=0, code=ErrorCode.unreachable,
                                   detail=f"{self.url}: {e}")) from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        got = digest.hexdigest()
        if not etag or got != etag:
            tmp.unlink(missing_ok=True)
            raise ApiError(Problem(
                title="Checksum mismatch", status=0, code=ErrorCode.checksum_mismatch,
                detail=f"{name}: sha256 {got} does not match the ETag {etag or '(none)'}"))
        tmp.replace(final)
        return final
