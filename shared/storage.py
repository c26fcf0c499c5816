"""Object storage over the S3 API (MinIO in production, SeaweedFS locally), and the layout of
every key the system writes."""

from __future__ import annotations

import hashlib
import io
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, cast

from minio import Minio
from minio.credentials.credentials import Credentials
from minio.deleteobjects import DeleteError, DeleteObject
from minio.error import S3Error
from minio.helpers import DictType
from urllib3 import PoolManager

from shared.config import Settings

# Multipart part size: the most of one upload held in memory at once.
PART_SIZE = 8 * 1024 * 1024
# Requests sent side by side (an erasure lists each image's heatmaps, then deletes): under
# the client's connection pool of 10 per host.
STORE_THREADS = 8
DELETES_PER_REQUEST = 1000  # the most S3 DeleteObjects takes


class Keys:
    """Where each kind of object lives. Nothing else spells a key.

    Uploaded images live under `UPLOADS`, and only they do: the orphan sweep deletes any
    object there that no image row names. Derived objects live under the id of the image
    (previews, heatmaps) or study (DICOM results) they belong to, and the orphan sweep
    deletes those whose image or study is gone (erased). Model files live elsewhere.
    """

    UPLOADS = "tenants/"
    PREVIEWS = "previews/"
    HEATMAPS = "heatmaps/"
    DICOM_RESULTS = "dicom-results/"

    @staticmethod
    def image(tenant_id: uuid.UUID, batch_id: uuid.UUID, image_id: uuid.UUID) -> str:
        """An uploaded image's de-identified copy."""
        return f"{Keys.UPLOADS}{tenant_id}/batches/{batch_id}/images/{image_id}"

    @staticmethod
    def heatmap(image_id: uuid.UUID, model_version_id: uuid.UUID) -> str:
        """The greyscale per-position probability map (0..1 as 0..255) at 1/4 size."""
        return f"{Keys.HEATMAPS}{image_id}/{model_version_id}.png"

    @staticmethod
    def heatmap_overlay(image_id: uuid.UUID, model_version_id: uuid.UUID) -> str:
        """The same map as a transparent colour overlay, as viewers lay it on the image."""
        return f"{Keys.HEATMAPS}{image_id}/{model_version_id}-overlay.png"

    @staticmethod
    def preview(image_id: uuid.UUID) -> str:
        """The image as an 8-bit PNG at 1/4 size, written when it is screened."""
        return f"{Keys.PREVIEWS}{image_id}.png"

    @staticmethod
    def dicom_result(study_id: uuid.UUID, kind: str, image_id: uuid.UUID | None) -> str:
        """An exam's DICOM result (report, heatmap, capture), de-identified as rendered."""
        return f"{Keys.DICOM_RESULTS}{study_id}/{kind}-{image_id or 'exam'}.dcm"

    @staticmethod
    def heatmaps_of(image_id: uuid.UUID) -> str:
        """The prefix of every version's heatmaps of an image."""
        return f"{Keys.HEATMAPS}{image_id}/"

    @staticmethod
    def dicom_results_of(study_id: uuid.UUID) -> str:
        """The prefix of an exam's DICOM results."""
        return f"{Keys.DICOM_RESULTS}{study_id}/"

    @staticmethod
    def owner_id(key: str) -> uuid.UUID | None:
        """The image (previews, heatmaps) or study (DICOM results) id a derived object's key
        names; None for a key that is not one."""
        for prefix in (Keys.PREVIEWS, Keys.HEATMAPS, Keys.DICOM_RESULTS):
            if key.startswith(prefix):
                name = key[len(prefix) :].split("/", 1)[0].removesuffix(".png")
                try:
                    return uuid.UUID(name)
                except ValueError:
                    return None
        return None

    @staticmethod
    def training_checkpoint(run_id: uuid.UUID, epoch: int) -> str:
        return f"training/{run_id}/checkpoint-epoch{epoch:04d}.pt"

    @staticmethod
    def model_checkpoint(name: str) -> str:
        return f"models/{name}/checkpoint.pt"


MISSING_OBJECT_CODES = ("NoSuchKey", "NoSuchObject", "ResourceNotFound")


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


class ObjectsNotDeleted(Exception):
    """The store refused to delete some of the objects asked for (the rest are gone)."""


class StreamEndedEarly(Exception):
    """The stream ended before the length its caller gave; nothing was kept in storage."""


class _HashingReader(io.RawIOBase):
    """Wraps a stream: hashes and counts what is read, and stops past `limit` bytes. `prefix`
    comes first; of the stream, at most `length` bytes in all are read when it is given."""

    def __init__(
        self, source: BinaryIO, limit: int, prefix: bytes = b"", length: int | None = None
    ) -> None:
        self._source = source
        self._pending = prefix
        self._limit = limit
        self._length = length
        self.size = 0
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        want = PART_SIZE if size is None or size < 0 else size
        if self._length is not None:
            want = min(want, self._length - self.size)
        chunk, self._pending = self._pending[:want], self._pending[want:]
        if len(chunk) < want:
            # One piece per read: the store's client joins what it reads into a part.
            chunk += self._source.read(want - len(chunk))
            if not chunk and want > 0 and self._length is not None:
                raise StreamEndedEarly(f"{self.size} of {self._length} bytes")
        first = self.size == 0
        self.size += len(chunk)
        if self.size > self._limit:
            raise ObjectTooLarge(self._limit)
        self.digest.update(chunk)
        if first:
            # The store's client sends this piece as it is when it is the whole body (an
            # object of one part): it then signs it with this hash instead of hashing it again.
            payloads = _SignsWithKnownHash.payloads
            payloads.body, payloads.sha256 = chunk, self.digest.hexdigest()
        return chunk


class _Payloads(threading.local):
    """The SHA-256 of a request body this thread is about to send, where its caller computed
    it already (for the record) while reading it."""

    body: bytes | None = None
    sha256: str | None = None


class _SignsWithKnownHash(Minio):
    """minio's client, which over plain HTTP hashes every request body again to sign it
    (`x-amz-content-sha256`). The body of an object written by `put_stream` or `put_bytes` was
    hashed once already for its record: that hash signs it, so each byte is hashed once. Over
    TLS minio sends UNSIGNED-PAYLOAD and hashes nothing; that path is left as it is."""

    payloads = _Payloads()

    def _build_headers(
        self,
        host: str,
        headers: DictType | None = None,
        body: bytes | None = None,
        creds: Credentials | None = None,
    ) -> tuple[DictType, datetime]:
        known = self.payloads
        if body is None or body is not known.body or creds is None or self._base_url.is_https:
            return super()._build_headers(host, headers, body, creds)
        # Built as for an empty body, then given this body's length and hash: the same headers
        # minio would build, without its second pass over the bytes.
        headers, date = super()._build_headers(host, headers, None, creds)
        headers["Content-Length"] = str(len(body))
        headers["x-amz-content-sha256"] = cast(str, known.sha256)
        return headers, date


class ObjectStore:
    def __init__(self, settings: Settings, *, http_client: PoolManager | None = None) -> None:
        self.bucket = settings.s3_bucket
        self.client: Minio = _SignsWithKnownHash(
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
        self,
        key: str,
        stream: BinaryIO,
        *,
        content_type: str,
        limit: int,
        prefix: bytes = b"",
        length: int | None = None,
    ) -> StoredObject:
        """Stream to storage in bounded parts, hashing on the way: `prefix` first, then the
        stream, to its end or to `length` bytes in all (prefix included) where the caller
        knows the size (then an object of one part is sent in one request, read once); a
        stream that ends before that raises StreamEndedEarly."""
        if length is not None and length > limit:
            raise ObjectTooLarge(limit)
        reader = _HashingReader(stream, limit, prefix, length)
        try:
            self.client.put_object(
                self.bucket,
                key,
                cast(BinaryIO, reader),
                length=-1 if length is None else length,
                part_size=PART_SIZE,
                content_type=content_type,
            )
        except (ObjectTooLarge, StreamEndedEarly):
            self.delete(key)  # a multipart upload may have left a partial object behind
            raise
        finally:
            _SignsWithKnownHash.payloads.body = None
        return StoredObject(key=key, size=reader.size, sha256=reader.digest.hexdigest())

    def put_bytes(self, key: str, data: bytes, *, content_type: str) -> StoredObject:
        # As the prefix of an empty stream: `data` reaches the client as the very object, so
        # it is hashed once, for the record and the request's signature alike.
        return self.put_stream(
            key,
            io.BytesIO(b""),
            content_type=content_type,
            limit=max(len(data), 1),
            prefix=data,
            length=len(data),
        )

    def get_bytes(self, key: str, *, length: int | None = None) -> bytes:
        """The object's bytes, or only its first `length` bytes."""
        response = self.client.get_object(self.bucket, key, offset=0, length=length or 0)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def get_bytes_or_none(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        try:
            return self.get_bytes(key)
        except S3Error as err:
            if err.code in MISSING_OBJECT_CODES:
                return None
            raise

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete these objects, a thousand per request (S3 DeleteObjects) and several
        requests side by side, not one request each; a missing object counts as deleted.
        Returns how many keys were given."""
        given = list(keys)
        chunks = [
            given[i : i + DELETES_PER_REQUEST] for i in range(0, len(given), DELETES_PER_REQUEST)
        ]

        def refused(chunk: list[str]) -> list[DeleteError]:
            deleted = self.client.remove_objects(self.bucket, [DeleteObject(k) for k in chunk])
            return [error for error in deleted if error.code not in MISSING_OBJECT_CODES]

        if len(chunks) <= 1:  # a sweep's page, a worker's clean-up: no threads for one request
            errors = [error for chunk in chunks for error in refused(chunk)]
        else:
            with ThreadPoolExecutor(STORE_THREADS) as pool:
                errors = [error for errors in pool.map(refused, chunks) for error in errors]
        if errors:
            raise ObjectsNotDeleted(
                f"{len(errors)} of {len(given)} objects could not be deleted, the first "
                f"{errors[0].name}: {errors[0].code} {errors[0].message}"
            )
        return len(given)

    def list_keys_under(self, prefixes: Sequence[str]) -> list[str]:
        """The keys under each of these prefixes, listed side by side."""
        if len(prefixes) <= 1:
            return [key for prefix in prefixes for key in self.list_keys(prefix)]
        with ThreadPoolExecutor(STORE_THREADS) as pool:
            listed = pool.map(lambda prefix: list(self.list_keys(prefix)), prefixes)
            return [key for keys in listed for key in keys]

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
        except S3Error as err:
            if err.code in MISSING_OBJECT_CODES:
                return False
            raise
        return True

    def list_keys(self, prefix: str, *, older_than: datetime | None = None) -> Iterator[str]:
        """Keys under `prefix`, all of them or those last written before `older_than`."""
        for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
            if older_than is not None and (
                obj.last_modified is None or obj.last_modified >= older_than
            ):
                continue
            yield str(obj.object_name)
