"""How a shadow version agrees with the active one on a tenant's exams, before any outcome is
known: on the exams both have scored (the same images), how often they make the same recall
decision (each at its own threshold, or the tenant's operating point for it), and how alike
their exam rankings are (Spearman's rank correlation). Torch-free: the results service
computes it on read."""

from __future__ import annotations

import math
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import Image, ModelVersion, Prediction, ShadowScore
from shared.scores import ViewScore, breast_scores, exam_score

# The most recent images an agreement reads (a tenant's last few months at most).
MAX_IMAGES = 200_000


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on mean-tied ranks); None when either side is
    constant or there are fewer than three exams. Plain Python: the results service loads no
    numpy."""
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    mean_a, mean_b = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(ra, rb, strict=True))
    var_a = sum((x - mean_a) ** 2 for x in ra)
    var_b = sum((y - mean_b) ** 2 for y in rb)
    if var_a == 0 or var_b == 0:
        return None
    return cov / math.sqrt(var_a * var_b)


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
    active_scores = [a for a, _ in pairs]
    shadow_scores = [b for _, b in pairs]
    figures: dict[str, Any] = {
        "shadow": {"id": str(shadow.id), "name": shadow.name},
        "active": {"id": str(active.id), "name": active.name},
        "shadow_since": shadow.shadow_since.isoformat() if shadow.shadow_since else None,
        "exams": len(pairs),
        "rank_correlation": spearman(active_scores, shadow_scores),
        "recall_agreement": None,
    }
    thresholds = [site_thresholds.get(v.id, v.recall_threshold) for v in (active, shadow)]
    active_threshold, shadow_threshold = thresholds
    if pairs and active_threshold is not None and shadow_threshold is not None:
        decisions = [(a >= active_threshold, b >= shadow_threshold) for a, b in pairs]
        figures["recall_agreement"] = {
            "active_threshold": active_threshold,
            "shadow_threshold": shadow_threshold,
            "agreement": sum(a == b for a, b in decisions) / len(decisions),
            "both_recall": sum(a and b for a, b in decisions),
            "active_only": sum(a and not b for a, b in decisions),
            "shadow_only": sum(b and not a for a, b in decisions),
            "neither": sum(not a and not b for a, b in decisions),
        }
    return figures
