"""Drift: a site's week of exam scores against the model version's held-out reference.

A version keeps a `ScoreReference`: the exam scores it gave held-out exams (its training
run's test split, or the pooled out-of-fold scores of a cross-validation; for the shipped
model, fresh exams of its domain), cut into quantile bins. Each tenant's week of exams
screened by the version is binned the same way and compared with the population stability
index, PSI = sum over bins of (actual - expected) * ln(actual / expected). With the week's
inputs summarised beside it (breast intensity after the VOI transform, input distance and
the share flagged, pixel spacing, manufacturer mix), a site sees whether its scores moved
because its images changed.

Five bins, not the textbook ten, and an alarm only from `drift_min_exams` exams on: with k
bins, n exams in the week and m in the reference, the index of a week drawn from the
reference's own distribution is about (k - 1) * (1/n + 1/m), with a chi-squared tail; ten
bins at a hundred exams would pass 0.2 by chance most weeks, five bins at 150 exams against
200 about one week in 500 (tests/services/test_drift.py measures it).

The week's figures are recomputed by the sweeper (`refresh_drift`) into score_drift_weeks;
the results service, the viewer and /metrics read that table. Plain Python: the results
service loads no numpy.
"""

from __future__ import annotations

import bisect
import math
import statistics
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.db.base import utcnow
from shared.db.models import (
    Image,
    ModelVersion,
    Prediction,
    PredictionWarning,
    ScoreDriftWeek,
    Tenant,
)
from shared.scores import ViewScore, breast_scores, exam_score

DRIFT_BINS = 5
# Fewest held-out exams a reference is cut from; a version evaluated on fewer gets none.
MIN_REFERENCE_EXAMS = 50
# Weeks the sweeper recomputes: this one and the one before (late screening of a batch
# submitted on Sunday still lands in its week's figures).
RECENT_WEEKS = 2
# One sweeper at a time computes drift (every worker runs a sweeper).
DRIFT_LOCK_KEY = 7_342_118
UNKNOWN_MANUFACTURER = "unknown"


@dataclass(frozen=True)
class ScoreReference:
    edges: list[float]  # the bins' inner edges: a score equal to an edge goes above it
    shares: list[float]  # the reference exams' share in each bin
    exams: int
    source: str  # what the exams were, in words

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ScoreReference | None:
        if not data:
            return None
        return cls(
            edges=[float(e) for e in data["edges"]],
            shares=[float(s) for s in data["shares"]],
            exams=int(data["exams"]),
            source=str(data.get("source", "")),
        )


def fit_score_reference(
    exam_scores: Sequence[float], *, source: str, bins: int = DRIFT_BINS
) -> ScoreReference | None:
    """Quantile bins of held-out exam scores; None when there are too few to cut."""
    if len(exam_scores) < MIN_REFERENCE_EXAMS:
        return None
    ordered = sorted(exam_scores)
    count = len(ordered)
    edges: list[float] = []
    for cut in range(1, bins):
        at = round(cut * count / bins)
        # Midway between neighbours: a score the reference itself holds is not on an edge.
        edge = (ordered[at - 1] + ordered[at]) / 2
        if not edges or edge > edges[-1]:  # tied scores merge bins rather than empty one
            edges.append(edge)
    return ScoreReference(edges, bin_shares(edges, ordered), count, source)


def bin_shares(edges: Sequence[float], scores: Sequence[float]) -> list[float]:
    counts = [0] * (len(edges) + 1)
    for score in scores:
        counts[bisect.bisect_right(edges, score)] += 1
    return [c / len(scores) for c in counts] if scores else [0.0] * len(counts)


def population_stability_index(
    expected: Sequence[float], actual: Sequence[float], *, expected_exams: int, actual_exams: int
) -> float:
    """PSI of `actual` shares against `expected`. An empty bin counts as half an exam, so a
    bin the week left empty gives a large finite term rather than an infinite one."""
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e = max(e, 0.5 / expected_exams)
        a = max(a, 0.5 / actual_exams)
        total += (a - e) * math.log(a / e)
    return total


def week_start(moment: datetime) -> date:
    """The Monday (UTC) of the ISO week `moment` falls in."""
    day = moment.astimezone(UTC).date()
    return day - timedelta(days=day.weekday())


@dataclass
class _ExamViews:
    first_at: datetime
    views: list[ViewScore] = field(default_factory=list)


@dataclass
class _Week:
    exams: dict[uuid.UUID, _ExamViews] = field(default_factory=dict)
    intensities: list[float] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)
    spacings: list[float] = field(default_factory=list)
    manufacturers: Counter[str] = field(default_factory=Counter)
    images: int = 0
    flagged: int = 0


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _inputs_summary(week: _Week) -> dict[str, Any]:
    return {
        "images": week.images,
        "median_breast_intensity": _median(week.intensities),
        "median_input_distance": _median(week.distances),
        "flagged_share": week.flagged / week.images if week.images else None,
        "median_pixel_spacing_mm": _median(week.spacings),
        "manufacturers": {
            name: count / week.images for name, count in week.manufacturers.most_common()
        },
    }


def _collect(
    session: Session, since: datetime
) -> dict[tuple[uuid.UUID, uuid.UUID], dict[uuid.UUID, tuple[_ExamViews, _Week]]]:
    """Every prediction since `since`, grouped by (tenant, version) and exam."""
    rows = session.execute(
        select(
            Prediction.tenant_id,
            Prediction.model_version_id,
            Prediction.created_at,
            Prediction.malignancy_score,
            Prediction.input_distance,
            Prediction.input_intensity,
            Prediction.warnings,
            Image.study_id,
            Image.laterality,
            Image.view,
            Image.manufacturer,
            Image.pixel_spacing_mm,
        )
        .join(Image, Image.id == Prediction.image_id)
        .where(Prediction.created_at >= since)
        .execution_options(yield_per=5000)
    )
    flag = PredictionWarning.INPUT_UNLIKE_TRAINING_DATA.value
    groups: dict[tuple[uuid.UUID, uuid.UUID], dict[uuid.UUID, tuple[_ExamViews, _Week]]] = {}
    for row in rows:
        exams = groups.setdefault((row.tenant_id, row.model_version_id), {})
        exam, inputs = exams.setdefault(row.study_id, (_ExamViews(row.created_at), _Week()))
        exam.first_at = min(exam.first_at, row.created_at)
        if row.laterality is not None and row.view is not None:
            exam.views.append(ViewScore(row.laterality, row.view, row.malignancy_score))
        inputs.images += 1
        inputs.flagged += flag in (row.warnings or [])
        inputs.manufacturers[row.manufacturer or UNKNOWN_MANUFACTURER] += 1
        if row.input_intensity is not None:
            inputs.intensities.append(row.input_intensity)
        if row.input_distance is not None:
            inputs.distances.append(row.input_distance)
        if row.pixel_spacing_mm is not None:
            inputs.spacings.append(row.pixel_spacing_mm)
    return groups


def _weeks(
    exams: dict[uuid.UUID, tuple[_ExamViews, _Week]], first: date
) -> dict[date, tuple[list[float], _Week]]:
    """An exam belongs to the week its first image was screened in."""
    weeks: dict[date, tuple[list[float], _Week]] = {}
    for exam, inputs in exams.values():
        start = week_start(exam.first_at)
        score = exam_score(breast_scores(exam.views))
        if start < first or score is None:
            continue
        scores, week = weeks.setdefault(start, ([], _Week()))
        scores.append(score)
        week.images += inputs.images
        week.flagged += inputs.flagged
        week.manufacturers.update(inputs.manufacturers)
        week.intensities += inputs.intensities
        week.distances += inputs.distances
        week.spacings += inputs.spacings
    return weeks


def refresh_drift(
    session: Session, *, settings: Settings, now: datetime | None = None
) -> list[ScoreDriftWeek]:
    """Recompute the recent weeks of every tenant and version that screened in them. Returns
    the rows written; none when another sweeper is computing them."""
    if not session.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": DRIFT_LOCK_KEY}):
        return []
    now = now or utcnow()
    first = week_start(now) - timedelta(weeks=RECENT_WEEKS - 1)
    # An exam whose first image was screened before `first` is left out of `first`'s week,
    # so read a day earlier to see where each exam began.
    since = datetime.combine(first - timedelta(days=1), time(), tzinfo=UTC)
    groups = _collect(session, since)
    references = {
        version_id: ScoreReference.from_dict(reference)
        for version_id, reference in session.execute(
            select(ModelVersion.id, ModelVersion.score_reference).where(
                ModelVersion.id.in_({version for _, version in groups})
            )
        ).all()
    }
    written = []
    for (tenant_id, version_id), exams in groups.items():
        reference = references.get(version_id)
        for start, (scores, week) in _weeks(exams, first).items():
            written.append(
                _store_week(
                    session,
                    settings=settings,
                    key=(tenant_id, start, version_id),
                    scores=scores,
                    week=week,
                    reference=reference,
                    now=now,
                )
            )
    return written


def _store_week(
    session: Session,
    *,
    settings: Settings,
    key: tuple[uuid.UUID, date, uuid.UUID],
    scores: list[float],
    week: _Week,
    reference: ScoreReference | None,
    now: datetime,
) -> ScoreDriftWeek:
    tenant_id, start, version_id = key
    psi: float | None = None
    shares: list[float] = []
    if reference is not None:
        shares = bin_shares(reference.edges, scores)
        psi = population_stability_index(
            reference.shares, shares, expected_exams=reference.exams, actual_exams=len(scores)
        )
    values = {
        "exams": len(scores),
        "psi": psi,
        "alarm": psi is not None
        and len(scores) >= settings.drift_min_exams
        and psi > settings.drift_psi_threshold,
        "bin_shares": shares,
        "inputs": _inputs_summary(week),
        "computed_at": now,
    }
    session.execute(
        insert(ScoreDriftWeek)
        .values(tenant_id=tenant_id, week_start=start, model_version_id=version_id, **values)
        .on_conflict_do_update(
            index_elements=["tenant_id", "week_start", "model_version_id"], set_=values
        )
    )
    return ScoreDriftWeek(
        tenant_id=tenant_id, week_start=start, model_version_id=version_id, **values
    )


def drift_weeks(
    session: Session, *, tenant_id: uuid.UUID, weeks: int
) -> list[tuple[ScoreDriftWeek, ModelVersion]]:
    """The tenant's last `weeks` weeks that have figures, newest first."""
    since = week_start(utcnow()) - timedelta(weeks=weeks - 1)
    return [
        (row, version)
        for row, version in session.execute(
            select(ScoreDriftWeek, ModelVersion)
            .join(ModelVersion, ModelVersion.id == ScoreDriftWeek.model_version_id)
            .where(ScoreDriftWeek.tenant_id == tenant_id, ScoreDriftWeek.week_start >= since)
            .order_by(ScoreDriftWeek.week_start.desc(), ModelVersion.name)
        )
    ]


def latest_drift(session: Session) -> list[tuple[str, str, ScoreDriftWeek]]:
    """(tenant name, version name, figures) of each tenant's latest week, per version that
    screened in it: what /metrics shows."""
    latest = (
        select(ScoreDriftWeek.tenant_id, func.max(ScoreDriftWeek.week_start).label("week"))
        .group_by(ScoreDriftWeek.tenant_id)
        .subquery()
    )
    rows = session.execute(
        select(Tenant.name, ModelVersion.name, ScoreDriftWeek)
        .join(
            latest,
            (latest.c.tenant_id == ScoreDriftWeek.tenant_id)
            & (latest.c.week == ScoreDriftWeek.week_start),
        )
        .join(Tenant, Tenant.id == ScoreDriftWeek.tenant_id)
        .join(ModelVersion, ModelVersion.id == ScoreDriftWeek.model_version_id)
        .order_by(Tenant.name, ModelVersion.name)
    )
    return [(tenant, model, week) for tenant, model, week in rows]


def drift_warning(*, week_start: str, psi: float, exams: int, threshold: float) -> str:
    return (
        f"score drift (week of {week_start}): this site's exam scores lie far from the "
        f"model's validation reference (population stability index {psi:.2f} over {exams} "
        f"exams, alarm above {threshold:g}); check what changed (vendor, processing, "
        "exposure, population) and evaluate the model on outcomes before trusting its "
        "threshold"
    )
