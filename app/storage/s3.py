"""S3-compatible store (boto3): multipart upload hashed on the way, ranged GET on read.

An object appears only when ``complete_multipart_upload`` succeeds, so readers never see a
partial object; a failed upload is aborted so its parts are not billed forever.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

from app.config import Settings
from app.storage.base import StoreError, check_key, check_prefix, rechunk

PART_BYTES = 8 * 1024 * 1024  # S3 minimum part size is 5 MiB (except the last)


class S3Store:
    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Store:
        import boto3

        if not settings.s3_bucket:
            raise ValueError("MODELPRESS_S3_BUCKET is required for the s3 storage backend")
        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key,
        )
        return cls(client, settings.s3_bucket, settings.s3_prefix)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        k = self._key(key)
        digest, size = hashlib.sha256(), 0
        parts = rechunk(chunks, PART_BYTES)
        first = next(parts, b"")
        second = next(parts, None)
        digest.update(first)
        size += len(first)
        if second is None:  # small object: one PUT
            self.client.put_object(Bucket=self.bucket, Key=k, Body=first)
            return size, digest.hexdigest()
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=k)["UploadId"]
        try:
            done: list[dict[str, Any]] = []

            def send(n: int, body: bytes) -> None:
                r = self.client.upload_part(Bucket=self.bucket, Key=k, UploadId=upload_id,
                                            PartNumber=n, Body=body)
                done.append({"PartNumber": n, "ETag": r["ETag"]})

            send(1, first)
            pending: bytes | None = second
            n = 2
            for piece in parts:
                assert pending is not None
                digest.update(pending)
                size += len(pending)
                send(n, pending)
                n += 1
                pending = piece
            assert pending is not None
            digest.update(pending)
            size += len(pending)
            send(n, pending)
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=k, UploadId=upload_id, MultipartUpload={"Parts": done})
        except BaseException:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=k, UploadId=upload_id)
            raise
        return size, digest.hexdigest()

    def open(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        k = self._key(key)
        if end is not None and end <= start:
            return iter(())
        rng = f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=k, Range=rng)
        except self.client.exceptions.NoSuchKey as e:
            raise StoreError(f"no object {key!r}") from e
        body = obj["Body"]

        def read() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(1024 * 1024)
            finally:
                body.close()

        return read()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def delete_prefix(self, prefix: str) -> int:
        full = self._key(check_prefix(prefix)[:-1]) + "/"
        n = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:  # at most 1000 per page, the delete_objects limit
                self.client.delete_objects(Bucket=self.bucket,
                                           Delete={"Objects": keys, "Quiet": True})
                n += len(keys)
        return n
