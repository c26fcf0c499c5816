"""Erasure: a patient's data, or a batch, removed from every table and the object store.

What goes, for each image erased: its stored object, preview, heatmaps and overlays (every
version's), its predictions, shadow scores, vault record and training examples; for each
study: its outcomes, its DICOM results (objects, renders and deliveries); then the images and
studies themselves, and for a batch its own rows (rejected files, webhook delivery,
counters). The audit log keeps the fact (who, when, how many of each kind), never who the
patient was: the request's patient id is not written anywhere.

Order, so that an erasure interrupted at any point is finished by running it again (it is
idempotent) and never leaves a row pointing at nothing: the images' rows are locked first
(a worker recording one of them waits, then finds it gone: services/worker/inference.py
drops what it wrote meanwhile), the objects are deleted, then the rows, in one transaction.
What a process writes for an erased image after that (a worker mid-flight, the DICOM
renderer) has no row to belong to, and the orphan sweep (services/worker/sweeper.py)
deletes it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from shared.db.models import (
    Batch,
    BatchImageCounts,
    BatchPredictionCounts,
    ExamExport,
    ExamOutcome,
    ExportDelivery,
    IdentityRecord,
    Image,
    Prediction,
    RejectedFile,
    ShadowScore,
    Study,
    TrainingExample,
    WebhookDelivery,
)
from shared.imaging.intake import patient_key
from shared.storage import Keys, ObjectStore


@dataclass
class ErasureReport:
    """How many of each kind an erasure removed (all zero when there was nothing left)."""

    batches: int = 0
    studies: int = 0
    images: int = 0
    objects: int = 0
    predictions: int = 0
    shadow_scores: int = 0
    outcomes: int = 0
    identity_records: int = 0
    dicom_results: int = 0  # exams' rendered DICOM results and their deliveries
    training_examples: int = 0
    rejected_files: int = 0
    # The batches that lost images (a patient's erasure may complete one): not a count.
    batch_ids: list[uuid.UUID] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "batch_ids"}


def patient_keys(secret: str, tenant_id: uuid.UUID, patient_id: str) -> set[str]:
    """The keyed hashes the intake may have stored for this patient id: as given, and
    without the padding a DICOM header can carry."""
    return {patient_key(secret, tenant_id, value) for value in {patient_id, patient_id.strip()}}


def image_object_keys(store: ObjectStore, images: Sequence[Image]) -> list[str]:
    """Every object of these images: each stored file, its preview, each version's heatmaps
    (their prefixes listed side by side: one listing per image)."""
    own = [key for image in images for key in (image.object_key, Keys.preview(image.id))]
    return own + store.list_keys_under([Keys.heatmaps_of(image.id) for image in images])


def study_object_keys(store: ObjectStore, study_ids: Sequence[uuid.UUID]) -> list[str]:
    return store.list_keys_under([Keys.dicom_results_of(study_id) for study_id in study_ids])


def _deleted(session: Session, statement: object) -> int:
    return int(session.execute(statement).rowcount)  # type: ignore[call-overload]


def _erase(
    session: Session,
    store: ObjectStore,
    *,
    images: Sequence[Image],
    study_ids: Iterable[uuid.UUID],
) -> ErasureReport:
    """Delete the objects, then the rows, of these (locked) images and studies; the caller
    commits."""
    study_ids = sorted(set(study_ids))
    image_ids = [image.id for image in images]
    report = ErasureReport(batch_ids=sorted({image.batch_id for image in images}))
    keys = image_object_keys(store, images) + study_object_keys(store, study_ids)
    # A thousand per request; deleting a missing object succeeds (S3), so a rerun goes on.
    report.objects = store.delete_many(keys)
    if image_ids:
        by_image = (
            (Prediction, "predictions"),
            (ShadowScore, "shadow_scores"),
            (IdentityRecord, "identity_records"),
            (TrainingExample, "training_examples"),
        )
        for model, field in by_image:
            removed = _deleted(session, delete(model).where(model.image_id.in_(image_ids)))
            setattr(report, field, removed)
    if study_ids:
        report.outcomes = _deleted(
            session, delete(ExamOutcome).where(ExamOutcome.study_id.in_(study_ids))
        )
        report.dicom_results = _deleted(
            session, delete(ExportDelivery).where(ExportDelivery.study_id.in_(study_ids))
        ) + _deleted(session, delete(ExamExport).where(ExamExport.study_id.in_(study_ids)))
    if image_ids:
        report.images = _deleted(session, delete(Image).where(Image.id.in_(image_ids)))
    if study_ids:
        report.studies = _deleted(session, delete(Study).where(Study.id.in_(study_ids)))
    return report


def erase_patient(
    session: Session, store: ObjectStore, *, tenant_id: uuid.UUID, keys: set[str]
) -> ErasureReport:
    """Every study of the tenant whose patient key is one of `keys`, with all that belongs to
    it. Another tenant's patient of the same id has another key and is untouched."""
    study_ids = list(
        session.scalars(
            select(Study.id).where(Study.tenant_id == tenant_id, Study.patient_key.in_(keys))
        )
    )
    images = _locked_images(session, Image.study_id.in_(study_ids)) if study_ids else []
    return _erase(session, store, images=images, study_ids=study_ids)


def erase_batch(
    session: Session, store: ObjectStore, *, tenant_id: uuid.UUID, batch_id: uuid.UUID
) -> ErasureReport | None:
    """The batch and everything in it; None when the tenant has no such batch."""
    batch = session.scalar(
        select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id).with_for_update()
    )
    if batch is None:
        return None
    images = _locked_images(session, Image.batch_id == batch_id)
    study_ids = session.scalars(select(Study.id).where(Study.batch_id == batch_id))
    report = _erase(session, store, images=images, study_ids=study_ids)
    # What is left of the batch: deliveries of exams of other batches never point here.
    report.dicom_results += _deleted(
        session, delete(ExportDelivery).where(ExportDelivery.batch_id == batch_id)
    ) + _deleted(session, delete(ExamExport).where(ExamExport.batch_id == batch_id))
    report.rejected_files = _deleted(
        session, delete(RejectedFile).where(RejectedFile.batch_id == batch_id)
    )
    for model in (WebhookDelivery, BatchImageCounts, BatchPredictionCounts):
        session.execute(delete(model).where(model.batch_id == batch_id))
    session.delete(batch)
    session.flush()
    report.batches = 1
    return report


def _locked_images(session: Session, where: object) -> list[Image]:
    """The images, locked in id order (as the worker locks them): a worker recording one of
    them finishes first, and one that comes after finds the row gone."""
    return list(
        session.scalars(
            select(Image).where(where).order_by(Image.id).with_for_update()  # type: ignore[arg-type]
        )
    )
