"""A site's own operating point: the recall threshold a tenant chose for a model version on
one of its evaluations, for a target sensitivity (recall at least this share of malignant
exams) or recall rate (recall at most this share of all exams). The exam rule
(shared/exams.py) uses it for that tenant's recommendations instead of the version's own."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.db.base import new_id, utcnow
from shared.db.models import OperatingTarget, SiteOperatingPoint


class TargetUnreachable(Exception):
    """No threshold on the evaluation's exams meets the target."""


@dataclass(frozen=True)
class ChosenPoint:
    threshold: float
    sensitivity: float
    specificity: float
    recall_rate: float


def choose_threshold(
    version_figures: Mapping[str, Any], target: OperatingTarget, value: float
) -> ChosenPoint:
    """From a version's evaluation figures (its ROC curve over the site's exams): for a
    sensitivity, the highest threshold that reaches it; for a recall rate, the lowest
    threshold that stays within it (the most sensitive the site can afford)."""
    roc = version_figures["roc"]
    positives = version_figures["malignant_exams"]
    negatives = version_figures["exams"] - positives
    points = [
        ChosenPoint(
            threshold,
            tpr,
            1 - fpr,
            (tpr * positives + fpr * negatives) / (positives + negatives),
        )
        for threshold, tpr, fpr in zip(roc["thresholds"], roc["tpr"], roc["fpr"], strict=True)
        if threshold is not None
    ]  # highest threshold first
    if target == OperatingTarget.SENSITIVITY:
        reaching = [p for p in points if p.sensitivity >= value - 1e-12]
        if not reaching:
            raise TargetUnreachable(f"no threshold reaches sensitivity {value}")
        return reaching[0]
    within = [p for p in points if p.recall_rate <= value + 1e-12]
    if not within:
        lowest = points[0].recall_rate if points else 1.0
        raise TargetUnreachable(
            f"even the highest threshold recalls {lowest:.4f} of these exams, above {value}"
        )
    return within[-1]


def set_operating_point(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    model_version_id: uuid.UUID,
    evaluation_id: uuid.UUID,
    target: OperatingTarget,
    target_value: float,
    threshold: float,
    chosen_by: str,
) -> SiteOperatingPoint:
    """Set (or replace) the tenant's threshold for the version. The caller commits."""
    values = {
        "target": target,
        "target_value": target_value,
        "threshold": threshold,
        "evaluation_id": evaluation_id,
        "chosen_by": chosen_by,
        "chosen_at": utcnow(),
    }
    statement = insert(SiteOperatingPoint).values(
        id=new_id(), tenant_id=tenant_id, model_version_id=model_version_id, **values
    )
    upsert = statement.on_conflict_do_update(
        index_elements=["tenant_id", "model_version_id"], set_=values
    )
    return session.scalars(upsert.returning(SiteOperatingPoint)).one()


def clear_operating_point(
    session: Session, *, tenant_id: uuid.UUID, model_version_id: uuid.UUID
) -> bool:
    """Back to the version's own threshold; False when the tenant had none set."""
    removed = session.execute(
        delete(SiteOperatingPoint)
        .where(
            SiteOperatingPoint.tenant_id == tenant_id,
            SiteOperatingPoint.model_version_id == model_version_id,
        )
        .returning(SiteOperatingPoint.id)
    ).all()
    return bool(removed)


def operating_points(session: Session, tenant_id: uuid.UUID) -> list[SiteOperatingPoint]:
    return list(
        session.scalars(
            select(SiteOperatingPoint)
            .where(SiteOperatingPoint.tenant_id == tenant_id)
            .order_by(SiteOperatingPoint.chosen_at.desc())
        )
    )


def site_thresholds(session: Session, tenant_id: uuid.UUID) -> dict[uuid.UUID, float]:
    """The tenant's own thresholds by model version id (one short read per request)."""
    rows = session.execute(
        select(SiteOperatingPoint.model_version_id, SiteOperatingPoint.threshold).where(
            SiteOperatingPoint.tenant_id == tenant_id
        )
    )
    return {version_id: threshold for version_id, threshold in rows}
