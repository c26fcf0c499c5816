"""Limits and hostile uploads: each is refused with a code, and nothing is left behind."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from devstack.synth import SynthImage
from services.ingest.app import create_app
from shared.config import Settings
from shared.db.models import Image
from shared.storage import ObjectStore
from tests.factories import make_tenant
from tests.helpers import auth


def _client(settings: Settings, **limits: int) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=limits)))


@pytest.fixture
def key(session: Session) -> str:
    return make_tenant(session)[1]


def _upload(client: TestClient, key: str, files: list[tuple[str, bytes]]) -> dict:
    batch = client.post("/v1/batches", json={"name": "b"}, headers=auth(key)).json()
    response = client.post(
        f"/v1/batches/{batch['id']}/images",
        files=[("files", (name, data, "application/octet-stream")) for name, data in files],
        headers=auth(key),
    )
    return {"status": response.status_code, **response.json()}


def _codes(body: dict) -> dict[str, str]:
    rejected = body.get("rejected") or body["error"]["detail"].get("rejected", [])
    return {r["filename"]: r["code"] for r in rejected}


def _zip(entries: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


@pytest.fixture
def nothing_left(session: Session, store: ObjectStore) -> Iterator[None]:
    """After the test: no image row and no stored object (every upload here is refused)."""
    yield
    assert session.scalars(select(Image)).all() == []
    assert list(store.client.list_objects(store.bucket, prefix="tenants/", recursive=True)) == []


def test_zip_of_an_exam_is_accepted_entry_by_entry(
    settings: Settings, key: str, exam: list[SynthImage]
) -> None:
    archive = _zip({f"exam/{i.path.name}": i.path.read_bytes() for i in exam})
    with _client(settings) as client:
        body = _upload(client, key, [("exam.zip", archive)])
    assert body["status"] == 202
    assert sorted(a["filename"] for a in body["accepted"]) == sorted(i.path.name for i in exam)
    assert len({a["study_id"] for a in body["accepted"]}) == 1


def test_hostile_zip_entries_are_refused_and_the_good_one_kept(
    settings: Settings, key: str, exam: list[SynthImage]
) -> None:
    good = exam[0].path.read_bytes()
    archive = _zip(
        {
            "../escape.dcm": good,
            "/etc/abs.dcm": good,
            "C:/win.dcm": good,
            "inner.zip": _zip({"a.dcm": good}),
            "notes.txt": b"hello",
            "ok/good.dcm": good,
        },
        symlinks=("link.dcm",),
    )
    with _client(settings) as client:
        body = _upload(client, key, [("hostile.zip", archive)])
    assert body["status"] == 202
    assert [a["filename"] for a in body["accepted"]] == ["good.dcm"]
    assert _codes(body) == {
        "hostile.zip/../escape.dcm": "unsafe_archive_entry",
        "hostile.zip//etc/abs.dcm": "unsafe_archive_entry",
        "hostile.zip/C:/win.dcm": "unsafe_archive_entry",
        "hostile.zip/link.dcm": "unsafe_archive_entry",
        "hostile.zip/inner.zip": "unsupported_media_type",
        "hostile.zip/notes.txt": "unsupported_media_type",
    }


@pytest.mark.usefixtures("nothing_left")
def test_zip_with_too_many_entries_is_refused_whole(
    settings: Settings, key: str, exam: list[SynthImage]
) -> None:
    archive = _zip({f"{n}.dcm": exam[0].path.read_bytes() for n in range(4)})
    with _client(settings, max_zip_entries=3) as client:
        body = _upload(client, key, [("many.zip", archive)])
    assert body["status"] == 422
    assert _codes(body) == {"many.zip": "archive_too_many_entries"}


@pytest.mark.usefixtures("nothing_left")
def test_zip_bomb_is_refused_before_extraction(settings: Settings, key: str) -> None:
    archive = _zip({"bomb.dcm": b"\0" * 20_000_000})  # 20 MB of zeros, about 20 kB zipped
    assert len(archive) < 100_000
    with _client(settings, max_zip_bytes=5_000_000) as client:
        body = _upload(client, key, [("bomb.zip", archive)])
    assert body["status"] == 422
    assert _codes(body) == {"bomb.zip": "archive_too_large"}


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _dicom_declaring(path: Path, rows: int, columns: int) -> bytes:
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = rows, columns
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


@pytest.mark.usefixtures("nothing_left")
def test_decompression_bombs_are_refused_from_their_headers(
    settings: Settings, key: str, exam: list[SynthImage]
) -> None:
    files = [
        ("huge_L_CC.png", _png_header(100_000, 100_000)),
        ("wide_L_CC.png", _png_header(60_000, 2_000)),
        ("huge.dcm", _dicom_declaring(exam[0].path, 60_000, 60_000)),
    ]
    with _client(settings) as client:
        body = _upload(client, key, files)
    assert body["status"] == 422
    assert _codes(body) == {
        "huge_L_CC.png": "image_too_large",
        "wide_L_CC.png": "image_too_large",
        "huge.dcm": "image_too_large",
    }


@pytest.mark.usefixtures("nothing_left")
def test_files_that_lie_about_themselves_are_refused(settings: Settings, key: str) -> None:
    lying_length = b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"1.2" * 4
    files = [
        ("scan.dcm", b"\x89PNG\r\n\x1a\n" + b"\0" * 40),  # a broken PNG called .dcm
        ("lying.dcm", lying_length),  # an element length past the end of the file
        ("photo.png", b"GIF89a" + b"\0" * 100),  # a GIF called .png
    ]
    with _client(settings) as client:
        body = _upload(client, key, files)
    assert body["status"] == 422
    assert _codes(body) == {
        "scan.dcm": "invalid_image",
        "lying.dcm": "not_dicom_image",
        "photo.png": "unsupported_media_type",
    }


@pytest.mark.usefixtures("nothing_left")
def test_request_over_the_size_limit_is_stopped_while_streaming(
    settings: Settings, key: str, exam: list[SynthImage]
) -> None:
    with _client(settings, max_request_bytes=50_000) as client:
        body = _upload(client, key, [(exam[0].path.name, exam[0].path.read_bytes())])
    assert body["status"] == 413
    assert body["error"]["code"] == "request_too_large"


@pytest.mark.usefixtures("nothing_left")
def test_batch_over_its_image_limit_refuses_the_upload(
    settings: Settings, key: str, exam: list[SynthImage]
) -> None:
    with _client(settings, max_images_per_batch=3) as client:
        body = _upload(client, key, [(i.path.name, i.path.read_bytes()) for i in exam])
    assert body["status"] == 413
    assert body["error"]["code"] == "batch_full"
    assert body["error"]["detail"] == {"images": 0, "limit": 3}


@pytest.mark.usefixtures("nothing_left")
def test_too_many_files_in_one_request(
    settings: Settings, key: str, exam: list[SynthImage]
) -> None:
    with _client(settings, max_files_per_request=2) as client:
        body = _upload(client, key, [(i.path.name, i.path.read_bytes()) for i in exam])
    assert body["status"] == 413
    assert body["error"]["code"] == "too_many_files"


@pytest.mark.usefixtures("nothing_left")
def test_chunked_body_without_length_is_stopped_at_the_limit(
    settings: Settings, key: str, exam: list[SynthImage]
) -> None:
    boundary = "limit-test-boundary"
    data = exam[0].path.read_bytes()
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
        f'filename="a.dcm"\r\nContent-Type: application/dicom\r\n\r\n'
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:  # a generator: sent chunked, with no Content-Length
        yield head
        for start in range(0, len(data), 16_384):
            yield data[start : start + 16_384]
        yield tail

    with _client(settings, max_request_bytes=50_000) as client:
        batch = client.post("/v1/batches", json={"name": "b"}, headers=auth(key)).json()
        response = client.post(
            f"/v1/batches/{batch['id']}/images",
            content=chunks(),
            headers={**auth(key), "Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
