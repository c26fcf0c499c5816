"""A run of hostile uploads against the real ingest process: bounded memory, nothing orphaned."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from devstack.stack import StackState
from devstack.synth import SynthImage
from mammoscreen_client import ApiClientError, Client
from shared.config import Settings
from shared.db.models import Image
from shared.storage import ObjectStore

pytestmark = pytest.mark.e2e
MIB = 1024 * 1024


def _peak_rss_bytes(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM), from the kernel."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("VmHWM not reported")


def _large_dicom(template: Path, out: Path, side: int) -> Path:
    ds = pydicom.dcmread(template)
    ds.Rows = ds.Columns = side
    ds.PixelData = np.zeros((side, side), dtype=np.uint16).tobytes()
    ds.save_as(out)
    return out


def test_hostile_uploads_keep_memory_bounded_and_leave_no_orphans(
    stack: StackState,
    settings: Settings,
    session: Session,
    store: ObjectStore,
    exam: list[SynthImage],
    tmp_path: Path,
) -> None:
    env = stack.env
    client = Client.from_env(env, timeout=300)
    ingest_pid = stack.services["ingest"]
    batch = client.create_batch("hostile")["id"]
    client.upload(batch, [exam[0].path])  # warm up: imports, pools, first request
    baseline = _peak_rss_bytes(ingest_pid)

    big = _large_dicom(exam[0].path, tmp_path / "big.dcm", side=6000)  # 72 MB, accepted
    garbage = tmp_path / "garbage.dcm"
    with open(garbage, "wb") as handle:  # 96 MB that is no image at all
        for _ in range(96):
            handle.write(os.urandom(MIB))
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("inner.dcm", b"\0" * (256 * MIB))  # 256 MiB expanding from ~250 kB
    hostile_zip = io.BytesIO()
    with zipfile.ZipFile(hostile_zip, "w") as archive:
        archive.writestr("../../escape.dcm", exam[1].path.read_bytes())
    (tmp_path / "escape.zip").write_bytes(hostile_zip.getvalue())
    sent = sum(p.stat().st_size for p in (big, garbage, bomb))

    accepted = client.upload(batch, [big])["accepted"]
    assert len(accepted) == 1
    # The bomb is within the default archive limit, so its entry is opened (lazily, a few
    # bytes) and refused for what it is; the limit itself is tested in test_limits.py.
    for path, name, code in (
        (garbage, "garbage.dcm", "unsupported_media_type"),
        (bomb, "bomb.zip/inner.dcm", "unsupported_media_type"),
        (tmp_path / "escape.zip", "escape.zip/../../escape.dcm", "unsafe_archive_entry"),
    ):
        with pytest.raises(ApiClientError) as caught:
            client.upload(batch, [path])
        assert caught.value.code == "no_acceptable_files"
        (rejected,) = caught.value.detail["rejected"]
        assert (rejected["filename"], rejected["code"]) == (name, code)
    client.close_connections()

    growth = _peak_rss_bytes(ingest_pid) - baseline
    print(
        f"\ningest peak RSS grew {growth / MIB:.1f} MiB while {sent / MIB:.0f} MiB of uploads "
        "(one 72 MB image, 96 MB of garbage, a 256 MiB zip bomb) went through"
    )
    assert growth < 64 * MIB, f"ingest memory grew {growth / MIB:.0f} MiB"

    # Nothing orphaned: every stored object has its row and every row its object.
    rows = {image.object_key for image in session.scalars(select(Image))}
    objects = {
        str(o.object_name)
        for o in store.client.list_objects(store.bucket, prefix="tenants/", recursive=True)
    }
    assert rows == objects
    assert len(rows) == 2


def test_the_bucket_refuses_anonymous_reads(
    stack: StackState, store: ObjectStore, exam: list[SynthImage]
) -> None:
    env = stack.env
    with Client.from_env(env) as client:
        batch = client.create_batch("private")["id"]
        client.upload(batch, [exam[0].path])
    (key,) = [
        str(o.object_name)
        for o in store.client.list_objects(store.bucket, prefix="tenants/", recursive=True)
    ]
    anonymous = httpx.get(f"{env['SCREENING_S3_ENDPOINT']}/{env['SCREENING_S3_BUCKET']}/{key}")
    assert anonymous.status_code in (401, 403)
    # ... while the service can read it (the de-identified copy: same pixels).
    stored = pydicom.dcmread(io.BytesIO(store.get_bytes(key)))
    assert stored.PixelData == pydicom.dcmread(exam[0].path).PixelData
