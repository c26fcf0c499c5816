"""DICOM results: an exam's Structured Report and an image's heatmap Segmentation as files,
and where each exam's objects were delivered.

The stored objects are de-identified. A key with the `export_identified` scope gets them
with the original identifiers put back from the vault (audited); any other key gets them as
stored. pydicom is loaded on the first download only: the service's other routes never need
it.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Response
from sqlalchemy.orm import Session

from services.results.deps import CallerDep, SessionDep, SettingsDep, StoreDep
from shared.api.deps import Caller, require_scope
from shared.api.errors import ApiError
from shared.api.schemas import COMMON_ERRORS, DeliveriesPage, DeliveryPublic
from shared.batches import get_batch, get_exam, get_image
from shared.config import Settings
from shared.db.models import AuditAction, ExamExport, ExportStatus, Scope
from shared.deliveries import batch_deliveries, get_export
from shared.storage import ObjectStore
from shared.vault import VaultKeyMissing

router = APIRouter(
    dependencies=[require_scope(Scope.READ)],
    prefix="/v1",
    tags=["dicom results"],
    responses=COMMON_ERRORS,
)
DICOM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/dicom": {}}},
    409: {"description": "not rendered yet, or cannot be"},
}
IDENTIFIED_HEADER = "X-Mammoscreen-Identified"


def _rendered_export(session: Session, caller: Caller, study_id: uuid.UUID) -> ExamExport:
    export = get_export(session=session, tenant_id=caller.tenant.id, study_id=study_id)
    if export is None:
        raise ApiError(
            404,
            "no_dicom_results",
            f"exam {study_id} has no DICOM results: they are made for exams with screened "
            "DICOM images, once their batch completes",
        )
    if export.status == ExportStatus.PENDING:
        raise ApiError(
            409,
            "dicom_results_pending",
            "the exam's DICOM results are being rendered; ask again in a few seconds",
            headers={"Retry-After": "5"},
        )
    if export.status == ExportStatus.FAILED:
        raise ApiError(
            409,
            export.error_code or "dicom_results_failed",
            f"the exam's DICOM results could not be made: {export.error_message}",
        )
    return export


def _dicom_file(
    session: Session,
    settings: Settings,
    store: ObjectStore,
    caller: Caller,
    export: ExamExport,
    key: str,
    filename: str,
) -> Response:
    identified = caller.may(Scope.EXPORT_IDENTIFIED) and caller.tenant.identity_vault
    body, was_identified = (
        _identified_file(session, settings, store, caller, export, key)
        if identified
        else (None, False)
    )
    caller.audit(session, AuditAction.EXPORT, "exam_dicom", export.study_id, file=filename)
    session.commit()
    if body is None:  # as stored: de-identified bytes, served without parsing them
        body = store.get_bytes(key)
    return Response(
        content=body,
        media_type="application/dicom",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            IDENTIFIED_HEADER: "true" if was_identified else "false",
            "Cache-Control": "private, no-store",
        },
    )


def _identified_file(
    session: Session,
    settings: Settings,
    store: ObjectStore,
    caller: Caller,
    export: ExamExport,
    key: str,
) -> tuple[bytes | None, bool]:
    """The object with the vault's identifiers put back (pydicom is loaded only here), or
    (None, False) when the vault holds none for the exam."""
    from pydicom.filebase import DicomBytesIO

    from shared.reidentify import export_objects

    try:
        objects = export_objects(
            session,
            settings=settings,
            store=store,
            export=export,
            keys=[key],
            identified=True,
            actor=caller.key_prefix,
            purpose="download",
        )
    except VaultKeyMissing as err:
        raise ApiError(503, err.code, str(err)) from err
    if not objects.identified:
        return None, False
    (dataset,) = objects.datasets
    buffer = DicomBytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), True


def _object_key(export: ExamExport, kind: str, image_id: uuid.UUID | None) -> str | None:
    wanted = str(image_id) if image_id else None
    for item in export.objects:
        if item["kind"] == kind and item["image_id"] == wanted:
            return str(item["key"])
    return None


def exam_report_file(
    session: Session, settings: Settings, store: ObjectStore, caller: Caller, exam_id: uuid.UUID
) -> Response:
    if get_exam(session=session, tenant_id=caller.tenant.id, study_id=exam_id) is None:
        raise ApiError(404, "exam_not_found", f"no exam {exam_id} exists for this API key")
    export = _rendered_export(session, caller, exam_id)
    key = _object_key(export, "report", None)
    assert key is not None  # every rendered export has its report
    return _dicom_file(session, settings, store, caller, export, key, f"report-{exam_id}.dcm")


def image_heatmap_file(
    session: Session, settings: Settings, store: ObjectStore, caller: Caller, image_id: uuid.UUID
) -> Response:
    image = get_image(session=session, tenant_id=caller.tenant.id, image_id=image_id)
    if image is None:
        raise ApiError(404, "image_not_found", f"no image {image_id} exists for this API key")
    export = _rendered_export(session, caller, image.study_id)
    key = _object_key(export, "heatmap", image.id)
    if key is None:
        raise ApiError(
            404, "heatmap_not_found", f"image {image_id} has no heatmap in its DICOM results"
        )
    return _dicom_file(session, settings, store, caller, export, key, f"heatmap-{image_id}.dcm")


@router.get("/exams/{exam_id}/report.dcm", response_class=Response, responses=DICOM_RESPONSE)
def get_exam_report(
    exam_id: uuid.UUID,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    caller: CallerDep,
) -> Response:
    """The exam's DICOM Comprehensive SR (TID 1500): exam, breast and image scores, the
    recall recommendation and its threshold, the model version; de-identified unless the key
    has the export_identified scope (header X-Mammoscreen-Identified says which)."""
    return exam_report_file(session, settings, store, caller, exam_id)


@router.get("/images/{image_id}/heatmap.dcm", response_class=Response, responses=DICOM_RESPONSE)
def get_image_heatmap_dicom(
    image_id: uuid.UUID,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    caller: CallerDep,
) -> Response:
    """The image's heatmap as a DICOM Segmentation (FRACTIONAL, PROBABILITY) on the image's
    own rows and columns."""
    return image_heatmap_file(session, settings, store, caller, image_id)


@router.get("/batches/{batch_id}/deliveries", response_model=DeliveriesPage)
def get_batch_deliveries(
    batch_id: uuid.UUID, session: SessionDep, caller: CallerDep
) -> DeliveriesPage:
    """Where each exam's DICOM results went: status (pending, delivered, dead), attempts, and
    the destination's last answer (a DICOM status for C-STORE, an HTTP status for STOW-RS)."""
    if get_batch(session=session, tenant_id=caller.tenant.id, batch_id=batch_id) is None:
        raise ApiError(404, "batch_not_found", f"no batch {batch_id} exists for this API key")
    deliveries = batch_deliveries(session=session, tenant_id=caller.tenant.id, batch_id=batch_id)
    return DeliveriesPage(items=[DeliveryPublic.of(d) for d in deliveries])
