"""Storage backends round-trip bytes with the right sha256, serve ranges, and never expose a
partially written object."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import Settings
from app.db.session import get_engine
from app.storage import ArtifactStore, StoreError
from app.storage.local import LocalStore
from app.storage.postgres import PostgresStore
from app.storage.s3 import PART_BYTES, S3Store
from tests.service.conftest import S3Target

pytestmark = pytest.mark.service

CHUNK = 64 * 1024  # small chunks in the postgres store: many rows, ranges crossing them


@pytest.fixture(params=["local", "postgres", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArtifactStore]:
    if request.param == "local":
        yield LocalStore(tmp_path / "store")
    elif request.param == "postgres":
        pg_url = request.getfixturevalue("pg_url")
        request.getfixturevalue("clean_db")
        yield PostgresStore(get_engine(pg_url), chunk_bytes=CHUNK)
    else:
        yield _s3_store(request.getfixturevalue("s3_target"))


def _s3_store(target: S3Target) -> S3Store:
    """The conftest's S3 target: MODELPRESS_TEST_S3_* if set, else a local moto_server."""
    return S3Store.from_settings(Settings(
        s3_endpoint_url=target.endpoint, s3_bucket=target.bucket,
        s3_access_key_id=target.access_key_id, s3_secret_access_key=target.secret_access_key,
        s3_region=target.region, s3_prefix="modelpress-test"))


@pytest.fixture
def s3_store(s3_target: S3Target) -> S3Store:
    return _s3_store(s3_target)


def _pieces(data: bytes, sizes: tuple[int, ...] = (1, 1000, 70_000, 3)) -> Iterator[bytes]:
    """Uneven chunk sizes, so the store must regroup them."""
    i, k = 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        yield data[i:i + n]
        i, k = i + n, k + 1


def test_round_trip_sha256_and_ranges(store: ArtifactStore) -> None:
    data = os.urandom(300_001)  # > 4 postgres chunks, odd size
    size, sha = store.put_stream("jobs/j1/model.onnx", _pieces(data))
    assert size == len(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.exists("jobs/j1/model.onnx")
    assert b"".join(store.open("jobs/j1/model.onnx")) == data
    for start, end in [(0, 10), (CHUNK - 5, CHUNK + 5), (CHUNK, 2 * CHUNK),
                       (len(data) - 3, None), (123, 123 + 4 * CHUNK), (5, 5)]:
        got = b"".join(store.open("jobs/j1/model.onnx", start, end))
        assert got == data[start:end], (start, end)
    # Overwrite replaces the whole object.
    size2, sha2 = store.put_stream("jobs/j1/model.onnx", [b"abc"])
    assert (size2, b"".join(store.open("jobs/j1/model.onnx"))) == (3, b"abc")
    assert sha2 == hashlib.sha256(b"abc").hexdigest()
    store.delete("jobs/j1/model.onnx")
    assert not store.exists("jobs/j1/model.onnx")
    store.delete("jobs/j1/model.onnx")  # deleting a missing key is fine
    with pytest.raises(StoreError):
        list(store.open("jobs/j1/model.onnx"))


def test_failed_write_leaves_nothing(store: ArtifactStore) -> None:
    def broken() -> Iterator[bytes]:
        yield os.urandom(200_000)
        raise OSError("client went away")

    with pytest.raises(OSError, match="client went away"):
        store.put_stream("models/t/m/model.pt2", broken())
    assert not store.exists("models/t/m/model.pt2")


def test_delete_prefix_removes_one_directory_only(store: ArtifactStore) -> None:
    """What a retried job attempt uses to drop an earlier attempt's bytes: everything under
    the prefix goes, a sibling whose name merely starts the same stays."""
    for key in ("jobs/j1/attempt-1/model.onnx", "jobs/j1/attempt-1/sub/x.bin",
                "jobs/j1/attempt-10/model.onnx", "jobs/j1/attempt-2/model.onnx"):
        store.put_stream(key, [key.encode()])
    assert store.delete_prefix("jobs/j1/attempt-1/") == 2
    assert not store.exists("jobs/j1/attempt-1/model.onnx")
    assert not store.exists("jobs/j1/attempt-1/sub/x.bin")
    assert store.exists("jobs/j1/attempt-10/model.onnx")
    assert store.exists("jobs/j1/attempt-2/model.onnx")
    assert store.delete_prefix("jobs/j1/attempt-1/") == 0  # nothing left: not an error
    with pytest.raises(StoreError):
        store.delete_prefix("jobs/j1/attempt-1")  # no trailing "/": would match attempt-10
    with pytest.raises(StoreError):
        store.delete_prefix("../")


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", "a/./b", "", "a\\b"])
def test_bad_keys_refused(store: ArtifactStore, key: str) -> None:
    with pytest.raises(StoreError):
        store.put_stream(key, [b"x"])


def test_local_store_leaves_no_temp_files(tmp_path: Path) -> None:
    s = LocalStore(tmp_path / "store")
    s.put_stream("a/b.bin", [b"1" * 10])
    with pytest.raises(RuntimeError):
        s.put_stream("a/c.bin", (b"x" if i < 3 else (_ for _ in ()).throw(RuntimeError())
                                 for i in range(5)))
    assert sorted(p.name for p in (tmp_path / "store" / "a").iterdir()) == ["b.bin"]


def test_s3_multipart_round_trip_and_abort(s3_store: S3Store) -> None:
    """Objects above one 8 MiB part go through multipart upload; a failed one is aborted."""
    store = s3_store
    data = os.urandom(2 * PART_BYTES + 12345)  # three parts, the last one short
    size, sha = store.put_stream("big/blob.bin", _pieces(data, (3_000_000, 5, 777_777)))
    assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    assert b"".join(store.open("big/blob.bin", PART_BYTES - 3, PART_BYTES + 3)) == data[
        PART_BYTES - 3:PART_BYTES + 3]
    assert hashlib.sha256(b"".join(store.open("big/blob.bin"))).hexdigest() == sha
    store.delete("big/blob.bin")

    def broken() -> Iterator[bytes]:
        yield os.urandom(PART_BYTES + 1)
        yield os.urandom(PART_BYTES)
        raise OSError("client went away")

    with pytest.raises(OSError):
        store.put_stream("big/broken.bin", broken())
    assert not store.exists("big/broken.bin")
    pending = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    assert [u for u in pending if u["Key"].endswith("big/broken.bin")] == []
