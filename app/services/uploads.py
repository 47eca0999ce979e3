"""Model and data-set ingestion: validate an uploaded temp file, store its bytes, record it.

Order matters for "nothing half-written": validate first (no bytes stored for a bad file),
then store the bytes, then add the row; if the row (or the caller's commit) fails, the bytes
are deleted again (see ``discard``).
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy.orm import Session

from app.config import Settings
from app.db.base import new_id
from app.db.models import Dataset, Model
from app.db.repositories import datasets as dataset_repo
from app.db.repositories import models as model_repo
from app.engine.errors import InvalidData, InvalidModel
from app.engine.types import TensorSpec
from app.errors import NotFound, ValidationFailed
from app.services import quotas
from app.storage import ArtifactStore, file_chunks

MODEL_SUFFIXES = {".pt2": "pt2", ".onnx": "onnx"}
DATA_SUFFIXES = {".npz": "npz", ".safetensors": "safetensors"}
ZIP_MAGIC = b"PK\x03\x04"

log = logging.getLogger(__name__)


def clean_filename(name: str | None) -> str | None:
    if not name:
        return None
    base = PurePosixPath(name.replace("\\", "/")).name.strip()
    if base in ("", ".", ".."):
        return None
    return base[:255]


def model_format(filename: str | None, head: bytes) -> str:
    """Format from the file name, or sniffed (a .pt2 is a zip archive) when there is none."""
    if filename:
        fmt = MODEL_SUFFIXES.get(PurePosixPath(filename).suffix.lower())
        if fmt is None:
            raise InvalidModel(f"unsupported model file {filename!r}: send a .pt2 "
                               "(torch.export.save) or .onnx file")
        return fmt
    return "pt2" if head.startswith(ZIP_MAGIC) else "onnx"


def data_format(filename: str | None, head: bytes) -> str:
    if filename:
        fmt = DATA_SUFFIXES.get(PurePosixPath(filename).suffix.lower())
        if fmt is None:
            raise InvalidData(f"unsupported data file {filename!r}: send .npz or .safetensors")
        return fmt
    return "npz" if head.startswith(ZIP_MAGIC) else "safetensors"


def specs(rows: list[Any]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(r["name"], tuple(r["shape"]), r["dtype"]) for r in rows)


def _spec_dicts(items: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
    return [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in items]


def ingest_model(session: Session, store: ArtifactStore, settings: Settings, tenant_id: str,
                 path: Path, filename: str | None, fmt: str) -> Model:
    """Inspect ``path`` in the sandbox, store it, add the row (flushed, not committed)."""
    from app.engine.formats.sandbox import inspect_model

    # An upload is one file: an ONNX model may not refer to external data files.
    info = inspect_model(path, timeout_s=settings.inspect_timeout_s,
                         memory_mb=settings.inspect_memory_mb, network=settings.sandbox_network,
                         onnx_external_data=False, tmp_dir=settings.tmp_dir)
    model_id = new_id()
    key = f"models/{tenant_id}/{model_id}/model.{fmt}"
    size, sha = store.put_stream(key, file_chunks(path))
    try:
        row = model_repo.add(session, Model(
            id=model_id, tenant_id=tenant_id, filename=filename or f"model.{fmt}",
            format=info.format, inputs=_spec_dicts(info.inputs),
            outputs=_spec_dicts(info.outputs), parameters=info.parameters, sha256=sha,
            size_bytes=size, storage_key=key))
        quotas.check_stored_bytes(session, settings, tenant_id)
        return row
    except BaseException:
        store.delete(key)
        raise


def ingest_dataset(session: Session, store: ArtifactStore, settings: Settings, tenant_id: str,
                   path: Path, filename: str | None, fmt: str, model_id: str | None) -> Dataset:
    """Validate ``path`` against the model's inputs, store it, add the row."""
    from app.engine.formats.sandbox import inspect_data_file

    if not model_id:
        raise ValidationFailed("model_id is required: the data is validated against the "
                               "inputs of that model")
    model = model_repo.get(session, tenant_id, model_id)
    if model is None:
        raise NotFound(f"model {model_id} not found")
    # Parsed in the loader sandbox: a hostile file can exhaust only the child, not the API.
    info = inspect_data_file(path, specs(model.inputs), timeout_s=settings.inspect_timeout_s,
                             memory_mb=settings.inspect_memory_mb,
                             network=settings.sandbox_network, tmp_dir=settings.tmp_dir)
    dataset_id = new_id()
    key = f"datasets/{tenant_id}/{dataset_id}/data.{fmt}"
    size, sha = store.put_stream(key, file_chunks(path))
    try:
        ds = dataset_repo.add(session, Dataset(
            id=dataset_id, tenant_id=tenant_id, model_id=model.id,
            filename=filename or f"data.{fmt}", format=fmt, samples=info.samples,
            inputs=_spec_dicts(info.inputs), has_labels=info.has_labels,
            num_classes=info.num_classes, sha256=sha, size_bytes=size, storage_key=key))
        quotas.check_stored_bytes(session, settings, tenant_id)
        return ds
    except BaseException:
        store.delete(key)
        raise


def discard(store: ArtifactStore, key: str) -> None:
    """Best-effort delete of stored bytes whose row did not commit."""
    try:
        store.delete(key)
    except Exception:
        log.warning("could not delete orphan bytes %s", key, exc_info=True)
