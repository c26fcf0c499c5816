"""Batches, studies, images and predictions as a tenant sees them: creation and reads.

Every function here takes a tenant id and filters by it; endpoints never build their own
queries. Status changes, and the writes of the worker and the sweeper (which go by row id and
belong to no tenant), are in `shared/lifecycle.py`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    Select,
    String,
    Text,
    bindparam,
    cast,
    func,
    select,
    text,
    true,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import distinct_on, insert
from sqlalchemy.orm import Session, defer, load_only
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.sql.selectable import LateralFromClause
from sqlalchemy.sql.sqltypes import NullType

from shared import audit
from shared.db.base import new_id, utcnow
from shared.db.models import (
    Batch,
    BatchImageCounts,
    BatchPredictionCounts,
    BatchPriority,
    BatchPurpose,
    Image,
    ImageStatus,
    ModelStatus,
    ModelVersion,
    Prediction,
    RejectedFile,
    Study,
)


def create_batch(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    name: str,
    priority: BatchPriority,
    callback_url: str | None = None,
    purpose: BatchPurpose = BatchPurpose.SCREENING,
) -> Batch:
    batch = Batch(
        tenant_id=tenant_id,
        name=name,
        priority=priority,
        callback_url=callback_url,
        purpose=purpose,
    )
    session.add(batch)
    session.flush()
    return batch


def get_batch(
    *, session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID, for_update: bool = False
) -> Batch | None:
    """The tenant's batch, or None (also for another tenant's batch id)."""
    query = select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id)
    if for_update:
        query = query.with_for_update()
    return session.scalar(query)


def list_batches(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None,
) -> list[Batch]:
    """Newest first, keyset-paginated on (created_at, id)."""
    query = select(Batch).where(Batch.tenant_id == tenant_id)
    if before is not None:
        query = query.where(func.row(Batch.created_at, Batch.id) < func.row(*before))
    query = query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)
    return list(session.scalars(query))


def get_or_create_study(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    study_key: str,
    patient_key: str,
) -> uuid.UUID:
    """The id of the batch's study for `study_key`, created if need be."""
    return study_ids(
        session=session, tenant_id=tenant_id, batch_id=batch_id, studies={study_key: patient_key}
    )[study_key]


def study_ids(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    studies: dict[str, str],
) -> dict[str, uuid.UUID]:
    """The ids of the batch's studies for these study keys (each with its patient key),
    creating those not there yet; concurrent uploads of one exam share one row.

    Core statements on the session's connection, a few per request rather than per image:
    the views of the exams already there are found in one read, the rest inserted in one
    statement (a row another upload inserted meanwhile is kept) and read back."""
    connection = session.connection()

    def existing(keys: Sequence[str]) -> dict[str, uuid.UUID]:
        rows = connection.execute(
            select(Study.study_key, Study.id).where(
                Study.batch_id == batch_id,
                Study.study_key.in_(keys),
                Study.tenant_id == tenant_id,
            )
        )
        return {key: study_id for key, study_id in rows}

    found = existing(list(studies))
    missing = sorted(key for key in studies if key not in found)
    if missing:  # the exams' first views: insert them, then read back whichever row won
        now = utcnow()
        connection.execute(
            insert(Study).on_conflict_do_nothing(index_elements=[Study.batch_id, Study.study_key]),
            [
                {
                    "id": new_id(),
                    "tenant_id": tenant_id,
                    "batch_id": batch_id,
                    "study_key": key,
                    "patient_key": studies[key],
                    "created_at": now,
                }
                for key in missing
            ],
        )
        found |= existing(missing)
    assert found.keys() == studies.keys()
    return found


@dataclass(frozen=True)
class BatchCounters:
    """A batch's image counts by status (every status present), rejected files, and a version
    that grows with every change to them or to its predictions."""

    counts: dict[str, int]
    rejected: int
    version: int


def batch_counters(*, session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> BatchCounters:
    """The batch's counters, summed over their shards: an index range read of at most
    COUNTER_SHARDS rows, however many images the batch holds (the triggers of migration 0013
    keep them in step with the rows)."""
    statuses = [getattr(BatchImageCounts, status.value) for status in ImageStatus]
    row = session.execute(
        select(
            *(func.coalesce(func.sum(column), 0) for column in statuses),
            func.coalesce(func.sum(BatchImageCounts.rejected), 0),
            func.coalesce(func.sum(BatchImageCounts.version), 0),
        )
        .join(Batch, Batch.id == BatchImageCounts.batch_id)
        .where(BatchImageCounts.batch_id == batch_id, Batch.tenant_id == tenant_id)
    ).one()
    *by_status, rejected, version = (int(value) for value in row)
    counts = {status.value: count for status, count in zip(ImageStatus, by_status, strict=True)}
    return BatchCounters(counts=counts, rejected=rejected, version=version)


@dataclass(frozen=True)
class BatchStatusRead:
    """Everything a status answer shows, from one statement: the batch's own columns (as
    BatchPublic names them), its counters, the model versions that scored it with the
    images each flagged per warning code, and the drift alarms of its weeks."""

    batch: dict[str, Any]
    counters: BatchCounters
    versions: list[dict[str, Any]]  # id, name, status, trained, rejection_reason, flagged
    # The tenant's weeks the batch spans whose drift alarm is raised for a version that
    # scored it (shared/drift.py): week_start, model_version_id, psi, exams.
    drift: list[dict[str, Any]]

    @property
    def warning_counts(self) -> dict[str, int]:
        """For each warning code, the most images any one version flagged with it."""
        flagged: dict[str, int] = {}
        for version in self.versions:
            for code, images in version["flagged"].items():
                flagged[code] = max(flagged.get(code, 0), images)
        return flagged


# One round trip, built once: a status poll is the request clients send most. Counters and
# prediction counts are summed over their shards (index range reads of the batch's rows).
# Only ImageStatus's own values are spliced in; the caller's values are bound parameters.
_BATCH_STATUS_SQL = f"""
    SELECT b.id, b.name, b.priority, b.status, b.created_at, b.closed_at, b.completed_at,
           b.callback_url, b.purpose, b.source, n.ae_title AS sent_by, b.accession_key,
           b.images_purged_at,
           c.counts, c.rejected, c.version, coalesce(p.versions, '[]') AS versions,
           coalesce(d.drift, '[]') AS drift
    FROM batches AS b
    LEFT JOIN dicom_nodes AS n ON n.id = b.dicom_node_id
    CROSS JOIN LATERAL (
        SELECT json_build_array({", ".join(f"coalesce(sum({s.value}), 0)" for s in ImageStatus)})
                   AS counts,
               coalesce(sum(rejected), 0) AS rejected, coalesce(sum(version), 0) AS version
        FROM batch_image_counts WHERE batch_id = b.id
    ) AS c
    CROSS JOIN LATERAL (
        SELECT json_agg(json_build_object(
                   'id', v.id, 'name', v.name, 'status', v.status, 'trained', v.trained,
                   'rejection_reason', v.rejection_reason, 'flagged', u.flagged
               ) ORDER BY v.created_at) AS versions
        FROM (
            SELECT model_version_id,
                   json_object_agg(warning, images) FILTER (WHERE warning <> '') AS flagged
            FROM (
                SELECT model_version_id, warning, sum(images) AS images
                FROM batch_prediction_counts WHERE batch_id = b.id
                GROUP BY model_version_id, warning HAVING sum(images) > 0
            ) AS by_warning
            GROUP BY model_version_id
            HAVING bool_or(warning = '')
        ) AS u
        JOIN model_versions AS v ON v.id = u.model_version_id
    ) AS p
    CROSS JOIN LATERAL (
        SELECT json_agg(json_build_object(
                   'week_start', w.week_start, 'model_version_id', w.model_version_id,
                   'psi', w.psi, 'exams', w.exams
               ) ORDER BY w.week_start) AS drift
        FROM score_drift_weeks AS w
        WHERE w.tenant_id = b.tenant_id AND w.alarm
          AND w.week_start BETWEEN date_trunc('week', b.created_at AT TIME ZONE 'UTC')::date
              AND date_trunc('week', coalesce(b.completed_at, now()) AT TIME ZONE 'UTC')::date
    ) AS d
    WHERE b.id = :batch_id AND b.tenant_id = :tenant_id
"""  # noqa: S608
_BATCH_STATUS = text(_BATCH_STATUS_SQL)
_BATCH_STATUS_AUDITED = text(audit.recorded_by_read(_BATCH_STATUS_SQL))


def batch_status(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    audited: audit.Entry | None = None,
) -> BatchStatusRead | None:
    """The tenant's batch as a status answer shows it, or None (also for another tenant's);
    `audited` is recorded in the same statement when the batch is found."""
    parameters = {"batch_id": batch_id, "tenant_id": tenant_id}
    if audited is None:
        row = session.execute(_BATCH_STATUS, parameters).one_or_none()
    else:
        parameters |= audited.parameters()
        row = session.execute(_BATCH_STATUS_AUDITED, parameters).one_or_none()
    if row is None:
        return None
    fields = row._asdict()
    counts = dict(zip((s.value for s in ImageStatus), fields.pop("counts"), strict=True))
    counters = BatchCounters(
        counts=counts, rejected=int(fields.pop("rejected")), version=int(fields.pop("version"))
    )
    versions = fields.pop("versions")
    for version in versions:
        version["flagged"] = {code: int(n) for code, n in (version["flagged"] or {}).items()}
    scored_by = {version["id"] for version in versions}
    drift = [week for week in fields.pop("drift") if week["model_version_id"] in scored_by]
    return BatchStatusRead(batch=fields, counters=counters, versions=versions, drift=drift)


def image_count(*, session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> int:
    counters = batch_counters(session=session, tenant_id=tenant_id, batch_id=batch_id)
    return sum(counters.counts.values())


def image_counts(*, session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> dict[str, int]:
    """How many of the batch's images are in each status (every status present, 0 or more)."""
    return batch_counters(session=session, tenant_id=tenant_id, batch_id=batch_id).counts


def record_rejections(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    rejections: Sequence[tuple[str, str, str]],
) -> None:
    """Keep (filename, code, message) of refused uploads so results can show them."""
    session.add_all(
        RejectedFile(
            tenant_id=tenant_id, batch_id=batch_id, filename=name[:600], code=code, message=msg
        )
        for name, code, msg in rejections
    )


def rejections_page(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    limit: int,
    after: uuid.UUID | None,
) -> list[RejectedFile]:
    query = select(RejectedFile).where(
        RejectedFile.batch_id == batch_id, RejectedFile.tenant_id == tenant_id
    )
    if after is not None:
        query = query.where(RejectedFile.id > after)
    return list(session.scalars(query.order_by(RejectedFile.id).limit(limit)))


# What batch answers show of a model version (ModelVersionPublic, and whether it is trained):
# its JSON columns are for the registry and the workers.
PUBLIC_VERSION_COLUMNS = (
    ModelVersion.id,
    ModelVersion.name,
    ModelVersion.status,
    ModelVersion.trained,
    ModelVersion.rejection_reason,
    ModelVersion.created_at,
)


def _prediction_counts(tenant_id: uuid.UUID, batch_id: uuid.UUID) -> Select[uuid.UUID, str, int]:
    """(model version, warning code or '', images) of the batch, over the counters' shards."""
    images = func.sum(BatchPredictionCounts.images)
    return (
        select(BatchPredictionCounts.model_version_id, BatchPredictionCounts.warning, images)
        .join(Batch, Batch.id == BatchPredictionCounts.batch_id)
        .where(BatchPredictionCounts.batch_id == batch_id, Batch.tenant_id == tenant_id)
        .group_by(BatchPredictionCounts.model_version_id, BatchPredictionCounts.warning)
        .having(images > 0)
    )


@dataclass(frozen=True)
class PredictionSummary:
    """The model versions that scored any of a batch's images (oldest first), and for each
    prediction warning the most of its images any one version flagged with it (a batch is
    mostly scored by one version; images scored by two are not counted twice)."""

    versions: list[ModelVersion]
    warning_counts: dict[str, int]


def prediction_summary(
    *, session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID
) -> PredictionSummary:
    """From the batch's prediction counters (never its predictions): two indexed reads."""
    used: set[uuid.UUID] = set()
    flagged: dict[str, int] = {}
    for version_id, code, images in session.execute(_prediction_counts(tenant_id, batch_id)):
        if code:
            flagged[code] = max(flagged.get(code, 0), int(images))
        else:
            used.add(version_id)
    versions = (
        list(
            session.scalars(
                select(ModelVersion)
                .where(ModelVersion.id.in_(used))
                .order_by(ModelVersion.created_at)
                .options(load_only(*PUBLIC_VERSION_COLUMNS))
            )
        )
        if used
        else []
    )
    return PredictionSummary(versions, flagged)


def get_image(*, session: Session, tenant_id: uuid.UUID, image_id: uuid.UUID) -> Image | None:
    return session.scalar(select(Image).where(Image.id == image_id, Image.tenant_id == tenant_id))


def _versions_by_id(session: Session, ids: set[uuid.UUID]) -> dict[uuid.UUID, ModelVersion]:
    """The model versions a page's predictions name, in one query."""
    if not ids:
        return {}
    query = (
        select(ModelVersion)
        .where(ModelVersion.id.in_(ids))
        .options(defer(ModelVersion.input_reference))  # for workers; a page never reads it
    )
    return {version.id: version for version in session.scalars(query)}


def latest_predictions(
    *, session: Session, tenant_id: uuid.UUID, image_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, Prediction]:
    """Each image's newest prediction (an image may be screened by several model versions),
    with its model version loaded once per page and set on each: a version's JSON columns
    are decoded once, not once per prediction."""
    if not image_ids:
        return {}
    query = (
        select(Prediction)
        .where(Prediction.image_id.in_(image_ids), Prediction.tenant_id == tenant_id)
        .order_by(Prediction.image_id, Prediction.created_at.desc())
        .ext(distinct_on(Prediction.image_id))
    )
    predictions = {p.image_id: p for p in session.scalars(query)}
    versions = _versions_by_id(session, {p.model_version_id for p in predictions.values()})
    for prediction in predictions.values():
        set_committed_value(prediction, "model_version", versions[prediction.model_version_id])
    return predictions


def get_exam(
    *, session: Session, tenant_id: uuid.UUID, study_id: uuid.UUID
) -> tuple[Study, list[Image]] | None:
    """One of the tenant's exams (a study) with its images, or None."""
    study = session.scalar(select(Study).where(Study.id == study_id, Study.tenant_id == tenant_id))
    if study is None:
        return None
    images = session.scalars(
        select(Image)
        .where(Image.study_id == study.id, Image.tenant_id == tenant_id)
        .order_by(Image.id)
    )
    return study, list(images)


# -- pages: one prebuilt statement each, plain rows, each model version once per page ---------
# (Plain dataclasses, not frozen: a frozen one's __init__ sets each field through
# object.__setattr__, which cost a page of 100 exams more than its query.)


@dataclass(slots=True)
class PageVersion:
    """What a page shows of a model version, and what the exam rule reads of it: none of its
    JSON but the calibration's few numbers."""

    id: uuid.UUID
    name: str
    status: ModelStatus
    trained: bool
    rejection_reason: str | None
    recall_threshold: float | None
    calibration: dict[str, float] | None


@dataclass(slots=True)
class LatestPrediction:
    """What a page shows of an image's newest prediction."""

    malignancy_score: float
    model_version: PageVersion
    heatmap_key: str | None
    warnings: list[str]
    input_distance: float | None


@dataclass(slots=True)
class PageImage:
    """An image as a results page shows it, with its newest prediction (None until it is
    scored)."""

    id: uuid.UUID
    batch_id: uuid.UUID
    study_id: uuid.UUID
    filename: str
    media_type: str
    laterality: str | None
    view: str | None
    status: str
    attempts: int
    error_code: str | None
    error_message: str | None
    created_at: datetime
    finished_at: datetime | None
    image_purged_at: datetime | None
    prediction: LatestPrediction | None


@dataclass(slots=True)
class PageExamImage:
    """An image as an exams page shows it: what the exam rule and the page read, no more."""

    id: uuid.UUID
    laterality: str | None
    view: str | None
    status: str
    error_code: str | None
    image_purged_at: datetime | None
    prediction: LatestPrediction | None


@dataclass(slots=True)
class PageExam:
    id: uuid.UUID
    study_key: str
    patient_key: str
    images: list[PageExamImage]


# Pages read enum columns as their text (a Laterality, View or ImageStatus value): SQLAlchemy's
# enum processing cost about a millisecond a page, and serializing enum members several more.

_IMAGE_COLUMNS = (
    Image.id,
    Image.batch_id,
    Image.study_id,
    Image.filename,
    Image.media_type,
    type_coerce(Image.laterality, String),
    type_coerce(Image.view, String),
    type_coerce(Image.status, String),
    Image.attempts,
    Image.error_code,
    Image.error_message,
    Image.created_at,
    Image.finished_at,
    Image.image_purged_at,
)
_FIRST = uuid.UUID(int=0)  # ids are UUIDv7, all after it: the first page's `after`


def _newest_prediction() -> LateralFromClause:
    """Each image's newest prediction (an image may be scored by several model versions), as
    a LATERAL subquery to outer-join on `true`; its columns are NULL for an unscored image."""
    return (
        select(
            Prediction.malignancy_score,
            Prediction.model_version_id,
            Prediction.heatmap_key,
            # The driver's list as it is: SQLAlchemy's ARRAY copies each one element by
            # element (a millisecond a page).
            type_coerce(Prediction.warnings, NullType()).label("warnings"),
            Prediction.input_distance,
        )
        .where(Prediction.image_id == Image.id)
        .order_by(Prediction.created_at.desc())
        .limit(1)
        .lateral("latest")
    )


def _exams_page_statement() -> Select[*tuple[Any, ...]]:
    """A page of a batch's studies, each row one of their images (the study's columns
    repeated; NULL image columns for a study without images) with its newest prediction, in
    one statement: the studies' page is a CTE the images join."""
    studies = (
        select(Study.id, Study.study_key, Study.patient_key)
        .where(
            Study.batch_id == bindparam("batch_id"),
            Study.tenant_id == bindparam("tenant_id"),
            Study.id > bindparam("after"),
        )
        .order_by(Study.id)
        .limit(bindparam("limit"))
        .cte("page")
    )
    latest = _newest_prediction()
    return (
        select(
            studies.c.id,
            studies.c.study_key,
            studies.c.patient_key,
            Image.id,
            type_coerce(Image.laterality, String),
            type_coerce(Image.view, String),
            type_coerce(Image.status, String),
            Image.error_code,
            Image.image_purged_at,
            *latest.c,
        )
        .select_from(studies)
        .outerjoin(
            Image,
            (Image.study_id == studies.c.id) & (Image.tenant_id == bindparam("tenant_id")),
        )
        .outerjoin(latest, true())
        .order_by(studies.c.id, Image.id)
    )


def _results_page_statement() -> Select[*tuple[Any, ...]]:
    latest = _newest_prediction()
    return (
        select(*_IMAGE_COLUMNS, *latest.c)
        .select_from(Image)
        .outerjoin(latest, true())
        .where(
            Image.tenant_id == bindparam("tenant_id"),
            Image.batch_id == bindparam("batch_id"),
            Image.id > bindparam("after"),
        )
        .order_by(Image.id)
        .limit(bindparam("limit"))
    )


# Built once: pages are what pollers ask for after status, and building a statement cost as
# much as running it.
_RESULTS_PAGE = _results_page_statement()
_EXAMS_PAGE = _exams_page_statement()
_PAGE_VERSIONS = select(
    ModelVersion.id,
    ModelVersion.name,
    ModelVersion.status,
    ModelVersion.trained,
    ModelVersion.rejection_reason,
    ModelVersion.recall_threshold,
    ModelVersion.calibration,
).where(ModelVersion.id.in_(bindparam("ids", expanding=True)))
_BATCH_EXISTS = select(Batch.id).where(
    Batch.id == bindparam("batch_id"), Batch.tenant_id == bindparam("tenant_id")
)


def batch_exists(*, session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> bool:
    """Whether the tenant has this batch (a page of another tenant's batch is a 404)."""
    found = session.connection().execute(
        _BATCH_EXISTS, {"batch_id": batch_id, "tenant_id": tenant_id}
    )
    return found.first() is not None


def _page_predictions(
    connection: Connection, rows: Sequence[Sequence[Any]], first: int
) -> list[LatestPrediction | None]:
    """Each row's newest prediction, from its columns of `_newest_prediction` (from index
    `first` on); each model version read once for the page."""
    # Keyed by the ids' integers: hashing a UUID runs Python code, hashing an int does not.
    ids = {row[first + 1].int: row[first + 1] for row in rows if row[first + 1] is not None}
    versions = (
        {
            row[0].int: PageVersion(*row)
            for row in connection.execute(_PAGE_VERSIONS, {"ids": list(ids.values())})
        }
        if ids
        else {}
    )
    return [
        None
        if row[first + 1] is None
        else LatestPrediction(
            row[first],
            versions[row[first + 1].int],
            row[first + 2],
            row[first + 3],
            row[first + 4],
        )
        for row in rows
    ]


def results_page(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    limit: int,
    after: uuid.UUID | None,
) -> list[PageImage]:
    """A batch's images in upload order with their newest predictions, keyset-paginated on
    id (time-ordered UUIDv7): one query for the page, one for its model versions."""
    connection = session.connection()  # Core rows: the ORM would only add cost to columns
    rows = connection.execute(
        _RESULTS_PAGE,
        {"tenant_id": tenant_id, "batch_id": batch_id, "after": after or _FIRST, "limit": limit},
    ).all()
    predictions = _page_predictions(connection, rows, len(_IMAGE_COLUMNS))
    return [
        PageImage(
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            row[7],
            row[8],
            row[9],
            row[10],
            row[11],
            row[12],
            row[13],
            prediction,
        )
        for row, prediction in zip(rows, predictions, strict=True)
    ]


def exams_page(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    limit: int,
    after: uuid.UUID | None,
) -> list[PageExam]:
    """A batch's studies (exams) in upload order, each with its images and their newest
    predictions, keyset on study id: one query for the page, one for its model versions."""
    connection = session.connection()  # Core rows: see results_page
    rows = connection.execute(
        _EXAMS_PAGE,
        {"tenant_id": tenant_id, "batch_id": batch_id, "after": after or _FIRST, "limit": limit},
    ).all()
    predictions = _page_predictions(connection, rows, 9)
    exams: list[PageExam] = []
    for row, prediction in zip(rows, predictions, strict=True):
        if not exams or exams[-1].id.int != row[0].int:  # rows come in study order
            exams.append(PageExam(row[0], row[1], row[2], []))
        exam = exams[-1]
        if row[3] is not None:
            exam.images.append(
                PageExamImage(
                    row[3],
                    row[4],
                    row[5],
                    row[6],
                    row[7],
                    row[8],
                    prediction,
                )
            )
    return exams


# The export's columns, in order; each is formatted by Postgres (text, or a number), so the
# rows need no conversion in Python (shared by the CSV and the JSON form).
EXPORT_COLUMNS = (
    "image_id",
    "filename",
    "study_id",
    "laterality",
    "view",
    "status",
    "score",
    "error_code",
    "model_version",
    "warnings",  # codes joined by ";"
    "input_distance",
    "finished_at",
)
EXPORT_CHUNK = 500


def _export_query(tenant_id: uuid.UUID, batch_id: uuid.UUID) -> Select[*tuple[Any, ...]]:
    """Every image of the batch in upload order with its newest prediction, as
    EXPORT_COLUMNS, each formatted by Postgres (no warnings: an empty string)."""
    latest = _newest_prediction()
    columns = (
        cast(Image.id, Text),
        Image.filename,
        cast(Image.study_id, Text),
        cast(Image.laterality, Text),
        cast(Image.view, Text),
        cast(Image.status, Text),
        latest.c.malignancy_score,
        Image.error_code,
        ModelVersion.name,
        func.coalesce(func.array_to_string(latest.c.warnings, ";"), ""),
        latest.c.input_distance,
        func.to_char(func.timezone("UTC", Image.finished_at), 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
    )
    return (
        select(*(c.label(name) for c, name in zip(columns, EXPORT_COLUMNS, strict=True)))
        .select_from(Image)
        .outerjoin(latest, true())
        .outerjoin(ModelVersion, ModelVersion.id == latest.c.model_version_id)
        .where(Image.batch_id == batch_id, Image.tenant_id == tenant_id)
        .order_by(Image.id)
    )


def export_chunks(
    *, session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID
) -> Iterator[Sequence[Row[Any]]]:
    """The export's rows as tuples of EXPORT_COLUMNS, fetched EXPORT_CHUNK rows at a time
    from a server-side cursor (the caller's transaction stays open until the last chunk)."""
    query = _export_query(tenant_id, batch_id).execution_options(
        stream_results=True, yield_per=EXPORT_CHUNK
    )
    yield from session.execute(query).partitions()


CSV_BLOCK_BYTES = 1 << 16


def export_csv(*, session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> Iterator[bytes]:
    """The export as CSV with a header line, written by Postgres itself (`COPY (query) TO
    STDOUT`): no Python touches a row, and blocks of about CSV_BLOCK_BYTES come out. Lines
    end in LF; NULL is an empty field, an empty string a quoted one (""). A reader that
    stops early (the client went away) leaves a connection mid-COPY: it is discarded, not
    put back in the pool."""
    connection = session.connection()
    compiled = _export_query(tenant_id, batch_id).compile(dialect=connection.dialect)
    statement = f"COPY ({compiled}) TO STDOUT (FORMAT csv, HEADER)"
    driver = connection.connection.driver_connection
    assert driver is not None
    finished = False
    try:
        with driver.cursor().copy(statement, compiled.params) as copy:
            block = bytearray()
            for data in copy:
                block += data
                if len(block) >= CSV_BLOCK_BYTES:
                    yield bytes(block)
                    block.clear()
            yield bytes(block)
        finished = True
    finally:
        if not finished:
            connection.invalidate()
