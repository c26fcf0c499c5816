"""Results API: batches, their per-image results, single images. Tenant-scoped throughout."""

from __future__ import annotations

import enum
import hashlib
import json
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Annotated, Literal, Protocol

import pydantic_core
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.orm import Session

from services.results import cursors
from services.results.changes import BatchChanges
from services.results.deps import CallerDep, ReadSessionDep, SessionDep, SettingsDep, StoreDep
from services.results.presenters import (
    ShownImage,
    ShownPrediction,
    batch_warnings,
    exam_data,
    heatmap_url,
    latest_prediction,
    show_originals,
    version_data,
)
from services.results.schemas import (
    AuditEventPublic,
    AuditPage,
    BatchDetail,
    BatchPage,
    DriftAlarm,
    ExamsPage,
    ImageCounts,
    ImageResult,
    ModelVersionPublic,
    RejectedFilePublic,
    RejectionsPage,
    ResultsPage,
)
from shared import audit
from shared.api.deps import require_scope
from shared.api.errors import ApiError
from shared.api.ratelimit import polls_cost_less
from shared.api.schemas import COMMON_ERRORS, BatchPublic, OutcomesList, outcome_public
from shared.batches import (
    EXPORT_COLUMNS,
    batch_exists,
    batch_status,
    exams_page,
    export_chunks,
    export_csv,
    get_exam,
    get_image,
    list_batches,
    rejections_page,
    results_page,
)
from shared.config import Settings
from shared.db.base import read_session_scope, session_scope
from shared.db.models import AuditAction, Scope
from shared.operating_points import site_thresholds
from shared.outcomes import outcomes_of
from shared.storage import Keys

router = APIRouter(
    dependencies=[require_scope(Scope.READ)],
    prefix="/v1",
    tags=["results"],
    responses=COMMON_ERRORS,
)

MAX_WAIT_S = 60.0


class ResultImage(ShownImage, Protocol):
    """An `Image` row, or a page's `PageImage`."""

    @property
    def batch_id(self) -> uuid.UUID: ...
    @property
    def study_id(self) -> uuid.UUID: ...
    @property
    def filename(self) -> str: ...
    @property
    def media_type(self) -> str: ...
    @property
    def attempts(self) -> int: ...
    @property
    def error_message(self) -> str | None: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def finished_at(self) -> datetime | None: ...
    @property
    def image_purged_at(self) -> datetime | None: ...


class ResultPrediction(ShownPrediction, Protocol):
    @property
    def input_distance(self) -> float | None: ...


def _json(model: BaseModel) -> Response:
    """The model as the response body, serialized once: FastAPI would validate a returned
    model against `response_model` again first (for a page of 100 exams, most of its time)."""
    return Response(model.model_dump_json(), media_type="application/json")


def _page_json(page: dict[str, object]) -> Response:
    """A page already in its response model's shape and JSON types (or types that serialize
    to them: ids, enums, datetimes), written without building the model: building 100 exams
    cost more than reading them. `test_results_api` holds every page to its model."""
    return Response(pydantic_core.to_json(page), media_type="application/json")


def _image_result_data(
    image: ResultImage,
    prediction: ResultPrediction | None,
    known_versions: dict[uuid.UUID, dict[str, object]] | None = None,
) -> dict[str, object]:
    """An image result as plain data, every field of `ImageResult` (see `_page_json`)."""
    return {
        "id": image.id,
        "batch_id": image.batch_id,
        "study_id": image.study_id,
        "filename": image.filename,
        "media_type": image.media_type,
        "laterality": image.laterality,
        "view": image.view,
        "status": image.status,
        "attempts": image.attempts,
        "score": prediction.malignancy_score if prediction else None,
        "error_code": image.error_code,
        "error_message": image.error_message,
        "model_version": (
            version_data(prediction.model_version, known_versions) if prediction else None
        ),
        "heatmap_url": heatmap_url(image, prediction),
        "warnings": list(prediction.warnings) if prediction else [],
        "input_distance": prediction.input_distance if prediction else None,
        "created_at": image.created_at,
        "finished_at": image.finished_at,
        "image_purged_at": image.image_purged_at,
    }


@router.get("/batches", response_model=BatchPage)
def get_batches(
    session: SessionDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> BatchPage:
    before = cursors.decode_batch_cursor(cursor) if cursor else None
    batches = list_batches(
        session=session, tenant_id=caller.tenant.id, limit=limit + 1, before=before
    )
    page, more = batches[:limit], len(batches) > limit
    next_cursor = (
        cursors.encode(page[-1].created_at.isoformat(), str(page[-1].id)) if more else None
    )
    return BatchPage(items=[BatchPublic.model_validate(b) for b in page], next_cursor=next_cursor)


def _batch_detail(
    session: Session,
    settings: Settings,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    audited: audit.Entry | None = None,
) -> BatchDetail:
    """The batch's status answer, from its row and its counters in one statement (never a
    count of its images: a batch may hold 100,000), which also records `audited`."""
    read = batch_status(session=session, tenant_id=tenant_id, batch_id=batch_id, audited=audited)
    if read is None:
        raise ApiError(404, "batch_not_found", f"no batch {batch_id} exists for this API key")
    versions = [ModelVersionPublic.model_validate(v) for v in read.versions]
    flagged = read.warning_counts
    return BatchDetail(
        **read.batch,
        counts=ImageCounts(**read.counters.counts),
        total_images=sum(read.counters.counts.values()),
        rejected_files=read.counters.rejected,
        model_versions=versions,
        warnings=batch_warnings(versions, flagged, read.drift, settings.drift_psi_threshold),
        warning_counts=flagged,
        drift_alarms=[DriftAlarm.model_validate(week) for week in read.drift],
    )


def _etag(detail: BatchDetail) -> str:
    digest = hashlib.sha256(detail.model_dump_json().encode()).hexdigest()[:32]
    return f'"{digest}"'


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    candidates = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return etag in candidates or "*" in candidates


@router.get(
    "/batches/{batch_id}",
    response_model=BatchDetail,
    responses={304: {"description": "Not modified: the batch is as the If-None-Match ETag"}},
)
@polls_cost_less
async def get_batch_detail(
    batch_id: uuid.UUID,
    request: Request,
    settings: SettingsDep,
    caller: CallerDep,
    wait: Annotated[
        float,
        Query(ge=0, le=MAX_WAIT_S, description="long poll: seconds to wait for a change"),
    ] = 0,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Status and counts, with an ETag. `If-None-Match` gives 304 when nothing changed;
    `wait=N` holds the request until the batch differs from that ETag (or, without one,
    from its state when the request came), for at most N seconds. A waiting request sleeps
    until Postgres announces a change to the batch (services/results/changes.py)."""

    def load(audited: bool) -> BatchDetail:
        entry = caller.audit_entry(AuditAction.READ, "batch", batch_id) if audited else None
        with read_session_scope(settings.database_url) as session:
            return _batch_detail(session, settings, caller.tenant.id, batch_id, entry)

    # No connection is held while the request waits: each read below takes one briefly.
    changes: BatchChanges = request.app.state.batch_changes
    with changes.watch(batch_id) as changed:
        detail = await run_in_threadpool(load, True)
        etag = _etag(detail)
        baseline = if_none_match or etag
        deadline = time.monotonic() + wait
        while _etag_matches(baseline, etag) and (left := deadline - time.monotonic()) > 0:
            if await changes.wait(changed, left):
                detail = await run_in_threadpool(load, False)
                etag = _etag(detail)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(detail.model_dump_json(), media_type="application/json", headers=headers)


@router.get("/batches/{batch_id}/results", response_model=ResultsPage)
def get_batch_results(
    batch_id: uuid.UUID,
    session: ReadSessionDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: str | None = None,
) -> Response:
    after = cursors.decode_id_cursor(cursor) if cursor else None
    images = results_page(
        session=session, tenant_id=caller.tenant.id, batch_id=batch_id, limit=limit + 1, after=after
    )
    if not images:
        _batch_or_404(session, caller, batch_id)
    page, next_cursor = cursors.id_page(images, limit, lambda image: image.id)
    known: dict[uuid.UUID, dict[str, object]] = {}
    caller.audit(session, AuditAction.READ, "batch_results", batch_id, images=len(page))
    session.commit()
    items = [_image_result_data(i, i.prediction, known) for i in page]
    return _page_json({"items": items, "next_cursor": next_cursor})


def _no_heatmap(image_id: uuid.UUID) -> ApiError:
    return ApiError(
        404,
        "heatmap_not_found",
        f"image {image_id} has no heatmap yet; it is written when the image is screened",
    )


def _batch_or_404(session: Session, caller: CallerDep, batch_id: uuid.UUID) -> None:
    """The pages' check, made only when its page came back empty: the page's query reads the
    caller's tenant's rows of that batch only, so a row found proves the batch is theirs (a
    round trip fewer for every page but the last)."""
    if not batch_exists(session=session, tenant_id=caller.tenant.id, batch_id=batch_id):
        raise ApiError(404, "batch_not_found", f"no batch {batch_id} exists for this API key")


@router.get("/batches/{batch_id}/exams", response_model=ExamsPage)
def get_batch_exams(
    batch_id: uuid.UUID,
    session: ReadSessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> Response:
    """A batch's exams with their images; an exam may lack views and still be scored."""
    after = cursors.decode_id_cursor(cursor) if cursor else None
    exams = exams_page(
        session=session, tenant_id=caller.tenant.id, batch_id=batch_id, limit=limit + 1, after=after
    )
    if not exams:
        _batch_or_404(session, caller, batch_id)
    page, next_cursor = cursors.id_page(exams, limit, lambda exam: exam.id)
    caller.audit(session, AuditAction.READ, "batch_exams", batch_id, exams=len(page))
    known: dict[uuid.UUID, dict[str, object]] = {}
    thresholds = site_thresholds(session, caller.tenant.id)
    items = [
        exam_data(exam, [(i, i.prediction) for i in exam.images], known, thresholds)
        for exam in page
    ]
    if caller.may(Scope.EXPORT_IDENTIFIED) and caller.tenant.identity_vault:
        shown = ExamsPage.model_validate({"items": items, "next_cursor": next_cursor})
        pairs = [(e.id, e.images) for e in page]
        show_originals(session, settings, caller, batch_id, pairs, shown.items)
        session.commit()
        return _json(shown)
    session.commit()
    return _page_json({"items": items, "next_cursor": next_cursor})


def _export_chunks(
    settings: Settings, tenant_id: uuid.UUID, batch_id: uuid.UUID
) -> Iterator[Sequence[Sequence[object]]]:
    """The batch's rows in chunks, from one server-side cursor in one read-only transaction
    (closed when the export ends, or when the client goes away)."""
    with session_scope(settings.database_url) as session:
        session.execute(text("SET TRANSACTION READ ONLY"))
        yield from export_chunks(session=session, tenant_id=tenant_id, batch_id=batch_id)


def _csv_export(settings: Settings, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> Iterator[bytes]:
    """The batch as CSV, as Postgres writes it, in one read-only transaction."""
    with session_scope(settings.database_url) as session:
        session.execute(text("SET TRANSACTION READ ONLY"))
        yield from export_csv(session=session, tenant_id=tenant_id, batch_id=batch_id)


def _json_chunks(chunks: Iterator[Sequence[Sequence[object]]]) -> Iterator[str]:
    yield "["
    separator = ""
    for chunk in chunks:
        body = ",".join(json.dumps(dict(zip(EXPORT_COLUMNS, row, strict=True))) for row in chunk)
        yield separator + body
        separator = ","
    yield "]\n"


class ExportFormat(enum.StrEnum):
    CSV = "csv"
    JSON = "json"


@router.get(
    "/batches/{batch_id}/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "every image's result, streamed",
            "content": {"text/csv": {}, "application/json": {}},
        }
    },
)
def get_batch_export(
    batch_id: uuid.UUID,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    format: ExportFormat = ExportFormat.CSV,
) -> StreamingResponse:
    """A whole batch's per-image results as CSV (one row per image) or a JSON array,
    streamed in chunks of rows from a server-side cursor, so a batch of 100,000 images costs
    no more memory than one chunk."""
    _batch_or_404(session, caller, batch_id)
    caller.audit(session, AuditAction.EXPORT, "batch", batch_id, format=format.value)
    session.commit()
    session.close()
    body: Iterator[str] | Iterator[bytes]
    if format == ExportFormat.CSV:
        body, media_type = _csv_export(settings, caller.tenant.id, batch_id), "text/csv"
    else:
        chunks = _export_chunks(settings, caller.tenant.id, batch_id)
        body, media_type = _json_chunks(chunks), "application/json"
    filename = f"batch-{batch_id}.{format.value}"
    return StreamingResponse(
        body,
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/batches/{batch_id}/rejections", response_model=RejectionsPage)
def get_batch_rejections(
    batch_id: uuid.UUID,
    session: SessionDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: str | None = None,
) -> RejectionsPage:
    """Uploaded files the quality gate refused, with their codes (docs/imaging.md)."""
    _batch_or_404(session, caller, batch_id)
    after = cursors.decode_id_cursor(cursor) if cursor else None
    rows = rejections_page(
        session=session, tenant_id=caller.tenant.id, batch_id=batch_id, limit=limit + 1, after=after
    )
    page, next_cursor = cursors.id_page(rows, limit, lambda row: row.id)
    return RejectionsPage(
        items=[RejectedFilePublic.model_validate(r) for r in page], next_cursor=next_cursor
    )


@router.get("/images/{image_id}", response_model=ImageResult)
def get_image_result(image_id: uuid.UUID, session: SessionDep, caller: CallerDep) -> ImageResult:
    image = get_image(session=session, tenant_id=caller.tenant.id, image_id=image_id)
    if image is None:
        raise ApiError(404, "image_not_found", f"no image {image_id} exists for this API key")
    prediction = latest_prediction(session, caller, image)
    caller.audit(session, AuditAction.READ, "image", image.id)
    session.commit()
    return ImageResult.model_validate(_image_result_data(image, prediction))


@router.get("/exams/{exam_id}/outcomes", response_model=OutcomesList, tags=["outcomes"])
def get_exam_outcomes(exam_id: uuid.UUID, session: SessionDep, caller: CallerDep) -> OutcomesList:
    """What the site reported became of the exam (POST /v1/exams/{id}/outcome or a bulk
    import), latest first."""
    found = get_exam(session=session, tenant_id=caller.tenant.id, study_id=exam_id)
    if found is None:
        raise ApiError(404, "exam_not_found", f"no exam {exam_id} exists for this API key")
    rows = outcomes_of(session, caller.tenant.id, exam_id)
    caller.audit(session, AuditAction.READ, "outcomes", exam_id)
    session.commit()
    return OutcomesList(items=[outcome_public(row) for row in rows])


# The audit log asks for its own scope: reading results does not entitle a key to see who
# else read what.
audit_router = APIRouter(
    prefix="/v1",
    tags=["audit"],
    responses=COMMON_ERRORS,
    dependencies=[require_scope(Scope.AUDIT)],
)


@audit_router.get("/audit", response_model=AuditPage)
def get_audit(
    session: SessionDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: str | None = None,
) -> AuditPage:
    """The tenant's audit log, newest first: who created, uploaded, closed or read what."""
    before = cursors.decode_id_cursor(cursor) if cursor else None
    events = audit.list_events(
        session=session, tenant_id=caller.tenant.id, limit=limit + 1, before=before
    )
    page, next_cursor = cursors.id_page(events, limit, lambda event: event.id)
    return AuditPage(
        items=[AuditEventPublic.model_validate(e) for e in page], next_cursor=next_cursor
    )


@router.get(
    "/images/{image_id}/heatmap.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 404: {}, 410: {}},
)
def get_image_heatmap(
    image_id: uuid.UUID,
    session: SessionDep,
    caller: CallerDep,
    store: StoreDep,
    style: Annotated[Literal["overlay", "grey"], Query()] = "overlay",
) -> Response:
    """Where the score comes from: per-position malignancy probability at 1/4 of the image's
    size, in the image's own orientation. `overlay` is a transparent colour map to lay over
    the image (stretched to its size); `grey` is the stored 0-255 map."""
    image = get_image(session=session, tenant_id=caller.tenant.id, image_id=image_id)
    if image is None:
        raise ApiError(404, "image_not_found", f"no image {image_id} exists for this API key")
    if image.image_purged_at is not None:
        raise ApiError(
            410,
            "image_purged",
            f"image {image_id}'s objects were removed on {image.image_purged_at.date()} by this "
            f"site's retention; its result is still served at /v1/images/{image_id}",
        )
    prediction = latest_prediction(session, caller, image)
    if prediction is None or prediction.heatmap_key is None:
        raise _no_heatmap(image_id)
    caller.audit(session, AuditAction.READ, "heatmap", image.id)
    session.commit()
    key = (
        prediction.heatmap_key
        if style == "grey"
        else Keys.heatmap_overlay(image.id, prediction.model_version_id)
    )
    body = store.get_bytes_or_none(key)
    if body is None:
        raise _no_heatmap(image_id)
    return Response(
        content=body, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
    )
