"""What the results API and the viewer both show: exams (by `shared.exams`' rule) in the
public schema, and an image's latest prediction."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from services.results.schemas import BreastResult, Exam, ExamImage, ModelVersionPublic
from shared.api.deps import Caller
from shared.batches import latest_predictions
from shared.db.models import Image, Prediction, Study
from shared.exams import assess_exam


def latest_prediction(session: Session, caller: Caller, image: Image) -> Prediction | None:
    """The image's newest prediction (the caller already found the image for this tenant)."""
    found = latest_predictions(session=session, tenant_id=caller.tenant.id, image_ids=[image.id])
    return found.get(image.id)


def heatmap_url(image: Image, prediction: Prediction | None) -> str | None:
    if prediction is None or prediction.heatmap_key is None:
        return None
    return f"/v1/images/{image.id}/heatmap.png"


def exam_public(
    study: Study, images: list[Image], predictions: dict[uuid.UUID, Prediction]
) -> Exam:
    assessment = assess_exam(images, predictions)
    advice = assessment.recommendation
    return Exam(
        id=study.id,
        study_key=study.study_key,
        patient_key=study.patient_key,
        images=[
            ExamImage(
                id=i.id,
                laterality=i.laterality,
                view=i.view,
                status=i.status,
                score=predictions[i.id].malignancy_score if i.id in predictions else None,
                error_code=i.error_code,
                heatmap_url=heatmap_url(i, predictions.get(i.id)),
            )
            for i in images
        ],
        views_present=assessment.views_present,
        missing_views=assessment.missing_views,
        breasts=[
            BreastResult(laterality=b.laterality, score=b.score, views=list(b.views))
            for b in assessment.breasts
        ],
        exam_score=assessment.exam_score,
        exam_probability=advice.exam_probability if advice else None,
        recall=(
            None
            if advice is None or advice.recall is None
            else ("recall" if advice.recall else "routine")
        ),
        recall_threshold=advice.recall_threshold if advice else None,
        model_version=ModelVersionPublic.model_validate(advice.model_version) if advice else None,
    )
