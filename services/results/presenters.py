"""What the results API and the viewer both show: exams (by `shared.exams`' rule) in the
public schema, and an image's latest prediction."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.orm import Session

from services.results.schemas import (
    DriftInputs,
    DriftReport,
    DriftWeek,
    Exam,
    ModelVersionPublic,
    OriginalIds,
)
from shared.api.deps import Caller
from shared.batches import latest_predictions
from shared.config import Settings
from shared.db.models import Image, Prediction, PredictionWarning
from shared.drift import ScoreReference, drift_warning, drift_weeks
from shared.exams import (
    NO_SITE_THRESHOLDS,
    ExamView,
    ScoringVersion,
    ViewPrediction,
    assess_views,
)
from shared.vault import VaultKeyMissing, open_identities

UNTRAINED_WARNING = (
    "scores in this batch come from an untrained (randomly initialised) model and carry no "
    "diagnostic meaning"
)
UNLIKE_TRAINING_WARNING = (
    "{count} image(s) look unlike the images the model was trained on "
    "(input_unlike_training_data: another scanner, a film scan, other processing?); their "
    "scores may not mean what the model's evaluation says. Validate the model on such images "
    "before relying on it."
)


class ShownImage(ExamView, Protocol):
    """An `Image` row, or a page's `PageImage` (enums as their values)."""

    @property
    def status(self) -> str: ...
    @property
    def error_code(self) -> str | None: ...
    @property
    def image_purged_at(self) -> datetime | None: ...


class ShownPrediction(ViewPrediction, Protocol):
    """A `Prediction` row, or a page's `LatestPrediction`."""

    @property
    def heatmap_key(self) -> str | None: ...
    @property
    def warnings(self) -> list[str]: ...


class ShownStudy(Protocol):
    @property
    def id(self) -> uuid.UUID: ...
    @property
    def study_key(self) -> str: ...
    @property
    def patient_key(self) -> str: ...


class TrainedOrNot(Protocol):
    @property
    def trained(self) -> bool: ...


def batch_warnings(
    versions: Sequence[TrainedOrNot],
    flagged: dict[str, int],
    drift: Sequence[Mapping[str, Any]] = (),
    psi_threshold: float = 0.0,
) -> list[str]:
    """What a reader of the batch must be told, in words: an untrained model, how many
    images look unlike the model's training inputs (`flagged`: images per warning code), and
    the drift alarms of the batch's weeks (BatchStatusRead.drift)."""
    warnings = [UNTRAINED_WARNING] if any(not v.trained for v in versions) else []
    unlike = flagged.get(PredictionWarning.INPUT_UNLIKE_TRAINING_DATA.value)
    if unlike:
        warnings.append(UNLIKE_TRAINING_WARNING.format(count=unlike))
    warnings += [
        drift_warning(
            week_start=str(week["week_start"]),
            psi=float(week["psi"]),
            exams=int(week["exams"]),
            threshold=psi_threshold,
        )
        for week in drift
    ]
    return warnings


def latest_prediction(session: Session, caller: Caller, image: Image) -> Prediction | None:
    """The image's newest prediction (the caller already found the image for this tenant)."""
    found = latest_predictions(session=session, tenant_id=caller.tenant.id, image_ids=[image.id])
    return found.get(image.id)


def heatmap_url(image: ShownImage, prediction: ShownPrediction | None) -> str | None:
    if prediction is None or prediction.heatmap_key is None or image.image_purged_at:
        return None
    return f"/v1/images/{image.id}/heatmap.png"


def version_data(
    version: ScoringVersion, known: dict[uuid.UUID, dict[str, object]] | None = None
) -> dict[str, object]:
    """The version as results show it (`ModelVersionPublic`'s fields) as plain data; `known`
    keeps those a page already made."""
    public = None if known is None else known.get(version.id)
    if public is None:
        public = {
            "id": version.id,
            "name": version.name,
            "status": version.status,
            "trained": version.trained,
            "rejection_reason": version.rejection_reason,
        }
        if known is not None:
            known[version.id] = public
    return public


def exam_public(
    study: ShownStudy,
    views: Sequence[tuple[ShownImage, ShownPrediction | None]],
    known_versions: dict[uuid.UUID, dict[str, object]] | None = None,
    site_thresholds: Mapping[uuid.UUID, float] = NO_SITE_THRESHOLDS,
) -> Exam:
    """An exam as the API shows it, from its images, each with its latest prediction or None;
    `site_thresholds`: the tenant's own recall thresholds (shared/operating_points.py)."""
    return Exam.model_validate(exam_data(study, views, known_versions, site_thresholds))


def exam_data(
    study: ShownStudy,
    views: Sequence[tuple[ShownImage, ShownPrediction | None]],
    known_versions: dict[uuid.UUID, dict[str, object]] | None = None,
    site_thresholds: Mapping[uuid.UUID, float] = NO_SITE_THRESHOLDS,
) -> dict[str, object]:
    """`exam_public` as plain data, every field of `Exam` in its JSON form or one that
    serializes to it: a page of them is written without building the models (the tests hold
    it to `Exam`)."""
    assessment = assess_views(views, site_thresholds)
    advice = assessment.recommendation
    return {
        "id": study.id,
        "study_key": study.study_key,
        "patient_key": study.patient_key,
        "images": [
            {
                "id": i.id,
                "laterality": i.laterality,
                "view": i.view,
                "status": i.status,
                "score": p.malignancy_score if p else None,
                "error_code": i.error_code,
                "heatmap_url": heatmap_url(i, p),
                "warnings": list(p.warnings) if p else [],
                "image_purged_at": i.image_purged_at,
            }
            for i, p in views
        ],
        "views_present": assessment.views_present,
        "missing_views": assessment.missing_views,
        "breasts": [
            {"laterality": b.laterality.value, "score": b.score, "views": list(b.views)}
            for b in assessment.breasts
        ],
        "exam_score": assessment.exam_score,
        "exam_probability": advice.exam_probability if advice else None,
        "recall": (
            None
            if advice is None or advice.recall is None
            else ("recall" if advice.recall else "routine")
        ),
        "recall_threshold": advice.recall_threshold if advice else None,
        "threshold_source": advice.threshold_source if advice else None,
        "model_version": version_data(advice.model_version, known_versions) if advice else None,
        "warnings": sorted({w for _, p in views if p is not None for w in p.warnings}),
        "original": None,
        "original_error": None,
    }


def show_originals(
    session: Session,
    settings: Settings,
    caller: Caller,
    batch_id: uuid.UUID,
    page: Sequence[tuple[uuid.UUID, Sequence[ExamView]]],
    exams: Sequence[Exam],
) -> None:
    """Add each exam's original patient id and accession number from the vault (one audited
    opening for the page: (study id, its images) per exam); a vault key that is not
    configured leaves them out, saying why."""
    first_images = {images[0].id: study_id for study_id, images in page if images}
    try:
        opened = open_identities(
            session,
            settings=settings,
            tenant_id=caller.tenant.id,
            image_ids=list(first_images),
            purpose="view",
            actor=caller.key_prefix,
            resource_type="batch_exams",
            resource_id=batch_id,
        )
    except VaultKeyMissing as err:
        for exam in exams:
            exam.original_error = err.code
        return
    by_study = {first_images[image_id]: identity for image_id, identity in opened.items()}
    for exam in exams:
        identity = by_study.get(exam.id)
        if identity is not None:
            exam.original = OriginalIds(
                patient_id=identity.patient_id, accession_number=identity.accession_number
            )


def drift_report(
    session: Session, settings: Settings, tenant_id: uuid.UUID, weeks: int
) -> DriftReport:
    """The tenant's recent weeks of drift figures (shared/drift.py), newest first."""
    shown = []
    for row, version in drift_weeks(session, tenant_id=tenant_id, weeks=weeks):
        reference = ScoreReference.from_dict(version.score_reference)
        shown.append(
            DriftWeek(
                week_start=row.week_start,
                model_version=ModelVersionPublic.model_validate(version),
                exams=row.exams,
                psi=row.psi,
                alarm=row.alarm,
                bin_shares=row.bin_shares,
                reference_shares=reference.shares if reference else [],
                reference_edges=reference.edges if reference else [],
                inputs=DriftInputs(**row.inputs),
                computed_at=row.computed_at,
            )
        )
    return DriftReport(
        psi_threshold=settings.drift_psi_threshold,
        min_exams=settings.drift_min_exams,
        weeks=shown,
    )
