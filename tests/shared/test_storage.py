from __future__ import annotations

import hashlib
import io
import os

import pytest

from shared.storage import PART_SIZE, ObjectStore, ObjectTooLarge


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


def test_stream_over_the_limit_is_refused_and_nothing_is_kept(store: ObjectStore) -> None:
    with pytest.raises(ObjectTooLarge):
        store.put_stream("big", io.BytesIO(b"x" * 5000), content_type="image/png", limit=4096)
    assert not store.exists("big")


def test_ping_fails_for_a_missing_bucket(store: ObjectStore) -> None:
    store.ping()
    store.bucket = "no-such-bucket-here"
    with pytest.raises(RuntimeError, match="does not exist"):
        store.ping()
