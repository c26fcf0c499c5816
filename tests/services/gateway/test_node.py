"""The DICOM gateway against dcmtk's echoscu and storescu (Debian's dcmtk, not our code)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydicom.data import get_testdata_file
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from devstack.synth import DicomVariant, generate_exams
from services.gateway.node import Gateway
from shared.config import Settings
from shared.db.models import (
    AuditEvent,
    Batch,
    BatchSource,
    BatchStatus,
    Image,
    Prediction,
    RejectedFile,
    Study,
)
from shared.dicom_nodes import add_node
from shared.dicom_studies import close_quiet_studies
from shared.queue import producer
from shared.storage import ObjectStore
from tests.factories import SMALL_SYNTH, make_tenant
from tests.helpers import dcmtk, screen_everything, upload_batch, wait_for

GATEWAY_AE = "MAMMOSCREEN"
# A site PACS's storescu profile: each syntax in a context of its own, as PACS propose the
# syntax a file is stored in (storescu's own -x options propose one family per run).
STORESCU_PROFILE = """
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LittleEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[J2KLossless]
TransferSyntax1 = JPEG2000LosslessOnly
[JLSLossless]
TransferSyntax1 = JPEGLSLossless
[RLE]
TransferSyntax1 = RLELossless

[[PresentationContexts]]
[Site]
PresentationContext1 = DigitalMammographyXRayImageStorageForPresentation\\Uncompressed
PresentationContext2 = DigitalMammographyXRayImageStorageForPresentation\\J2KLossless
PresentationContext3 = DigitalMammographyXRayImageStorageForPresentation\\JLSLossless
PresentationContext4 = DigitalMammographyXRayImageStorageForPresentation\\RLE
PresentationContext5 = CTImageStorage\\Uncompressed

[[Profiles]]
[Site]
PresentationContexts = Site
"""


@pytest.fixture
def gateway(settings: Settings, store: ObjectStore) -> Iterator[tuple[Gateway, int]]:
    node = Gateway(settings, store=store, producer=producer(settings), registry=CollectorRegistry())
    port = node.start("127.0.0.1", 0)
    yield node, port
    node.stop()


def test_echo_from_a_registered_node_and_refusal_of_any_other(
    gateway: tuple[Gateway, int], session: Session
) -> None:
    node, port = gateway
    tenant, _ = make_tenant(session)
    add_node(session=session, tenant_id=tenant.id, ae_title="SITEPACS")
    add_node(session=session, tenant_id=tenant.id, ae_title="ELSEWHERE", host="192.0.2.7")
    session.commit()

    echoed = dcmtk("echoscu", "-aet", "SITEPACS", "-aec", GATEWAY_AE, "127.0.0.1", port)
    assert echoed.returncode == 0, echoed.stderr

    for stranger in ("STRANGER", "ELSEWHERE"):  # unknown; known, but only from another host
        refused = dcmtk("echoscu", "-aet", stranger, "-aec", GATEWAY_AE, "127.0.0.1", port)
        assert refused.returncode != 0
        assert "Association Rejected" in refused.stdout + refused.stderr
        assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert node.metrics.associations.labels("STRANGER", "rejected")._value.get() == 1
    assert node.metrics.associations.labels("SITEPACS", "accepted")._value.get() == 1

    def audited() -> list[AuditEvent]:
        session.rollback()
        query = select(AuditEvent).where(AuditEvent.resource_type == "dicom_association")
        return list(session.scalars(query))

    wait_for(lambda: len(audited()) == 1, timeout=10, what="the association's audit row")
    (row,) = audited()
    assert (row.tenant_id, row.key_prefix) == (tenant.id, "dicom:SITEPACS")
    assert row.detail == {"peer": "127.0.0.1", "instances": {}}


def test_storescu_sends_studies_in_mixed_syntaxes_screened_as_an_http_upload_would_be(
    gateway: tuple[Gateway, int],
    ingest: TestClient,
    session: Session,
    settings: Settings,
    store: ObjectStore,
    tmp_path: Path,
) -> None:
    _, port = gateway
    tenant, key = make_tenant(session)
    node = add_node(session=session, tenant_id=tenant.id, ae_title="SITEPACS")
    session.commit()
    variants = tuple(
        DicomVariant(transfer_syntax=syntax)
        for syntax in (
            ExplicitVRLittleEndian,
            JPEG2000Lossless,
            JPEGLSLossless,
            RLELossless,
            ImplicitVRLittleEndian,
        )
    )
    folder = tmp_path / "study"
    exams = generate_exams(folder, exams=5, seed=21, options=SMALL_SYNTH, variants=variants)
    syntaxes = {str(pydicom.dcmread(e.path).file_meta.TransferSyntaxUID) for e in exams}
    assert len(syntaxes) == 5
    # A CT slice in the same send: a PACS sends whole studies.
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")  # type: ignore[arg-type]

    profile = tmp_path / "storescu.cfg"
    profile.write_text(STORESCU_PROFILE)
    sent = dcmtk(
        "storescu", "-aet", "SITEPACS", "-aec", GATEWAY_AE, "-xf", profile, "Site", "-nh",
        "+sd", "+sp", "*.dcm", "127.0.0.1", port, folder,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout + sent.stderr
    # The same again, as a sender retrying the whole study would: nothing is stored twice.
    again = dcmtk(
        "storescu", "-aet", "SITEPACS", "-aec", GATEWAY_AE, "-xf", profile, "Site", "-nh",
        "+sd", "+sp", "*.dcm", "127.0.0.1", port, folder,
    )  # fmt: skip
    assert again.returncode == 0

    session.expire_all()
    batches = session.scalars(select(Batch).where(Batch.source == BatchSource.DICOM)).all()
    assert len(batches) == 6, sent.stdout + sent.stderr  # five exams and the CT study
    assert {b.dicom_node_id for b in batches} == {node.id}
    assert {b.status for b in batches} == {BatchStatus.OPEN}
    assert session.scalar(select(func.count()).select_from(Image)) == 20
    refusal = session.scalars(select(RejectedFile)).one()  # sent twice, recorded once
    assert refusal.code == "not_mammography"

    assert close_quiet_studies(session=session, quiet_s=0) == 6
    session.commit()
    screen_everything(session, settings, store)

    # The same files uploaded over HTTP score the same, view for view.
    upload_batch(ingest, key, [e.path for e in exams], name="http")
    screen_everything(session, settings, store)
    scores: dict[tuple[str, str, str, BatchSource], float] = {}
    rows = session.execute(
        select(
            Study.study_key, Image.laterality, Image.view, Batch.source, Prediction.malignancy_score
        )
        .join(Image, Image.study_id == Study.id)
        .join(Batch, Batch.id == Image.batch_id)
        .join(Prediction, Prediction.image_id == Image.id)
    ).all()
    for study_key, laterality, view, source, score in rows:
        scores[(study_key, laterality, view, source)] = score
    pairs = [
        (score, scores[(study, lat, view, BatchSource.API)])
        for (study, lat, view, source), score in scores.items()
        if source == BatchSource.DICOM
    ]
    assert len(pairs) == 20
    for by_dicom, by_http in pairs:
        assert by_dicom == pytest.approx(by_http, abs=1e-4)
    statuses = session.scalars(select(Batch.status).where(Batch.source == BatchSource.DICOM))
    assert set(statuses) == {BatchStatus.COMPLETED}
