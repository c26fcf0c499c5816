from __future__ import annotations

import hashlib
import io
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import minio.api
import minio.helpers
import pytest
from urllib3 import HTTPHeaderDict

from shared.storage import PART_SIZE, Keys, ObjectStore, ObjectTooLarge, StreamEndedEarly


def test_streamed_object_round_trips_with_its_hash(store: ObjectStore) -> None:
    data = os.urandom(PART_SIZE + 12345)  # more than one multipart part
    stored = store.put_stream(
        "a/b",
        io.BytesIO(data[10:]),
        content_type="application/dicom",
        limit=len(data),
        prefix=data[:10],
    )
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert store.get_bytes("a/b") == data


@pytest.fixture
def minio_hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every request body minio hashes itself to sign a request."""
    hashed: list[int] = []
    own_hash = minio.helpers.sha256_hash

    def counting(data: bytes | str | None) -> str:
        hashed.append(len(data or b""))
        return own_hash(data)

    monkeypatch.setattr(minio.api, "sha256_hash", counting)
    return hashed


def test_an_object_of_one_part_is_hashed_once_and_signed_with_its_hash(
    store: ObjectStore, minio_hashes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # MinIO refuses a body whose x-amz-content-sha256 is not its hash; the local store
    # (SeaweedFS) does not check, so each request's header is checked here, as sent.
    sent: list[tuple[bytes, str]] = []
    http = store.client._http
    send = http.urlopen

    def noting(method: str, url: str, body: bytes | None = None, **kwargs: Any) -> Any:
        if method == "PUT":
            headers = cast(HTTPHeaderDict, kwargs["headers"])
            sent.append((body or b"", headers["x-amz-content-sha256"]))
        return send(method, url, body=body, **kwargs)

    monkeypatch.setattr(http, "urlopen", noting)
    upload, derived = os.urandom(2 * 1024 * 1024), os.urandom(300_000)
    stored = store.put_stream(
        "one/part",
        io.BytesIO(upload[200:] + b"TRAILER"),
        content_type="application/dicom",
        limit=len(upload),
        prefix=upload[:200],
        length=len(upload),
    )
    written = store.put_bytes("one/derived", derived, content_type="image/png")
    assert [signed for _, signed in sent] == [hashlib.sha256(b).hexdigest() for b, _ in sent]
    assert [len(body) for body, _ in sent] == [len(upload), len(derived)]
    assert store.get_bytes("one/part") == upload
    assert store.get_bytes("one/derived") == derived
    assert stored.sha256 == hashlib.sha256(upload).hexdigest()
    assert written.sha256 == hashlib.sha256(derived).hexdigest()
    assert max(minio_hashes) < len(derived), "a body was hashed a second time to sign it"


def test_a_known_length_over_several_parts_stores_that_much_and_no_more(
    store: ObjectStore,
) -> None:
    # A full-size mammogram (tens of MB): a header prefix, then a byte range of the upload
    # followed by bytes that are not part of the object (a trailer the copy drops).
    data = os.urandom(2 * PART_SIZE + 4321)
    stream = io.BytesIO(data[100:] + b"TRAILER")
    stored = store.put_stream(
        "a/known",
        stream,
        content_type="application/dicom",
        limit=len(data),
        prefix=data[:100],
        length=len(data),
    )
    assert (stored.size, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert store.get_bytes("a/known") == data


def test_a_stream_shorter_than_its_length_is_refused_and_nothing_is_kept(
    store: ObjectStore,
) -> None:
    data = os.urandom(PART_SIZE + 1000)
    with pytest.raises(StreamEndedEarly):
        store.put_stream(
            "short",
            io.BytesIO(data),
            content_type="application/dicom",
            limit=2 * len(data),
            length=len(data) + 10,
        )
    assert not store.exists("short")


def test_stream_over_the_limit_is_refused_and_nothing_is_kept(store: ObjectStore) -> None:
    with pytest.raises(ObjectTooLarge):
        store.put_stream("big", io.BytesIO(b"x" * 5000), content_type="image/png", limit=4096)
    assert not store.exists("big")


def test_ping_fails_for_a_missing_bucket(store: ObjectStore) -> None:
    store.ping()
    store.bucket = "no-such-bucket-here"
    with pytest.raises(RuntimeError, match="does not exist"):
        store.ping()


def test_list_keys_lists_a_prefix_and_leaves_out_what_is_newer_than_the_cutoff(
    store: ObjectStore,
) -> None:
    tenant, batch = uuid.uuid4(), uuid.uuid4()
    uploads = [Keys.image(tenant, batch, uuid.uuid4()) for _ in range(3)]
    for key in (*uploads, Keys.preview(uuid.uuid4())):
        store.put_bytes(key, b"x", content_type="application/octet-stream")

    assert sorted(store.list_keys(Keys.UPLOADS)) == sorted(uploads)
    assert all(key.startswith(Keys.UPLOADS) for key in uploads)
    later = datetime.now(UTC) + timedelta(minutes=1)
    earlier = datetime.now(UTC) - timedelta(minutes=1)
    assert sorted(store.list_keys(Keys.UPLOADS, older_than=later)) == sorted(uploads)
    assert list(store.list_keys(Keys.UPLOADS, older_than=earlier)) == []


def test_get_bytes_or_none_tells_a_missing_object_apart(store: ObjectStore) -> None:
    store.put_bytes("present", b"abc", content_type="text/plain")
    assert store.get_bytes_or_none("present") == b"abc"
    assert store.get_bytes_or_none("absent") is None


def test_the_first_bytes_of_an_object_are_read_without_the_rest(store: ObjectStore) -> None:
    store.ensure_bucket()
    store.put_bytes("heads/one", b"0123456789" * 1000, content_type="application/octet-stream")
    assert store.get_bytes("heads/one", length=5) == b"01234"
    assert len(store.get_bytes("heads/one")) == 10_000


def test_delete_many_removes_more_than_one_request_holds_and_counts_missing_ones_as_gone(
    store: ObjectStore,
) -> None:
    keys = [f"many/{i:04d}" for i in range(1003)]  # S3 takes at most 1,000 per request
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: store.put_bytes(key, b"x", content_type="text/plain"), keys))
    kept = store.put_bytes("kept/0", b"y", content_type="text/plain")
    assert store.delete_many([*keys, "many/never-written"]) == len(keys) + 1
    assert list(store.list_keys("many/")) == []
    assert store.exists(kept.key)
    assert store.delete_many([]) == 0


def test_list_keys_under_lists_every_prefix_and_nothing_beside_them(store: ObjectStore) -> None:
    image_ids = [uuid.uuid4() for _ in range(12)]
    version = uuid.uuid4()
    for image_id in image_ids:
        store.put_bytes(Keys.heatmap(image_id, version), b"h", content_type="image/png")
        store.put_bytes(Keys.heatmap_overlay(image_id, version), b"o", content_type="image/png")
    wanted = image_ids[:10]
    listed = store.list_keys_under([Keys.heatmaps_of(image_id) for image_id in wanted])
    assert sorted(listed) == sorted(
        key
        for image_id in wanted
        for key in (Keys.heatmap(image_id, version), Keys.heatmap_overlay(image_id, version))
    )
