"""The sweeper's DICOM-out steps (worker side): render completed exams' results, and deliver
them to the site's destinations with bounded retries (the rows: shared/deliveries.py).

Rendering happens once per exam and stores de-identified objects; each delivery opens the
vault (audited), puts the original identifiers back (shared/reidentify.py) and sends by
C-STORE (pynetdicom) or STOW-RS (dicomweb-client). A tenant whose vault is off, or whose
images the vault does not hold, gets the de-identified objects, and the delivery says so
(`identified: false`).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence

import numpy as np
import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from minio.error import S3Error
from PIL import Image as PILImage
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import Session
from urllib3.exceptions import HTTPError as StorageConnectionError

from shared.batches import latest_predictions
from shared.config import Settings
from shared.db.base import utcnow
from shared.db.models import (
    ExamExport,
    ExportDelivery,
    ExportDeliveryStatus,
    ExportDestination,
    ExportStatus,
    Image,
    ImageStatus,
    Tenant,
    Transport,
)
from shared.deliveries import backoff
from shared.dicom_results import ExamResult, ImageResult, render_exam
from shared.exams import assess_exam
from shared.imaging.decode import decode_image
from shared.imaging.formats import MediaType
from shared.imaging.intake import deidentifier_for
from shared.operating_points import site_thresholds
from shared.reidentify import export_objects
from shared.storage import Keys, ObjectStore
from shared.vault import VaultKeyMissing

log = logging.getLogger(__name__)

SYSTEM_ACTOR = "system:export"
SUCCESS = 0x0000
# C-STORE warnings still store the object (PS3.7 Annex C): coercion, elements discarded.
STORE_WARNINGS = (0x0001, 0xB000, 0xB006, 0xB007)
RENDER_ATTEMPTS = 3
# The stored (de-identified) headers are a few kilobytes; private blobs were removed.
HEADER_READ_BYTES = 256 * 1024


class DeliveryFailed(Exception):
    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


# -- rendering ---------------------------------------------------------------------------------


def _stored_header(store: ObjectStore, key: str, data: bytes | None) -> Dataset:
    """A stored image's header, from its first bytes when they hold all of it (a
    mammogram's pixels are tens of megabytes the report does not need)."""
    if data is None:
        head = io.BytesIO(store.get_bytes(key, length=HEADER_READ_BYTES))
        with contextlib.suppress(Exception):  # cut mid-header: read the whole object
            header = pydicom.dcmread(head, stop_before_pixels=True)
            if head.tell() < len(head.getbuffer()):  # stopped at the pixels, not at the end
                return header
        data = store.get_bytes(key)
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


def _exam_result(
    session: Session, store: ObjectStore, export: ExamExport, *, captures: bool, max_pixels: int
) -> ExamResult | None:
    images = list(
        session.scalars(
            select(Image)
            .where(
                Image.study_id == export.study_id,
                Image.status == ImageStatus.DONE,
                Image.media_type == MediaType.DICOM.value,
            )
            .order_by(Image.id)
        )
    )
    predictions = latest_predictions(
        session=session, tenant_id=export.tenant_id, image_ids=[i.id for i in images]
    )
    assessment = assess_exam(images, predictions, site_thresholds(session, export.tenant_id))
    if assessment.recommendation is None or not predictions:
        return None
    version = assessment.recommendation.model_version
    results = []
    for image in images:
        prediction = predictions.get(image.id)
        if prediction is None or image.laterality is None or image.view is None:
            continue
        data = store.get_bytes(image.object_key) if captures else None
        header = _stored_header(store, image.object_key, data)
        heatmap_png = (
            store.get_bytes_or_none(prediction.heatmap_key) if prediction.heatmap_key else None
        )
        heatmap = (
            np.asarray(PILImage.open(io.BytesIO(heatmap_png)), dtype=np.float32) / 255.0
            if heatmap_png is not None
            else None
        )
        pixels = (
            decode_image(data, image.media_type, max_pixels=max_pixels)
            if data is not None and heatmap is not None
            else None
        )
        results.append(
            ImageResult(
                image_id=image.id,
                header=header,
                laterality=image.laterality,
                view=image.view,
                score=prediction.malignancy_score,
                heatmap=heatmap,
                pixels=pixels,
                warnings=tuple(prediction.warnings),
            )
        )
    return ExamResult(
        study_id=export.study_id,
        model_version_id=version.id,
        model_version_name=version.name,
        images=results,
        assessment=assessment,
    )


def render_due(session: Session, *, settings: Settings, store: ObjectStore, limit: int = 5) -> int:
    """Render pending exam exports; returns how many were rendered."""
    exports = list(
        session.scalars(
            select(ExamExport)
            .where(ExamExport.status == ExportStatus.PENDING)
            .order_by(ExamExport.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    rendered = 0
    for export in exports:
        captures = bool(
            session.scalar(
                select(ExportDestination.id).where(
                    ExportDestination.tenant_id == export.tenant_id,
                    ExportDestination.secondary_capture.is_(True),
                    ExportDestination.disabled_at.is_(None),
                )
            )
        )
        try:
            exam = _exam_result(
                session, store, export, captures=captures, max_pixels=settings.max_image_pixels
            )
            if exam is None:
                export.status = ExportStatus.FAILED
                export.error_code = "not_scored_by_one_model"
                export.error_message = (
                    "the exam's images were not all scored by one model version, so it has no "
                    "single recommendation to report"
                )
                continue
            objects = render_exam(
                exam, deidentifier_for(settings.patient_key_secret), captures=captures
            )
        except (S3Error, StorageConnectionError) as err:
            # An outage of the object store is not the exam's fault: try again next sweep.
            log.warning(
                "DICOM results of exam %s wait for the object store: %s", export.study_id, err
            )
            continue
        except Exception as err:
            log.exception("could not render the DICOM results of exam %s", export.study_id)
            export.attempts += 1
            if export.attempts >= RENDER_ATTEMPTS:
                export.status = ExportStatus.FAILED
                export.error_code = "render_failed"
                export.error_message = f"{type(err).__name__}: {err}"[:500]
            continue
        described = []
        for item in objects:
            key = Keys.dicom_result(export.study_id, item.kind, item.image_id)
            buffer = io.BytesIO()
            item.dataset.save_as(buffer, enforce_file_format=True)
            store.put_bytes(key, buffer.getvalue(), content_type="application/dicom")
            described.append(
                {
                    "kind": item.kind,
                    "key": key,
                    "image_id": str(item.image_id) if item.image_id else None,
                    "sop_class_uid": str(item.dataset.SOPClassUID),
                    "sop_instance_uid": str(item.dataset.SOPInstanceUID),
                }
            )
        export.objects = described
        export.attempts += 1
        export.status = ExportStatus.RENDERED
        export.rendered_at = utcnow()
        rendered += 1
    return rendered


# -- sending -------------------------------------------------------------------------------------


def send_c_store(
    datasets: Sequence[Dataset], *, settings: Settings, ae_title: str, host: str, port: int
) -> None:
    ae = AE(ae_title=settings.dicom_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.export_timeout_s
    for sop_class in sorted({str(d.SOPClassUID) for d in datasets}):
        syntaxes = sorted(
            {
                str(d.file_meta.TransferSyntaxUID)
                for d in datasets
                if str(d.SOPClassUID) == sop_class
            }
            | {ExplicitVRLittleEndian}
        )
        # One context per transfer syntax, so a peer can accept the object as it is stored
        # and not only the uncompressed fallback.
        for syntax in syntaxes:
            ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        raise DeliveryFailed(
            f"{ae_title} at {host}:{port} refused or did not answer the association"
        )
    try:
        for dataset in datasets:
            status = assoc.send_c_store(_sendable(dataset, assoc))
            code = int(status.Status) if "Status" in status else None
            if code is None:
                raise DeliveryFailed(f"{ae_title} did not answer a C-STORE (connection lost?)")
            if code != SUCCESS and code not in STORE_WARNINGS:
                raise DeliveryFailed(
                    f"{ae_title} refused {dataset.SOPClassUID.name} with status 0x{code:04X}",
                    status_code=code,
                )
    finally:
        assoc.release()


def _sendable(dataset: Dataset, assoc: object) -> Dataset:
    """The dataset in a transfer syntax the peer accepted for its class (decompressed if the
    peer took only uncompressed)."""
    accepted = {
        str(c.transfer_syntax[0])
        for c in assoc.accepted_contexts  # type: ignore[attr-defined]
        if c.abstract_syntax == dataset.SOPClassUID
    }
    if str(dataset.file_meta.TransferSyntaxUID) in accepted:
        return dataset
    if ExplicitVRLittleEndian in accepted:
        # The same object, so the same SOP Instance UID (pydicom would mint a new one).
        dataset.decompress(generate_instance_uid=False)
        return dataset
    raise DeliveryFailed(f"the peer accepts no transfer syntax for {dataset.SOPClassUID.name}")


def send_stow_rs(datasets: Sequence[Dataset], *, url: str, timeout_s: float) -> None:
    client = DICOMwebClient(url=url, session=requests.Session(), timeout=timeout_s)
    # The client would retry every failure itself, five times over 30 s of back-off, holding
    # the delivery loop (and every other delivery) on one busy or dead destination; the
    # delivery schedule (`export_retry_base_s`, `export_max_attempts`) is the one retry.
    client.set_http_retry_params(retry=False)
    try:
        answer = client.store_instances(list(datasets))
    except requests.HTTPError as err:
        code = err.response.status_code if err.response is not None else None
        raise DeliveryFailed(f"STOW-RS to {url} answered {code}", status_code=code) from err
    except requests.RequestException as err:
        raise DeliveryFailed(f"STOW-RS to {url} failed: {type(err).__name__}: {err}") from err
    failed = answer.get("FailedSOPSequence") if answer is not None else None
    if failed:
        reasons = sorted({int(item.get("FailureReason", 0)) for item in failed})
        raise DeliveryFailed(
            f"STOW-RS to {url} refused {len(failed)} objects (reasons {reasons})",
            status_code=reasons[0] if reasons else None,
        )


def _send(destination: ExportDestination, datasets: Sequence[Dataset], settings: Settings) -> None:
    if destination.transport == Transport.DIMSE:
        node = destination.dicom_node
        assert node is not None
        assert node.host is not None
        assert node.port is not None
        send_c_store(
            datasets, settings=settings, ae_title=node.ae_title, host=node.host, port=node.port
        )
    else:
        assert destination.url is not None
        send_stow_rs(datasets, url=destination.url, timeout_s=settings.export_timeout_s)


def deliver_due(session: Session, *, settings: Settings, store: ObjectStore, limit: int = 5) -> int:
    """Send due deliveries of rendered exports; returns how many were delivered now."""
    due = session.execute(
        select(ExportDelivery, ExamExport)
        .join(ExamExport, ExamExport.study_id == ExportDelivery.study_id)
        .where(
            ExportDelivery.status == ExportDeliveryStatus.PENDING,
            ExportDelivery.next_attempt_at <= utcnow(),
            ExamExport.status != ExportStatus.PENDING,
        )
        .order_by(ExportDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(of=ExportDelivery, skip_locked=True)
    ).all()
    delivered = 0
    for delivery, export in due:
        delivery.attempts += 1
        try:
            if export.status == ExportStatus.FAILED:
                raise DeliveryFailed(
                    f"the exam's results could not be rendered: {export.error_message}"
                )
            keeps_identity = bool(
                session.scalar(select(Tenant.identity_vault).where(Tenant.id == delivery.tenant_id))
            )
            objects = export_objects(
                session,
                settings=settings,
                store=store,
                export=export,
                identified=keeps_identity,
                actor=SYSTEM_ACTOR,
                purpose=f"delivery to {delivery.destination.name}",
            )
            delivery.identified = objects.identified
            _send(delivery.destination, objects.datasets, settings)
        # Any failure counts as an attempt, so retries stay bounded whatever went wrong.
        except Exception as err:
            if isinstance(err, (DeliveryFailed, VaultKeyMissing, OSError)):
                reason = str(err)
            else:
                # The objects carried identities by now: only the type is logged and shown.
                reason = f"unexpected {type(err).__name__}"
                log.error("delivery %s failed: %s", delivery.id, reason)
            delivery.last_status_code = getattr(err, "status_code", None)
            delivery.last_error = reason[:500]
            if delivery.attempts >= settings.export_max_attempts:
                delivery.status = ExportDeliveryStatus.DEAD
                log.warning(
                    "delivery %s to %s is dead after %d attempts: %s",
                    delivery.id,
                    delivery.destination.name,
                    delivery.attempts,
                    reason,
                )
            else:
                delivery.next_attempt_at = utcnow() + backoff(settings, delivery.attempts)
            continue
        delivery.status = ExportDeliveryStatus.DELIVERED
        delivery.delivered_at = utcnow()
        delivery.last_status_code = (
            SUCCESS if delivery.destination.transport == Transport.DIMSE else 200
        )
        delivery.last_error = None
        delivered += 1
    return delivered
