"""Results API: batches, their per-image results, single images. Tenant-scoped throughout."""

from __future__ import annotations

import asyncio
import csv
import enum
import hashlib
import io
import json
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from services.results import cursors
from services.results.deps import CallerDep, SessionDep, SettingsDep, StoreDep
from services.results.presenters import (
    batch_warnings,
    exam_public,
    heatmap_url,
    latest_prediction,
    show_originals,
)
from services.results.schemas import (
    AuditEventPublic,
    AuditPage,
    BatchDetail,
    BatchPage,
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
from shared.api.schemas import COMMON_ERRORS, BatchPublic
from shared.batches import (
    exams_page,
    get_batch,
    get_image,
    image_counts,
    latest_predictions,
    list_batches,
    model_versions_used,
    rejection_count,
    rejections_page,
    results_page,
    warning_counts,
)
from shared.config import Settings
from shared.db.base import session_scope
from shared.db.models import AuditAction, Image, Prediction, Scope
from shared.storage import Keys

router = APIRouter(
    dependencies=[require_scope(Scope.READ)],
    prefix="/v1",
    tags=["results"],
    responses=COMMON_ERRORS,
)

MAX_WAIT_S = 60.0
LONG_POLL_INTERVAL_S = 0.5


def _image_result(image: Image, prediction: Prediction | None) -> ImageResult:
    return ImageResult(
        id=image.id,
        batch_id=image.batch_id,
        study_id=image.study_id,
        filename=image.filename,
        media_type=image.media_type,
        laterality=image.laterality,
        view=image.view,
        status=image.status,
        attempts=image.attempts,
        score=prediction.malignancy_score if prediction else None,
        error_code=image.error_code,
        error_message=image.error_message,
        model_version=(
            ModelVersionPublic.model_validate(prediction.model_version) if prediction else None
        ),
        heatmap_url=heatmap_url(image, prediction),
        warnings=list(prediction.warnings) if prediction else [],
        input_distance=prediction.input_distance if prediction else None,
        created_at=image.created_at,
        finished_at=image.finished_at,
    )


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


def _batch_detail(session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> BatchDetail:
    batch = get_batch(session=session, tenant_id=tenant_id, batch_id=batch_id)
    if batch is None:
        raise ApiError(404, "batch_not_found", f"no batch {batch_id} exists for this API key")
    counts = image_counts(session=session, tenant_id=tenant_id, batch_id=batch.id)
    versions = model_versions_used(session=session, tenant_id=tenant_id, batch_id=batch.id)
    flagged = warning_counts(session=session, tenant_id=tenant_id, batch_id=batch.id)
    return BatchDetail(
        **BatchPublic.model_validate(batch).model_dump(),
        counts=ImageCounts(**counts),
        total_images=sum(counts.values()),
        rejected_files=rejection_count(session=session, tenant_id=tenant_id, batch_id=batch.id),
        model_versions=[ModelVersionPublic.model_validate(v) for v in versions],
        warnings=batch_warnings(versions, flagged),
        warning_counts=flagged,
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
async def get_batch_detail(
    batch_id: uuid.UUID,
    settings: SettingsDep,
    session: SessionDep,
    caller: CallerDep,
    wait: Annotated[
        float,
        Query(ge=0, le=MAX_WAIT_S, description="long poll: seconds to wait for a change"),
    ] = 0,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Status and counts, with an ETag. `If-None-Match` gives 304 when nothing changed;
    `wait=N` holds the request until the batch differs from that ETag (or, without one,
    from its state when the request came), for at most N seconds."""

    def load(audited: bool) -> BatchDetail:
        with session_scope(settings.database_url) as session:
            detail = _batch_detail(session, caller.tenant.id, batch_id)
            if audited:
                caller.audit(session, AuditAction.READ, "batch", batch_id)
            return detail

    # The key was checked on the request's session; hand its connection back now rather than
    # hold it for the whole long poll (each check below takes one briefly).
    await run_in_threadpool(session.close)
    detail = await run_in_threadpool(load, True)
    etag = _etag(detail)
    baseline = if_none_match or etag
    deadline = time.monotonic() + wait
    while _etag_matches(baseline, etag) and time.monotonic() < deadline:
        await asyncio.sleep(min(LONG_POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))
        detail = await run_in_threadpool(load, False)
        etag = _etag(detail)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(detail.model_dump_json(), media_type="application/json", headers=headers)


@router.get("/batches/{batch_id}/results", response_model=ResultsPage)
def get_batch_results(
    batch_id: uuid.UUID,
    session: SessionDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: str | None = None,
) -> ResultsPage:
    _batch_or_404(session, caller, batch_id)
    after = cursors.decode_id_cursor(cursor) if cursor else None
    images = results_page(
        session=session, tenant_id=caller.tenant.id, batch_id=batch_id, limit=limit + 1, after=after
    )
    page, next_cursor = cursors.id_page(images, limit, lambda image: image.id)
    predictions = latest_predictions(
        session=session, tenant_id=caller.tenant.id, image_ids=[i.id for i in page]
    )
    caller.audit(session, AuditAction.READ, "batch_results", batch_id, images=len(page))
    session.commit()
    return ResultsPage(
        items=[_image_result(i, predictions.get(i.id)) for i in page],
        next_cursor=next_cursor,
    )


def _no_heatmap(image_id: uuid.UUID) -> ApiError:
    return ApiError(
        404,
        "heatmap_not_found",
        f"image {image_id} has no heatmap yet; it is written when the image is screened",
    )


def _batch_or_404(session: SessionDep, caller: CallerDep, batch_id: uuid.UUID) -> None:
    if get_batch(session=session, tenant_id=caller.tenant.id, batch_id=batch_id) is None:
        raise ApiError(404, "batch_not_found", f"no batch {batch_id} exists for this API key")


@router.get("/batches/{batch_id}/exams", response_model=ExamsPage)
def get_batch_exams(
    batch_id: uuid.UUID,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> ExamsPage:
    """A batch's exams with their images; an exam may lack views and still be scored."""
    _batch_or_404(session, caller, batch_id)
    after = cursors.decode_id_cursor(cursor) if cursor else None
    exams = exams_page(
        session=session, tenant_id=caller.tenant.id, batch_id=batch_id, limit=limit + 1, after=after
    )
    page, next_cursor = cursors.id_page(exams, limit, lambda exam: exam[0].id)
    image_ids = [image.id for _, images in page for image in images]
    predictions = latest_predictions(
        session=session, tenant_id=caller.tenant.id, image_ids=image_ids
    )
    caller.audit(session, AuditAction.READ, "batch_exams", batch_id, exams=len(page))
    items = [exam_public(study, images, predictions) for study, images in page]
    if caller.may(Scope.EXPORT_IDENTIFIED) and caller.tenant.identity_vault:
        show_originals(session, settings, caller, batch_id, page, items)
    session.commit()
    return ExamsPage(items=items, next_cursor=next_cursor)


EXPORT_PAGE = 500
EXPORT_COLUMNS = [
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
]


def _export_rows(
    settings: Settings, tenant_id: uuid.UUID, batch_id: uuid.UUID
) -> Iterator[dict[str, object]]:
    """Every image of the batch, a page of rows per short transaction (no long-held
    connection, however large the batch)."""
    after: uuid.UUID | None = None
    while True:
        with session_scope(settings.database_url) as session:
            images = results_page(
                session=session,
                tenant_id=tenant_id,
                batch_id=batch_id,
                limit=EXPORT_PAGE,
                after=after,
            )
            predictions = latest_predictions(
                session=session, tenant_id=tenant_id, image_ids=[i.id for i in images]
            )
            rows = [_export_row(image, predictions.get(image.id)) for image in images]
        yield from rows
        if len(images) < EXPORT_PAGE:
            return
        after = images[-1].id


def _export_row(image: Image, prediction: Prediction | None) -> dict[str, object]:
    return {
        "image_id": str(image.id),
        "filename": image.filename,
        "study_id": str(image.study_id),
        "laterality": image.laterality.value if image.laterality else None,
        "view": image.view.value if image.view else None,
        "status": image.status.value,
        "score": prediction.malignancy_score if prediction else None,
        "error_code": image.error_code,
        "model_version": prediction.model_version.name if prediction else None,
        "warnings": ";".join(prediction.warnings) if prediction else "",
        "input_distance": prediction.input_distance if prediction else None,
        "finished_at": image.finished_at.isoformat() if image.finished_at else None,
    }


def _csv_lines(rows: Iterator[dict[str, object]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EXPORT_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


def _json_lines(rows: Iterator[dict[str, object]]) -> Iterator[str]:
    yield "["
    for index, row in enumerate(rows):
        yield ("," if index else "") + json.dumps(row)
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
    streamed page by page, so a batch of 100,000 images costs no more memory than one page."""
    _batch_or_404(session, caller, batch_id)
    caller.audit(session, AuditAction.EXPORT, "batch", batch_id, format=format.value)
    session.commit()
    session.close()
    rows = _export_rows(settings, caller.tenant.id, batch_id)
    if format == ExportFormat.CSV:
        body, media_type = _csv_lines(rows), "text/csv"
    else:
        body, media_type = _json_lines(rows), "application/json"
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
    return _image_result(image, prediction)


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
    responses={200: {"content": {"image/png": {}}}, 404: {}},
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
