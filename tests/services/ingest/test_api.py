from __future__ import annotations

import hashlib
import io
import threading
import time
import uuid
from typing import Any, BinaryIO

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session
from urllib3.exceptions import HTTPError as StorageConnectionError

from devstack.synth import SynthImage
from shared.config import Settings
from shared.db.models import Image, ImageStatus, Study
from shared.storage import ObjectStore, StoredObject
from tests.factories import make_tenant
from tests.helpers import auth, files_field, queued_task_args


def _batch(ingest: TestClient, key: str, **body: str) -> dict[str, str]:
    response = ingest.post("/v1/batches", json={"name": "b", **body}, headers=auth(key))
    assert response.status_code == 201, response.text
    return response.json()


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))).save(buffer, "PNG")
    return buffer.getvalue()


def test_requests_without_or_with_a_wrong_key_get_401(ingest: TestClient) -> None:
    missing = ingest.post("/v1/batches", json={"name": "x"})
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    wrong = ingest.post("/v1/batches", json={"name": "x"}, headers=auth("msk_0000_nope"))
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"


def test_create_batch(ingest: TestClient, session: Session) -> None:
    _, key = make_tenant(session)
    batch = _batch(ingest, key, priority="urgent")
    assert batch["status"] == "open"
    assert batch["priority"] == "urgent"


def test_invalid_batch_spec_gets_422_with_the_common_error_shape(
    ingest: TestClient, session: Session
) -> None:
    _, key = make_tenant(session)
    response = ingest.post("/v1/batches", json={"name": "", "priority": "asap"}, headers=auth(key))
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert {p["location"] for p in error["detail"]["problems"]} == {"body.name", "body.priority"}


def test_upload_streams_hashes_records_and_queues_after_commit(
    ingest: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    exam: list[SynthImage],
) -> None:
    tenant, key = make_tenant(session)
    batch = _batch(ingest, key)
    response = ingest.post(
        f"/v1/batches/{batch['id']}/images",
        files=files_field([i.path for i in exam]),
        headers=auth(key),
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["rejected"] == []
    assert len(body["accepted"]) == 4
    assert {(a["laterality"], a["view"]) for a in body["accepted"]} == {
        ("L", "CC"),
        ("L", "MLO"),
        ("R", "CC"),
        ("R", "MLO"),
    }

    rows = session.scalars(select(Image).where(Image.batch_id == uuid.UUID(batch["id"]))).all()
    assert len(rows) == 4
    assert {r.status for r in rows} == {ImageStatus.QUEUED}
    assert all(r.tenant_id == tenant.id for r in rows)
    by_name = {i.path.name: pydicom.dcmread(i.path) for i in exam}
    for row in rows:
        stored = store.get_bytes(row.object_key)
        # What is stored is the de-identified copy: same pixels, no patient identity.
        original = by_name[row.filename]
        assert pydicom.dcmread(io.BytesIO(stored)).PixelData == original.PixelData
        assert str(original.PatientID).encode() not in stored
        assert row.sha256 == hashlib.sha256(stored).hexdigest()
        assert row.size_bytes == len(stored)
    # The four views of one exam are one study, keyed by a hash, not the patient id.
    studies = session.scalars(select(Study)).all()
    assert len(studies) == 1
    assert exam[0].patient not in studies[0].patient_key
    queued = [image_id for args in queued_task_args(settings) for image_id in args]
    assert sorted(queued) == sorted(str(r.id) for r in rows)


def test_mixed_upload_accepts_images_and_rejects_the_rest_with_codes(
    ingest: TestClient, session: Session, exam: list[SynthImage]
) -> None:
    _, key = make_tenant(session)
    batch = _batch(ingest, key)
    files = [
        ("files", ("exam7_R_MLO.png", _png_bytes(), "image/png")),
        ("files", ("report.pdf", b"%PDF-1.7 not an image at all", "application/pdf")),
        ("files", ("lying.dcm", b"GIF89a pretending to be DICOM", "application/dicom")),
        ("files", ("empty.dcm", b"", "application/dicom")),
    ]
    response = ingest.post(f"/v1/batches/{batch['id']}/images", files=files, headers=auth(key))
    assert response.status_code == 202, response.text
    body = response.json()
    (png,) = body["accepted"]
    assert (png["media_type"], png["laterality"], png["view"]) == ("image/png", "R", "MLO")
    codes = {r["filename"]: r["code"] for r in body["rejected"]}
    assert codes == {
        "report.pdf": "unsupported_media_type",
        "lying.dcm": "unsupported_media_type",
        "empty.dcm": "empty_file",
    }
    assert all(r["message"] for r in body["rejected"])


def test_all_files_rejected_is_a_422_and_nothing_is_stored(
    ingest: TestClient, session: Session, store: ObjectStore
) -> None:
    _, key = make_tenant(session)
    batch = _batch(ingest, key)
    response = ingest.post(
        f"/v1/batches/{batch['id']}/images",
        files=[("files", ("a.txt", b"hello", "text/plain"))],
        headers=auth(key),
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "no_acceptable_files"
    assert error["detail"]["rejected"][0]["code"] == "unsupported_media_type"
    assert session.scalars(select(Image)).all() == []
    assert list(store.client.list_objects(store.bucket, recursive=True)) == []


def test_oversized_file_is_rejected_while_streaming(
    infra: object,
    session: Session,
    exam: list[SynthImage],
    settings: Settings,
    store: ObjectStore,
) -> None:
    from services.ingest.app import create_app

    small_limit = settings.model_copy(update={"max_file_bytes": 10_000})
    with TestClient(create_app(small_limit)) as ingest:
        _, key = make_tenant(session)
        batch = _batch(ingest, key)
        response = ingest.post(
            f"/v1/batches/{batch['id']}/images",
            files=files_field([exam[0].path]),
            headers=auth(key),
        )
    assert response.status_code == 422
    assert response.json()["error"]["detail"]["rejected"][0]["code"] == "file_too_large"
    assert list(store.client.list_objects(store.bucket, recursive=True)) == []


def test_another_tenants_batch_is_404_and_a_closed_batch_409(
    ingest: TestClient, session: Session, exam: list[SynthImage]
) -> None:
    _, owner_key = make_tenant(session)
    _, other_key = make_tenant(session)
    batch = _batch(ingest, owner_key)
    for path in (f"/v1/batches/{batch['id']}/images", f"/v1/batches/{batch['id']}/close"):
        kwargs = {"files": files_field([exam[0].path])} if path.endswith("images") else {}
        response = ingest.post(path, headers=auth(other_key), **kwargs)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "batch_not_found"

    closed = ingest.post(f"/v1/batches/{batch['id']}/close", headers=auth(owner_key))
    assert closed.status_code == 200
    assert closed.json()["status"] == "completed"  # closed with no images: nothing left
    late = ingest.post(
        f"/v1/batches/{batch['id']}/images",
        files=files_field([exam[0].path]),
        headers=auth(owner_key),
    )
    assert late.status_code == 409
    assert late.json()["error"]["code"] == "batch_not_open"


def test_unknown_batch_id_and_malformed_id(ingest: TestClient, session: Session) -> None:
    _, key = make_tenant(session)
    assert ingest.post(f"/v1/batches/{uuid.uuid4()}/close", headers=auth(key)).status_code == 404
    malformed = ingest.post("/v1/batches/not-a-uuid/close", headers=auth(key))
    assert malformed.status_code == 422
    assert malformed.json()["error"]["code"] == "invalid_request"


def test_health_and_readiness(ingest: TestClient) -> None:
    assert ingest.get("/healthz").json() == {"status": "ok"}
    ready = ingest.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"postgres": "ok", "redis": "ok", "object_storage": "ok"}


def test_readiness_reports_an_unreachable_dependency(settings: Settings) -> None:
    from services.ingest.app import create_app

    broken = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    checks = response.json()["error"]["detail"]["checks"]
    assert checks["postgres"] == "ok"
    assert checks["redis"].startswith("unreachable")


def test_queue_outage_keeps_the_upload_and_the_sweeper_queues_it_later(
    session: Session, settings: Settings, store: ObjectStore, exam: list[SynthImage]
) -> None:
    from services.ingest.app import create_app
    from services.worker.sweeper import relay_queued
    from shared.queue import make_celery

    no_broker = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(no_broker)) as ingest:
        _, key = make_tenant(session)
        batch = _batch(ingest, key)
        response = ingest.post(
            f"/v1/batches/{batch['id']}/images",
            files=files_field([i.path for i in exam]),
            headers=auth(key),
        )
    assert response.status_code == 202, response.text
    assert "queued automatically" in response.json()["warnings"][0]
    rows = session.scalars(select(Image)).all()
    assert len(rows) == 4
    assert all(r.enqueued_at is None and r.status == ImageStatus.QUEUED for r in rows)
    assert all(store.exists(r.object_key) for r in rows)
    assert queued_task_args(settings) == []

    # The broker is back: the sweeper's relay sends exactly these images.
    sent = relay_queued(
        session=session, producer=make_celery(settings), chunk_size=16, requeue_after_s=900
    )
    session.commit()
    assert sent == 4
    assert sorted(queued_task_args(settings)[0]) == sorted(str(r.id) for r in rows)
    session.expire_all()
    assert all(r.enqueued_at is not None for r in session.scalars(select(Image)))


def test_control_characters_are_refused_in_text_and_stripped_from_file_names(
    ingest: TestClient, session: Session
) -> None:
    # Found by the fuzzer: a NUL byte reached Postgres and answered 500.
    _, key = make_tenant(session)
    refused = ingest.post("/v1/batches", json={"name": "bad\x00name"}, headers=auth(key))
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "invalid_request"
    batch = _batch(ingest, key)
    files = [("files", ("scan\x00\x07_L_CC.png", _png_bytes(), "image/png"))]
    accepted = ingest.post(
        f"/v1/batches/{batch['id']}/images",
        files=files,
        data={"study_key": "s\x00"},
        headers=auth(key),
    )
    assert accepted.status_code == 422  # the study key has a NUL byte
    accepted = ingest.post(f"/v1/batches/{batch['id']}/images", files=files, headers=auth(key))
    assert accepted.status_code == 202, accepted.text
    stored_name = accepted.json()["accepted"][0]["filename"]
    assert stored_name.endswith("_L_CC.png")
    assert all(ch.isprintable() for ch in stored_name)


@pytest.mark.parametrize(
    ("raw", "safe"),
    [
        ("scan\x00\x07_L_CC.png", "scan_L_CC.png"),
        ("../../etc/passwd", "passwd"),
        ("C:\\scans\\a.dcm", "a.dcm"),
        ("", "unnamed"),
        (None, "unnamed"),
        ("\x00", "unnamed"),
    ],
)
def test_safe_filename(raw: str | None, safe: str) -> None:
    from shared.imaging.intake import safe_filename

    assert safe_filename(raw) == safe


def test_unparsable_body_is_a_400_with_a_stable_code(ingest: TestClient, session: Session) -> None:
    _, key = make_tenant(session)
    response = ingest.post(
        "/v1/batches",
        content=b"\xff\xfe{",
        headers={**auth(key), "Content-Type": "application/json"},
    )
    assert response.status_code in (400, 422)
    assert response.json()["error"]["code"] in ("malformed_request", "invalid_request")


class _ConcurrencyRecordingStore(ObjectStore):
    """The real store, noting how many puts run at once; after `fail_after` stored objects,
    its puts fail as a lost connection to the object store would."""

    def __init__(self, settings: Settings, *, fail_after: int | None = None) -> None:
        super().__init__(settings)
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.fail_after = fail_after
        self.keys: list[str] = []

    def put_stream(self, key: str, stream: BinaryIO, **kwargs: Any) -> StoredObject:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(0.05)  # long enough for the other files' puts to start meanwhile
            if self.fail_after is not None and len(self.keys) >= self.fail_after:
                raise StorageConnectionError("object storage went away mid-request")
            stored = super().put_stream(key, stream, **kwargs)
            with self.lock:
                self.keys.append(key)
            return stored
        finally:
            with self.lock:
                self.running -= 1


def _upload_with_store(settings: Settings, session: Session, store: ObjectStore, files: Any) -> Any:
    from services.ingest.app import create_app

    app = create_app(settings)
    app.state.store = store
    with TestClient(app, raise_server_exceptions=False) as ingest:
        _, key = make_tenant(session)
        batch = _batch(ingest, key)
        return ingest.post(f"/v1/batches/{batch['id']}/images", files=files, headers=auth(key))


def test_files_of_one_request_are_stored_side_by_side_and_answered_in_order(
    settings: Settings, session: Session, exam: list[SynthImage]
) -> None:
    store = _ConcurrencyRecordingStore(settings)
    files = files_field([i.path for i in exam])
    files.insert(2, ("files", ("notes.txt", b"not an image", "text/plain")))
    response = _upload_with_store(settings, session, store, files)
    assert response.status_code == 202, response.text
    body = response.json()
    assert [a["filename"] for a in body["accepted"]] == [i.path.name for i in exam]
    assert [r["filename"] for r in body["rejected"]] == ["notes.txt"]
    assert store.most_at_once >= 2
    assert len(session.scalars(select(Image)).all()) == len(exam)


def test_a_storage_failure_of_one_file_keeps_nothing_of_the_request(
    settings: Settings, session: Session, store: ObjectStore, exam: list[SynthImage]
) -> None:
    one_at_a_time = settings.model_copy(update={"ingest_store_threads": 1})
    failing = _ConcurrencyRecordingStore(one_at_a_time, fail_after=2)
    response = _upload_with_store(
        one_at_a_time, session, failing, files_field([i.path for i in exam])
    )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "storage_unavailable"
    assert len(failing.keys) == 2  # two were stored before the third failed ...
    assert session.scalars(select(Image)).all() == []
    assert list(store.client.list_objects(store.bucket, recursive=True)) == []  # ... and undone


def test_an_urgent_batch_is_queued_on_the_urgent_lane(
    ingest: TestClient, session: Session, settings: Settings, exam: list[SynthImage]
) -> None:
    _, key = make_tenant(session)
    urgent = _batch(ingest, key, priority="urgent")
    response = ingest.post(
        f"/v1/batches/{urgent['id']}/images",
        files=files_field([i.path for i in exam]),
        headers=auth(key),
    )
    assert response.status_code == 202, response.text
    queued = [i for args in queued_task_args(settings, "inference-urgent") for i in args]
    assert sorted(queued) == sorted(a["id"] for a in response.json()["accepted"])
    assert queued_task_args(settings, "inference") == []
