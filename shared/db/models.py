"""The relational data model. Every row a tenant owns carries tenant_id."""

from __future__ import annotations

import enum
import uuid
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from shared.db.base import Base, new_id, utcnow


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Store the enum's values (lower-case strings users see in the API), not member names.
    return Enum(cls, name=name, values_callable=lambda members: [m.value for m in members])


class BatchStatus(enum.StrEnum):
    OPEN = "open"  # taking images
    PROCESSING = "processing"  # closed, work left
    COMPLETED = "completed"  # closed, every image done or failed


class BatchPriority(enum.StrEnum):
    NORMAL = "normal"
    URGENT = "urgent"


class BatchPurpose(enum.StrEnum):
    SCREENING = "screening"  # images are queued for screening
    TRAINING = "training"  # images are kept for training runs and never screened


class BatchSource(enum.StrEnum):
    API = "api"  # created by POST /v1/batches, filled by uploads
    DICOM = "dicom"  # one study's instances sent to the DICOM gateway by C-STORE
    DICOMWEB = "dicomweb"  # one study's instances posted by STOW-RS


class ImageStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    STORED = "stored"  # in a training batch: kept for training, not screened


TERMINAL_IMAGE_STATUSES = (ImageStatus.DONE, ImageStatus.FAILED, ImageStatus.STORED)


class Laterality(enum.StrEnum):
    LEFT = "L"
    RIGHT = "R"


class View(enum.StrEnum):
    CC = "CC"
    MLO = "MLO"


class ModelStatus(enum.StrEnum):
    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"
    # Registered, but its evaluation did not show it better than chance or than the active
    # version; promoting it takes --force and a reason the audit log keeps.
    REJECTED = "rejected"


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Signs webhook deliveries (HMAC-SHA256); made on first use, shown to the tenant's keys.
    webhook_secret: Mapped[str | None] = mapped_column(String(64))
    # Keep each DICOM image's original identifiers, encrypted (shared/vault.py), so results
    # can go back into the patient's real study. Off: nothing is kept, and exported objects
    # carry the de-identified UIDs only.
    identity_vault: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    # Retention (shared/retention.py): days after a batch completes that its images (stored
    # files, previews, heatmaps) are kept, and that the batch with its results is kept.
    # None: kept until erased.
    image_retention_days: Mapped[int | None] = mapped_column(Integer)
    result_retention_days: Mapped[int | None] = mapped_column(Integer)

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant")


class Scope(enum.StrEnum):
    """What an API key may do (README "API keys and scopes")."""

    # create batches, upload, close, start training runs, retry deliveries, record outcomes,
    # ask for evaluations, set the site's operating points
    SUBMIT = "submit"
    READ = "read"  # batches, exams, results, heatmaps, models, de-identified DICOM results
    EXPORT_IDENTIFIED = "export_identified"  # original identifiers and identified DICOM
    AUDIT = "audit"  # the tenant's audit log
    # erase a batch or a patient's exams (shared/erasure.py); given to no key by default
    ERASE = "erase"


DEFAULT_SCOPES = (Scope.SUBMIT, Scope.READ)


class ApiKey(Base):
    """An API key; only its SHA-256 is stored, found by its public prefix."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(
        ARRAY(String(32)), default=lambda: [s.value for s in DEFAULT_SCOPES]
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_tenant_created", "tenant_id", "created_at", "id"),
        # The retention scan: completed batches, oldest first.
        Index(
            "ix_batches_completed_at",
            "completed_at",
            postgresql_where=text("completed_at IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200))
    priority: Mapped[BatchPriority] = mapped_column(
        _enum(BatchPriority, "batch_priority"), default=BatchPriority.NORMAL
    )
    status: Mapped[BatchStatus] = mapped_column(
        _enum(BatchStatus, "batch_status"), default=BatchStatus.OPEN
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    # Where a signed summary is POSTed when the batch completes (webhooks, shared/webhooks.py).
    callback_url: Mapped[str | None] = mapped_column(String(2048))
    purpose: Mapped[BatchPurpose] = mapped_column(
        _enum(BatchPurpose, "batch_purpose"), default=BatchPurpose.SCREENING
    )
    # A batch assembled from DICOM (C-STORE or STOW-RS) holds one study: its pseudonymous
    # Study Instance UID, the node that sent it (C-STORE), and a keyed hash of its accession
    # number. It closes after a quiet period without new instances (shared/dicom_studies.py).
    source: Mapped[BatchSource] = mapped_column(
        _enum(BatchSource, "batch_source"), default=BatchSource.API
    )
    dicom_study_key: Mapped[str | None] = mapped_column(String(128))
    dicom_node_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("dicom_nodes.id"))
    accession_key: Mapped[str | None] = mapped_column(String(64))
    # When retention removed the last of its images' objects (None: not yet, or never due).
    images_purged_at: Mapped[datetime | None]

    dicom_node: Mapped[DicomNode | None] = relationship()

    @property
    def sent_by(self) -> str | None:
        """The calling AE title of the node that sent the study (C-STORE batches)."""
        return self.dicom_node.ae_title if self.dicom_node is not None else None


# At most one open batch assembles a study's instances; a later instance of a closed study
# starts a follow-up batch.
Index(
    "uq_batches_open_dicom_study",
    Batch.tenant_id,
    Batch.dicom_study_key,
    unique=True,
    postgresql_where=text("status = 'open' AND dicom_study_key IS NOT NULL"),  # see dicom_studies
)


class DicomNode(Base):
    """A DICOM node (PACS, modality, router) allowed to send a tenant's studies: its calling AE
    title, and its host when set (then only that host may use the title). Results go back to
    its host and port."""

    __tablename__ = "dicom_nodes"
    __table_args__ = (UniqueConstraint("ae_title", "host", postgresql_nulls_not_distinct=True),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Study(Base):
    """One screening exam: the images of one study of one patient, within a batch."""

    __tablename__ = "studies"
    __table_args__ = (
        UniqueConstraint("batch_id", "study_key"),
        Index("ix_studies_batch_id_id", "batch_id", "id"),  # a batch's exams pages
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    batch_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("batches.id"))
    # Keyed hash of the patient id (never the id itself): groups a patient's exams.
    patient_key: Mapped[str] = mapped_column(String(64))
    # The uploader's study identifier (StudyInstanceUID for DICOM).
    study_key: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class OutcomeTruth(enum.StrEnum):
    MALIGNANT = "malignant"
    BENIGN = "benign"
    NORMAL = "normal"


class Breast(enum.StrEnum):
    LEFT = "left"
    RIGHT = "right"
    BOTH = "both"


class OutcomeSource(enum.StrEnum):
    """Where the site's truth comes from, strongest first."""

    BIOPSY = "biopsy"
    SURGERY = "surgery"
    FOLLOW_UP = "follow_up"  # e.g. a normal next screening round
    REGISTRY = "registry"  # a cancer registry match
    OTHER = "other"


class ExamOutcome(Base):
    """What became of an exam: the site's truth for one breast (or both) from one source.

    One row per (exam, breast, source): recording it again replaces it, so a bulk import can
    be repeated without adding rows."""

    __tablename__ = "exam_outcomes"
    __table_args__ = (UniqueConstraint("study_id", "breast", "source"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    study_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("studies.id"))
    truth: Mapped[OutcomeTruth] = mapped_column(_enum(OutcomeTruth, "outcome_truth"))
    breast: Mapped[Breast] = mapped_column(_enum(Breast, "breast"))
    source: Mapped[OutcomeSource] = mapped_column(_enum(OutcomeSource, "outcome_source"))
    outcome_date: Mapped[date]
    # The API key's prefix that recorded it last.
    recorded_by: Mapped[str] = mapped_column(String(32))
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        Index("ix_images_batch_id_id", "batch_id", "id"),
        Index("ix_images_batch_status", "batch_id", "status"),
        # The sweeper's scans: unfinished images only.
        Index(
            "ix_images_unfinished",
            "status",
            "enqueued_at",
            postgresql_where=text("status IN ('queued', 'running')"),
        ),
        # The shadow scorer's scan: images finished since a time, oldest first.
        Index(
            "ix_images_done_finished_at", "finished_at", postgresql_where=text("status = 'done'")
        ),
        CheckConstraint("size_bytes >= 0", name="size_nonnegative"),
        # A DICOM instance sent twice (a sender's retry) is one image.
        Index(
            "uq_images_tenant_sop_instance",
            "tenant_id",
            "sop_instance_key",
            unique=True,
            postgresql_where=text("sop_instance_key IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    batch_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("batches.id"))
    study_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("studies.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    object_key: Mapped[str] = mapped_column(String(512), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str] = mapped_column(String(64))
    laterality: Mapped[Laterality | None] = mapped_column(_enum(Laterality, "laterality"))
    view: Mapped[View | None] = mapped_column(_enum(View, "view_position"))
    # DICOM received over the network (C-STORE, STOW-RS): the pseudonymous SOP Instance UID.
    sop_instance_key: Mapped[str | None] = mapped_column(String(128))
    # Non-identifying acquisition metadata from the DICOM header, for drift and breakdowns:
    # Manufacturer, Manufacturer's Model Name, and the pixel spacing in mm (Pixel Spacing,
    # else Imager Pixel Spacing). None for PNG/JPEG uploads and headers without them.
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    manufacturer_model: Mapped[str | None] = mapped_column(String(64))
    pixel_spacing_mm: Mapped[float | None] = mapped_column(Float)
    status: Mapped[ImageStatus] = mapped_column(
        _enum(ImageStatus, "image_status"), default=ImageStatus.QUEUED
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Outbox: when this image's work was last handed to the broker (None: not yet).
    enqueued_at: Mapped[datetime | None]
    # While running: when the claiming worker's lease ends, after which the sweeper may
    # return the image to the queue (the worker is presumed dead).
    lease_expires_at: Mapped[datetime | None]
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # When retention deleted its stored file, preview and heatmaps; its result stays.
    image_purged_at: Mapped[datetime | None]

    study: Mapped[Study] = relationship()
    predictions: Mapped[list[Prediction]] = relationship(back_populates="image")


# Counter rows are spread over this many shards per batch: a writer adds to the shard of its
# own database connection, so workers finishing images of one batch at once do not queue on
# one row lock until their commits.
COUNTER_SHARDS = 16


class BatchImageCounts(Base):
    """One shard of a batch's counters: images by status, rejected files, and a version that
    grows with every change a status answer shows.

    Kept by triggers (migration 0013) in the transaction of every insert, status change and
    delete of the batch's images, predictions and rejected files, whoever writes them; they
    also NOTIFY `batch_changed` with the batch id, delivered when that transaction commits. A
    status answer and its ETag read these rows instead of counting the batch's images.
    """

    __tablename__ = "batch_image_counts"

    batch_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    queued: Mapped[int] = mapped_column(BigInteger, default=0)
    running: Mapped[int] = mapped_column(BigInteger, default=0)
    done: Mapped[int] = mapped_column(BigInteger, default=0)
    failed: Mapped[int] = mapped_column(BigInteger, default=0)
    stored: Mapped[int] = mapped_column(BigInteger, default=0)
    rejected: Mapped[int] = mapped_column(BigInteger, default=0)
    version: Mapped[int] = mapped_column(BigInteger, default=0)


class BatchPredictionCounts(Base):
    """One shard of how many of a batch's images a model version scored (`warning` empty) and
    flagged with each warning code: the batch's "model versions used" and warning counts,
    kept by the same triggers as BatchImageCounts."""

    __tablename__ = "batch_prediction_counts"

    batch_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    model_version_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("model_versions.id"), primary_key=True
    )
    warning: Mapped[str] = mapped_column(String(64), primary_key=True)
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    images: Mapped[int] = mapped_column(BigInteger, default=0)


class RejectedFile(Base):
    """An uploaded file the quality gate refused: kept so results can show why, not what."""

    __tablename__ = "rejected_files"
    __table_args__ = (Index("ix_rejected_files_batch_id_id", "batch_id", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    batch_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("batches.id"))
    filename: Mapped[str] = mapped_column(String(600))
    code: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookDelivery(Base):
    """One batch's completion notice: an outbox row, retried until delivered or given up."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    # Unique: a batch completes once, so it is announced once.
    batch_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("batches.id"), unique=True)
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[DeliveryStatus] = mapped_column(
        _enum(DeliveryStatus, "delivery_status"), default=DeliveryStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]


class ModelVersion(Base):
    """A registered model: its architecture config, checkpoint and lifecycle status."""

    __tablename__ = "model_versions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    architecture: Mapped[dict[str, Any]] = mapped_column(JSONB)
    checkpoint_key: Mapped[str] = mapped_column(String(512))
    status: Mapped[ModelStatus] = mapped_column(
        _enum(ModelStatus, "model_status"), default=ModelStatus.CANDIDATE
    )
    # An untrained (randomly initialised) model's scores mean nothing; everything that shows
    # them must say so.
    trained: Mapped[bool] = mapped_column(default=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Exam score at or above which the model recommends recall; chosen on validation data for
    # the run's target sensitivity. None for a model that was never evaluated.
    recall_threshold: Mapped[float | None] = mapped_column(Float)
    # Platt scaling of the exam score's logit: probability = sigmoid(a * logit + b).
    calibration: Mapped[dict[str, float] | None] = mapped_column(JSONB)
    model_card: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # The training inputs' statistics (shared/ml/input_reference.py): what an image must look
    # like for the version's scores to mean what its evaluation says. None: no warnings.
    input_reference: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # Why registration rejected the version (ModelStatus.REJECTED), in words for the operator.
    rejection_reason: Mapped[str | None] = mapped_column(Text)
    training_run_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("training_runs.id"))
    promoted_at: Mapped[datetime | None]
    retired_at: Mapped[datetime | None]
    # Its exam scores on held-out exams (shared/drift.py ScoreReference): what the weekly
    # score distribution at a site is compared with. None: no drift index for it.
    score_reference: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # Shadow mode: since when the version scores every newly screened image after the active
    # one, for evaluations and the agreement view only (shadow_scores); None: not in shadow.
    shadow_since: Mapped[datetime | None]


# At most one active model version at a time.
Index(
    "uq_model_versions_one_active",
    ModelVersion.status,
    unique=True,
    postgresql_where=ModelVersion.status == ModelStatus.ACTIVE,
)


# At most one version in shadow mode at a time.
Index(
    "uq_model_versions_one_shadow",
    ModelVersion.shadow_since.is_not(None),
    unique=True,
    postgresql_where=ModelVersion.shadow_since.is_not(None),
)


class ShadowScore(Base):
    """A shadow version's score of an image the active version screened. Kept apart from
    predictions, so it can reach no result, export or webhook; evaluations and the
    agreement view read it. `score` None: the image could not be scored (`error_code`)."""

    __tablename__ = "shadow_scores"

    image_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("images.id"), primary_key=True)
    model_version_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("model_versions.id"), primary_key=True
    )
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    score: Mapped[float | None] = mapped_column(Float)
    error_code: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PredictionWarning(enum.StrEnum):
    """Codes a reader must see beside a score (Prediction.warnings)."""

    # The image's statistics lie far from the model version's training inputs
    # (shared/ml/input_reference.py).
    INPUT_UNLIKE_TRAINING_DATA = "input_unlike_training_data"


class Prediction(Base):
    __tablename__ = "predictions"
    __table_args__ = (
        UniqueConstraint("image_id", "model_version_id"),
        # The weekly drift scan: one tenant's predictions in a time range.
        Index("ix_predictions_tenant_id_created_at", "tenant_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    image_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("images.id"))
    model_version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("model_versions.id"))
    malignancy_score: Mapped[float] = mapped_column(Float)
    heatmap_key: Mapped[str | None] = mapped_column(String(512))
    # How far the input lies from the model version's training inputs (Mahalanobis distance
    # of its statistics, shared/ml/input_reference.py); None when the version has no
    # reference.
    input_distance: Mapped[float | None] = mapped_column(Float)
    # The breast's median grey level after the VOI transform (the first input statistic):
    # the site's weekly intensity summary. None when the version computes no statistics.
    input_intensity: Mapped[float | None] = mapped_column(Float)
    # Codes a reader must see beside the score, e.g. "input_unlike_training_data".
    warnings: Mapped[list[str]] = mapped_column(ARRAY(String(64)), default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    image: Mapped[Image] = relationship(back_populates="predictions")
    model_version: Mapped[ModelVersion] = relationship()


class TrainingStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class Evaluation(Base):
    """One or two model versions measured on a tenant's exams that have outcomes: a queued
    job (the trainer's queue) whose figures land in `figures` (shared/ml/site_evaluation.py).
    Scores of a version that has not screened an image are computed for the evaluation and
    kept here only, never as predictions, so they reach no result, export or webhook."""

    __tablename__ = "evaluations"
    __table_args__ = (Index("ix_evaluations_tenant_id_id", "tenant_id", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    # The versions measured, in the order asked (the first is "a" of a comparison).
    model_version_ids: Mapped[list[uuid.UUID]] = mapped_column(ARRAY(Uuid))
    # Which exams: these batches' exams with an outcome, else every exam whose outcome date
    # falls in [outcomes_from, outcomes_to] (open ends allowed).
    batch_ids: Mapped[list[uuid.UUID]] = mapped_column(ARRAY(Uuid), default=list)
    outcomes_from: Mapped[date | None]
    outcomes_to: Mapped[date | None]
    seed: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[TrainingStatus] = mapped_column(
        _enum(TrainingStatus, "training_status"), default=TrainingStatus.QUEUED
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    figures: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set when it is queued, claimed or sent again: the sweeper resends one left too long.
    touched_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class ScoreDriftWeek(Base):
    """One tenant's week with one model version (shared/drift.py): how its exam scores
    compare with the version's held-out reference (population stability index), and what the
    week's inputs looked like. Recomputed by the sweeper while the week is young."""

    __tablename__ = "score_drift_weeks"

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    week_start: Mapped[date] = mapped_column(primary_key=True)  # a Monday (UTC)
    model_version_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("model_versions.id"), primary_key=True
    )
    exams: Mapped[int] = mapped_column(Integer)
    # None: the version has no score reference.
    psi: Mapped[float | None] = mapped_column(Float)
    # psi above settings.drift_psi_threshold on at least settings.drift_min_exams exams.
    alarm: Mapped[bool] = mapped_column(default=False)
    # The week's share of exams in each of the reference's bins.
    bin_shares: Mapped[list[float]] = mapped_column(ARRAY(Float), default=list)
    # Inputs: median breast intensity, median input distance, share flagged, median pixel
    # spacing, manufacturer mix (shares).
    inputs: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    computed_at: Mapped[datetime] = mapped_column(default=utcnow)


class OperatingTarget(enum.StrEnum):
    SENSITIVITY = "sensitivity"  # at least this share of malignant exams recalled
    RECALL_RATE = "recall_rate"  # at most this share of all exams recalled


class SiteOperatingPoint(Base):
    """A tenant's own recall threshold for a model version, chosen on one of its evaluations
    for a target sensitivity or recall rate; its recall recommendations use it instead of the
    version's. Results say which threshold they used and where it came from."""

    __tablename__ = "site_operating_points"
    __table_args__ = (UniqueConstraint("tenant_id", "model_version_id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    model_version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("model_versions.id"))
    target: Mapped[OperatingTarget] = mapped_column(_enum(OperatingTarget, "operating_target"))
    target_value: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    evaluation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("evaluations.id"))
    chosen_by: Mapped[str] = mapped_column(String(32))
    chosen_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrainingLabel(enum.StrEnum):
    MALIGNANT = "malignant"
    BENIGN = "benign"  # a lesion, not malignant
    NORMAL = "normal"


class Split(enum.StrEnum):
    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"


class TrainingRunKind(enum.StrEnum):
    SINGLE = "single"  # one train/validation/test split, one model
    # k folds and a final model: this row holds no data of its own; its stages do the work.
    CROSS_VALIDATION = "cross_validation"
    FOLD = "fold"  # one fold of a cross-validation: its held-out predictions, no model
    FINAL = "final"  # a cross-validation's model, trained on all the data


class TrainingRun(Base):
    """One training job: its dataset, hyperparameters, progress and resulting model version.

    `heartbeat_at` is renewed while a worker trains; a running run whose heartbeat stops (the
    worker died) is sent again by the sweeper and resumes from `checkpoint_key`.
    """

    __tablename__ = "training_runs"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[TrainingStatus] = mapped_column(
        _enum(TrainingStatus, "training_status"), default=TrainingStatus.QUEUED
    )
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSONB)
    kind: Mapped[TrainingRunKind] = mapped_column(
        _enum(TrainingRunKind, "training_run_kind"), default=TrainingRunKind.SINGLE
    )
    # A fold's or final model's cross-validation run, and which fold it is.
    parent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("training_runs.id"), index=True)
    fold: Mapped[int | None] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    split_sizes: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    epochs_done: Mapped[int] = mapped_column(Integer, default=0)
    checkpoint_key: Mapped[str | None] = mapped_column(String(512))
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    model_version_id: Mapped[uuid.UUID | None]
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class TrainingExample(Base):
    """A labelled image of a run's dataset and the split its patient was drawn into."""

    __tablename__ = "training_examples"

    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("training_runs.id"), primary_key=True)
    image_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("images.id"), primary_key=True)
    label: Mapped[TrainingLabel] = mapped_column(_enum(TrainingLabel, "training_label"))
    split: Mapped[Split] = mapped_column(_enum(Split, "data_split"))
    # The lesion's bounding box [x0, y0, x1, y1] in the image's pixels, when the labels give
    # one: it teaches the heatmap where the lesion is (see shared/ml/training.py).
    box: Mapped[list[int] | None] = mapped_column(JSONB)


class TrainingEpoch(Base):
    """One point of a run's metric curve; (run, epoch) is unique, so a resumed run that
    repeats an epoch replaces its row instead of adding a second one."""

    __tablename__ = "training_epochs"

    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("training_runs.id"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    train_loss: Mapped[float] = mapped_column(Float)
    # None for a run without a validation split (a cross-validation's final model).
    validation_loss: Mapped[float | None] = mapped_column(Float)
    validation_auc: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class InferenceBatch(Base):
    """One batched forward pass of a worker: what /metrics reports as inference time and
    batch size (shared/metrics.py). Written in the batch's own transaction."""

    __tablename__ = "inference_batches"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    model_version_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("model_versions.id"))
    images: Mapped[int] = mapped_column(Integer)
    forward_seconds: Mapped[float] = mapped_column(Float)
    device: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditAction(enum.StrEnum):
    CREATE = "create"
    UPLOAD = "upload"
    CLOSE = "close"
    READ = "read"
    EXPORT = "export"
    # Original identifiers taken out of the vault (shared/vault.py): for a delivery, a
    # download or a view by a key with the export_identified scope.
    DECRYPT_IDENTITY = "decrypt_identity"
    # Model registry changes: they alter every tenant's results, so they are system events
    # (no tenant) that every tenant's audit log lists.
    PROMOTE_MODEL = "promote_model"
    ROLLBACK_MODEL = "rollback_model"
    IMPORT_MODEL = "import_model"
    # Ground truth a site reports for its exams (biopsy, surgery, follow-up).
    RECORD_OUTCOME = "record_outcome"
    # A tenant's own recall threshold for a model version, set or cleared.
    SET_OPERATING_POINT = "set_operating_point"
    # A model version put in shadow mode, or taken out of it (a system event).
    SHADOW_MODEL = "shadow_model"
    # A batch or a patient's exams erased: the counts of what went, never whose they were.
    ERASE = "erase"


class AuditEvent(Base):
    """Who (tenant, key prefix) did what to which batch, study or image, and when.

    Append-only: a database trigger refuses UPDATE and DELETE on this table.
    """

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_tenant_id_id", "tenant_id", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    # None for a system event (a model promotion), which concerns every tenant.
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("tenants.id"))
    # The API key's prefix, or for an operator's command "operator:<login>".
    key_prefix: Mapped[str] = mapped_column(String(32))
    action: Mapped[AuditAction] = mapped_column(_enum(AuditAction, "audit_action"))
    resource_type: Mapped[str] = mapped_column(String(32))
    resource_id: Mapped[uuid.UUID | None]
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class IdentityRecord(Base):
    """An image's original identifiers, sealed with AES-GCM (shared/vault.py): the only place
    they are kept. `key_id` names the key that sealed them, so keys can rotate."""

    __tablename__ = "identity_vault"

    image_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("images.id"), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_id: Mapped[str] = mapped_column(String(64))
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    # Lets the unit of work insert the image row before its vault row.
    image: Mapped[Image] = relationship()


class Transport(enum.StrEnum):
    DIMSE = "dimse"  # C-STORE to a registered DICOM node's host and port
    STOW_RS = "stow-rs"  # POST to a DICOMweb server's studies endpoint


class ExportDestination(Base):
    """Where a tenant's DICOM results go: every screened exam's objects are delivered to each
    of the tenant's enabled destinations (shared/deliveries.py)."""

    __tablename__ = "export_destinations"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(64))
    transport: Mapped[Transport] = mapped_column(_enum(Transport, "export_transport"))
    dicom_node_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("dicom_nodes.id"))
    url: Mapped[str | None] = mapped_column(String(2048))
    # Also send each image with the heatmap burnt in, as a Secondary Capture, for PACS that
    # display neither Segmentations nor Parametric Maps.
    secondary_capture: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[datetime | None]

    dicom_node: Mapped[DicomNode | None] = relationship()


class ExportStatus(enum.StrEnum):
    PENDING = "pending"  # the exam completed; its objects are not rendered yet
    RENDERED = "rendered"  # the de-identified objects are in the object store
    FAILED = "failed"  # they cannot be rendered (error_code says why)


class ExamExport(Base):
    """A screened exam's DICOM results: rendered once, de-identified, by a worker's sweeper;
    re-identified from the vault only when delivered or downloaded."""

    __tablename__ = "exam_exports"
    __table_args__ = (
        Index("ix_exam_exports_pending", "created_at", postgresql_where=text("status = 'pending'")),
    )

    study_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    batch_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("batches.id"), index=True)
    status: Mapped[ExportStatus] = mapped_column(
        _enum(ExportStatus, "export_status"), default=ExportStatus.PENDING
    )
    # [{"kind": "report"|"heatmap"|"capture", "key": ..., "image_id": ..., "sop_class_uid":
    # ..., "sop_instance_uid": ...}]
    objects: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    rendered_at: Mapped[datetime | None]


class ExportDeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"  # every attempt failed; retried only when asked (POST .../retry)


class ExportDelivery(Base):
    """One exam's objects to one destination: an outbox row with bounded retries."""

    __tablename__ = "export_deliveries"
    __table_args__ = (
        UniqueConstraint("study_id", "destination_id"),
        Index(
            "ix_export_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
        Index("ix_export_deliveries_batch_id_id", "batch_id", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    batch_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("batches.id"))
    study_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("studies.id"))
    destination_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("export_destinations.id"))
    status: Mapped[ExportDeliveryStatus] = mapped_column(
        _enum(ExportDeliveryStatus, "export_delivery_status"),
        default=ExportDeliveryStatus.PENDING,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Whether the objects sent carried the original identifiers (False: the tenant's vault is
    # off or held nothing for these images, and the de-identified UIDs were sent).
    identified: Mapped[bool | None] = mapped_column(Boolean)
    # The destination's answer to the last attempt: a DICOM status (C-STORE) or an HTTP
    # status (STOW-RS); None when it could not be reached.
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]

    destination: Mapped[ExportDestination] = relationship()
