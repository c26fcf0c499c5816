"""Object storage over the S3 API (MinIO in production, SeaweedFS locally)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import BinaryIO, cast

from minio import Minio
from minio.error import S3Error
from urllib3 import PoolManager

from shared.config import Settings

# Multipart part size: the most of one upload held in memory at once.
PART_SIZE = 8 * 1024 * 1024


class ObjectTooLarge(Exception):
    """The stream passed the size limit; nothing was kept in storage."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"object exceeds the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


class _HashingReader(io.RawIOBase):
    """Wraps a stream: hashes and counts what is read, and stops past `limit` bytes."""

    def __init__(self, source: BinaryIO, limit: int, prefix: bytes = b"") -> None:
        self._source = source
        self._pending = prefix
        self._limit = limit
        self.size = 0
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        want = PART_SIZE if size is None or size < 0 else size
        if self._pending:
            chunk, self._pending = self._pending[:want], self._pending[want:]
        else:
            chunk = self._source.read(want)
        self.size += len(chunk)
        if self.size > self._limit:
            raise ObjectTooLarge(self._limit)
        self.digest.update(chunk)
        return chunk


class ObjectStore:
    def __init__(self, settings: Settings, *, http_client: PoolManager | None = None) -> None:
        self.bucket = settings.s3_bucket
        self.client = Minio(
            settings.s3_host,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
            http_client=http_client,
        )

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as err:
                # Another process created it between our check and our call.
                if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def ping(self) -> None:
        """Raises unless the store answers and the bucket exists."""
        if not self.client.bucket_exists(self.bucket):
            raise RuntimeError(f"bucket {self.bucket!r} does not exist")

    def put_stream(
        self, key: str, stream: BinaryIO, *, content_type: str, limit: int, prefix: bytes = b""
    ) -> StoredObject:
        """Stream to storage in bounded parts, hashing on the way; `prefix` was read already."""
        reader = _HashingReader(stream, limit, prefix)
        try:
            self.client.put_object(
                self.bucket,
                key,
                cast(BinaryIO, reader),
                length=-1,
                part_size=PART_SIZE,
                content_type=content_type,
            )
        except ObjectTooLarge:
            self.delete(key)  # a multipart upload may have left a partial object behind
            raise
        return StoredObject(key=key, size=reader.size, sha256=reader.digest.hexdigest())

    def put_bytes(self, key: str, data: bytes, *, content_type: str) -> StoredObject:
        self.client.put_object(
            self.bucket, key, io.BytesIO(data), length=len(data), content_type=content_type
        )
        return StoredObject(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())

    def get_bytes(self, key: str) -> bytes:
        response = self.client.get_object(self.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return False
            raise
        return True
