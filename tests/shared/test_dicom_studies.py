"""Study assembly: one batch per study, closed after a quiet period, follow-ups after that."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from devstack.synth import generate_exams
from shared.config import Settings
from shared.db.models import Batch, BatchSource, BatchStatus, Image
from shared.dicom_studies import Outcome, Sender, close_quiet_studies, receive_instance
from shared.storage import ObjectStore
from tests.factories import SMALL_SYNTH, make_tenant


def _send(path: Path, sender: Sender, settings: Settings, store: ObjectStore) -> Outcome:
    with path.open("rb") as stream:
        receipt = receive_instance(stream, sender=sender, settings=settings, store=store)
    return receipt.outcome


def _as_new_instance(path: Path, number: int, out: Path) -> Path:
    """The same image as another instance of its study (a new SOP Instance UID)."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(path), str(number)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    target = out / f"copy{number}.dcm"
    target.write_bytes(buffer.getvalue())
    return target


def test_a_study_is_one_batch_until_quiet_then_a_late_instance_opens_a_follow_up(
    session: Session, settings: Settings, store: ObjectStore, tmp_path: Path
) -> None:
    tenant, _ = make_tenant(session)
    sender = Sender(tenant_id=tenant.id, source=BatchSource.DICOMWEB, label="test")
    exam = generate_exams(tmp_path / "exam", exams=1, seed=5, options=SMALL_SYNTH)
    # More instances than a driver prepares statements after (psycopg: 5), all one study:
    # the open-batch upsert must keep finding its index under a generic plan.
    copies = [_as_new_instance(exam[i % 4].path, i, tmp_path) for i in range(12)]
    assert {_send(p, sender, settings, store) for p in copies} == {Outcome.STORED}
    assert _send(copies[0], sender, settings, store) == Outcome.DUPLICATE

    (batch,) = session.scalars(select(Batch)).all()
    assert (batch.status, batch.source) == (BatchStatus.OPEN, BatchSource.DICOMWEB)
    assert session.scalar(select(func.count()).select_from(Image)) == 12

    assert close_quiet_studies(session=session, quiet_s=3600) == 0  # not quiet yet
    assert close_quiet_studies(session=session, quiet_s=0) == 1
    session.commit()

    late = _as_new_instance(exam[0].path, 99, tmp_path)
    assert _send(late, sender, settings, store) == Outcome.STORED
    session.expire_all()
    batches = session.scalars(select(Batch).order_by(Batch.created_at)).all()
    assert [b.status for b in batches] == [BatchStatus.PROCESSING, BatchStatus.OPEN]
    assert batches[0].dicom_study_key == batches[1].dicom_study_key  # a follow-up, same study
