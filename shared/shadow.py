"""How a shadow version agrees with the active one on a tenant's exams, before any outcome is
known: on the exams both have scored (the same images), how often they make the same recall
decision (each at its own threshold, or the tenant's operating point for it), and how alike
their exam rankings are (Spearman's rank correlation). Torch-free: the results service
computes it on read."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import Image, ModelVersion, Prediction, ShadowScore
from shared.scores import ViewScore, breast_scores, exam_score

# The most recent images an agreement reads (a tenant's last few months at most).
MAX_IMAGES = 200_000


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation (Pearson's on mean-tied ranks); None when either side is
    constant or there are fewer than three exams."""
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def shadow_agreement(
    session: Session,
    tenant_id: uuid.UUID,
    shadow: ModelVersion,
    active: ModelVersion,
    site_thresholds: Mapping[uuid.UUID, float],
) -> dict[str, Any]:
    rows = session.execute(
        select(
            Image.study_id,
            Image.laterality,
            Image.view,
            Prediction.malignancy_score,
            ShadowScore.score,
        )
        .join(ShadowScore, ShadowScore.image_id == Image.id)
        .join(Prediction, Prediction.image_id == Image.id)
        .where(
            Image.tenant_id == tenant_id,
            ShadowScore.model_version_id == shadow.id,
            ShadowScore.score.is_not(None),
            Prediction.model_version_id == active.id,
        )
        .order_by(ShadowScore.created_at.desc())
        .limit(MAX_IMAGES)
    )
    views: dict[uuid.UUID, list[tuple[str, str, float, float]]] = defaultdict(list)
    for study_id, laterality, view, active_score, shadow_score in rows:
        if laterality is not None and view is not None and shadow_score is not None:
            views[study_id].append((laterality, view, active_score, shadow_score))
    pairs = []
    for items in views.values():
        a = exam_score(breast_scores(ViewScore(lat, v, s) for lat, v, s, _ in items))
        b = exam_score(breast_scores(ViewScore(lat, v, s) for lat, v, _, s in items))
        if a is not None and b is not None:
            pairs.append((a, b))
    active_scores = np.array([a for a, _ in pairs])
    shadow_scores = np.array([b for _, b in pairs])
    figures: dict[str, Any] = {
        "shadow": {"id": str(shadow.id), "name": shadow.name},
        "active": {"id": str(active.id), "name": active.name},
        "shadow_since": shadow.shadow_since.isoformat() if shadow.shadow_since else None,
        "exams": len(pairs),
        "rank_correlation": spearman(active_scores, shadow_scores),
        "recall_agreement": None,
    }
    thresholds = [site_thresholds.get(v.id, v.recall_threshold) for v in (active, shadow)]
    if pairs and None not in thresholds:
        active_recalls = active_scores >= thresholds[0]
        shadow_recalls = shadow_scores >= thresholds[1]
        figures["recall_agreement"] = {
            "active_threshold": thresholds[0],
            "shadow_threshold": thresholds[1],
            "agreement": float((active_recalls == shadow_recalls).mean()),
            "both_recall": int((active_recalls & shadow_recalls).sum()),
            "active_only": int((active_recalls & ~shadow_recalls).sum()),
            "shadow_only": int((~active_recalls & shadow_recalls).sum()),
            "neither": int((~active_recalls & ~shadow_recalls).sum()),
        }
    return figures
