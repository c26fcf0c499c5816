"""The results viewer: server-rendered pages for people, on the results service.

Log in with an API key (kept in an HttpOnly, SameSite=Strict cookie scoped to /viewer); see
batches with live progress, a batch's exams sorted by exam score with recall flags, and an
exam's four views side by side with their heatmaps (toggled on and off), scores per image,
breast and exam, and the model version. Every page reads through the same tenant-scoped
queries as the API, and reads are audited like the API's.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Cookie, Depends, Form, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from sqlalchemy.orm import Session

from services.results.dicom import exam_report_file, image_heatmap_file
from services.results.plots import reliability_svg, roc_svg
from services.results.presenters import (
    batch_warnings,
    drift_report,
    exam_public,
    latest_prediction,
    show_originals,
)
from services.results.schemas import Exam, ExamImage, ModelVersionPublic
from shared.api.deps import Caller, SessionDep, SettingsDep, StoreDep
from shared.batches import (
    batch_status,
    exams_page,
    get_batch,
    get_exam,
    get_image,
    image_counts,
    latest_predictions,
    list_batches,
)
from shared.db.models import AuditAction, ExportStatus, ImageStatus, Scope
from shared.deliveries import get_export
from shared.evaluations import get_evaluation
from shared.operating_points import site_thresholds
from shared.storage import Keys
from shared.tenants import authenticate_key

COOKIE = "mammoscreen_key"
MAX_EXAMS_SHOWN = 1000
# Hanging order: right breast on the viewer's left, as readers hang them.
SLOTS = ("R-CC", "L-CC", "R-MLO", "L-MLO")

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
router = APIRouter(prefix="/viewer", include_in_schema=False)


class LoginRequired(Exception):
    pass


def viewer_caller(
    session: SessionDep, key: Annotated[str | None, Cookie(alias=COOKIE)] = None
) -> Caller:
    api_key = authenticate_key(session=session, secret=key) if key else None
    if api_key is None or Scope.READ.value not in api_key.scopes:
        raise LoginRequired()
    return Caller(api_key.tenant, api_key.prefix, frozenset(api_key.scopes))


ViewerDep = Annotated[Caller, Depends(viewer_caller)]


def login_redirect(_: Request, __: Exception) -> Response:
    response = RedirectResponse("/viewer/login", status_code=303)
    response.delete_cookie(COOKIE, path="/viewer")
    return response


def _page(request: Request, name: str, caller: Caller | None, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(
        request, name, {"key_prefix": caller.key_prefix if caller else None, **context}
    )


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> HTMLResponse:
    return _page(request, "login.html", None, error=None)


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    api_key: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    found = authenticate_key(session=session, secret=api_key.strip())
    if found is None or Scope.READ.value not in found.scopes:
        reason = (
            "That API key is unknown or revoked."
            if found is None
            else "That API key lacks the read scope."
        )
        refused = _page(request, "login.html", None, error=reason)
        refused.status_code = 401
        return refused
    response = RedirectResponse("/viewer/", status_code=303)
    response.set_cookie(
        COOKIE,
        api_key.strip(),
        httponly=True,
        samesite="strict",
        secure=settings.env == "prod",
        path="/viewer",
        max_age=8 * 3600,
    )
    return response


@router.get("/logout")
def logout() -> Response:
    response = RedirectResponse("/viewer/login", status_code=303)
    response.delete_cookie(COOKIE, path="/viewer")
    return response


@dataclass(frozen=True)
class BatchRow:
    id: uuid.UUID
    name: str
    status: str
    created_at: Any
    total: int
    finished: int
    source: str


def _progress(session: Session, caller: Caller, batch_id: uuid.UUID) -> tuple[int, int]:
    counts = image_counts(session=session, tenant_id=caller.tenant.id, batch_id=batch_id)
    finished = counts[ImageStatus.DONE] + counts[ImageStatus.FAILED] + counts[ImageStatus.STORED]
    return sum(counts.values()), finished


@router.get("/", response_class=HTMLResponse)
def batches_page(request: Request, session: SessionDep, caller: ViewerDep) -> HTMLResponse:
    rows = []
    for batch in list_batches(session=session, tenant_id=caller.tenant.id, limit=100, before=None):
        total, finished = _progress(session, caller, batch.id)
        rows.append(
            BatchRow(
                batch.id,
                batch.name,
                batch.status.value,
                batch.created_at,
                total,
                finished,
                f"DICOM from {batch.sent_by}" if batch.sent_by else batch.source.value,
            )
        )
    return _page(request, "batches.html", caller, batches=rows)


@router.get("/batches/{batch_id}/progress.json")
def batch_progress(batch_id: uuid.UUID, session: SessionDep, caller: ViewerDep) -> JSONResponse:
    batch = get_batch(session=session, tenant_id=caller.tenant.id, batch_id=batch_id)
    if batch is None:
        return JSONResponse({"error": "batch_not_found"}, status_code=404)
    total, finished = _progress(session, caller, batch.id)
    return JSONResponse({"status": batch.status.value, "total": total, "finished": finished})


@router.get("/batches/{batch_id}", response_class=HTMLResponse)
def batch_page(
    request: Request,
    batch_id: uuid.UUID,
    session: SessionDep,
    settings: SettingsDep,
    caller: ViewerDep,
) -> HTMLResponse:
    batch = get_batch(session=session, tenant_id=caller.tenant.id, batch_id=batch_id)
    if batch is None:
        return _page(request, "batch.html", caller, batch=None, exams=[])
    page = exams_page(
        session=session,
        tenant_id=caller.tenant.id,
        batch_id=batch_id,
        limit=MAX_EXAMS_SHOWN,
        after=None,
    )
    thresholds = site_thresholds(session, caller.tenant.id)
    exams = [
        exam_public(exam, [(i, i.prediction) for i in exam.images], site_thresholds=thresholds)
        for exam in page
    ]
    show_ids = caller.may(Scope.EXPORT_IDENTIFIED) and caller.tenant.identity_vault
    if show_ids:
        show_originals(session, settings, caller, batch_id, [(e.id, e.images) for e in page], exams)
    exams.sort(key=lambda e: -1.0 if e.exam_score is None else e.exam_score, reverse=True)
    caller.audit(session, AuditAction.READ, "batch_exams", batch_id, exams=len(exams), via="viewer")
    # The status answer's one statement gives the versions that scored the batch, what they
    # flagged and its weeks' drift alarms: the banners say what the API's warnings say.
    status = batch_status(session=session, tenant_id=caller.tenant.id, batch_id=batch_id)
    assert status is not None  # the batch was found above
    warnings = batch_warnings(
        [ModelVersionPublic.model_validate(v) for v in status.versions],
        status.warning_counts,
        status.drift,
        settings.drift_psi_threshold,
    )
    session.commit()
    return _page(
        request,
        "batch.html",
        caller,
        batch=batch,
        exams=exams,
        show_ids=show_ids,
        batch_warnings=warnings,
    )


@dataclass(frozen=True)
class Slot:
    name: str
    image: ExamImage | None


@router.get("/exams/{exam_id}", response_class=HTMLResponse)
def exam_page(
    request: Request,
    exam_id: uuid.UUID,
    session: SessionDep,
    settings: SettingsDep,
    caller: ViewerDep,
) -> HTMLResponse:
    found = get_exam(session=session, tenant_id=caller.tenant.id, study_id=exam_id)
    if found is None:
        return HTMLResponse("<p>No such exam for this key.</p>", status_code=404)
    study, images = found
    predictions = latest_predictions(
        session=session, tenant_id=caller.tenant.id, image_ids=[i.id for i in images]
    )
    exam: Exam = exam_public(
        study,
        [(i, predictions.get(i.id)) for i in images],
        site_thresholds=site_thresholds(session, caller.tenant.id),
    )
    if caller.may(Scope.EXPORT_IDENTIFIED) and caller.tenant.identity_vault:
        show_originals(session, settings, caller, study.batch_id, [(study.id, images)], [exam])
    export = get_export(session=session, tenant_id=caller.tenant.id, study_id=exam_id)
    by_view = {f"{i.laterality}-{i.view}": i for i in exam.images if i.laterality and i.view}
    slots = [Slot(name, by_view.get(name)) for name in SLOTS]
    caller.audit(session, AuditAction.READ, "exam", exam_id, via="viewer")
    session.commit()
    return _page(
        request,
        "exam.html",
        caller,
        exam=exam,
        slots=slots,
        dicom_ready=export is not None and export.status == ExportStatus.RENDERED,
    )


@router.get("/exams/{exam_id}/report.dcm")
def exam_report_download(
    exam_id: uuid.UUID,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    caller: ViewerDep,
) -> Response:
    """The exam's DICOM report, as GET /v1/exams/{id}/report.dcm gives it to this key."""
    return exam_report_file(session, settings, store, caller, exam_id)


@router.get("/images/{image_id}/heatmap.dcm")
def image_heatmap_download(
    image_id: uuid.UUID,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    caller: ViewerDep,
) -> Response:
    return image_heatmap_file(session, settings, store, caller, image_id)


PRIVATE = {"Cache-Control": "private"}


@router.get("/images/{image_id}/view.png")
def image_preview(
    image_id: uuid.UUID, session: SessionDep, store: StoreDep, caller: ViewerDep
) -> Response:
    """The image as an 8-bit PNG at 1/4 size, in its own orientation (as heatmaps), as the
    worker stored it when it screened the image; 404 before that."""
    image = get_image(session=session, tenant_id=caller.tenant.id, image_id=image_id)
    if image is None:
        return Response(status_code=404)
    caller.audit(session, AuditAction.READ, "image", image.id, via="viewer")
    session.commit()
    preview = store.get_bytes_or_none(Keys.preview(image.id))
    if preview is None:
        return Response(status_code=404)
    return Response(preview, media_type="image/png", headers=PRIVATE)


@router.get("/images/{image_id}/heatmap.png")
def image_heatmap(
    image_id: uuid.UUID, session: SessionDep, store: StoreDep, caller: ViewerDep
) -> Response:
    image = get_image(session=session, tenant_id=caller.tenant.id, image_id=image_id)
    prediction = latest_prediction(session, caller, image) if image else None
    if image is None or prediction is None or prediction.heatmap_key is None:
        return Response(status_code=404)
    overlay = store.get_bytes_or_none(Keys.heatmap_overlay(image.id, prediction.model_version_id))
    if overlay is None:
        return Response(status_code=404)
    return Response(overlay, media_type="image/png", headers=PRIVATE)


@router.get("/drift", response_class=HTMLResponse)
def drift_page(
    request: Request, session: SessionDep, settings: SettingsDep, caller: ViewerDep
) -> HTMLResponse:
    """The tenant's weekly drift figures (GET /v1/drift), alarms first."""
    report = drift_report(session, settings, caller.tenant.id, weeks=12)
    return _page(request, "drift.html", caller, report=report)


@router.get("/evaluations/{evaluation_id}", response_class=HTMLResponse)
def evaluation_page(
    request: Request, evaluation_id: uuid.UUID, session: SessionDep, caller: ViewerDep
) -> HTMLResponse:
    """An evaluation's ROC curves and reliability diagram, and its figures per version and
    per group (manufacturer, model name, views)."""
    evaluation = get_evaluation(
        session=session, tenant_id=caller.tenant.id, evaluation_id=evaluation_id
    )
    if evaluation is None:
        return HTMLResponse("<p>No such evaluation for this key.</p>", status_code=404)
    caller.audit(session, AuditAction.READ, "evaluation", evaluation.id, via="viewer")
    thresholds = {str(k): v for k, v in site_thresholds(session, caller.tenant.id).items()}
    session.commit()
    versions = (evaluation.figures or {}).get("versions", [])
    plots = (
        {
            "roc": Markup(roc_svg(versions, thresholds)),  # noqa: S704 (our own SVG, text escaped)
            "calibration": Markup(reliability_svg(versions)),  # noqa: S704
        }
        if versions
        else None
    )
    return _page(
        request,
        "evaluation.html",
        caller,
        evaluation=evaluation,
        versions=versions,
        comparison=(evaluation.figures or {}).get("comparison"),
        site_thresholds=thresholds,
        plots=plots,
    )
