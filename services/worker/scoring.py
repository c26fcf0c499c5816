"""Scoring stored images with a given model version outside the screening pipeline (an
evaluation's candidate, the shadow version): the inference code's own preprocessing and
forward pass, so a version gives the same score here as when it screens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from minio.error import S3Error

from services.worker.models import LoadedModel
from shared.config import Settings
from shared.db.models import Laterality
from shared.evaluations import EvaluationImage
from shared.imaging.decode import read_pixels
from shared.imaging.formats import ImageRejected
from shared.ml.imported import preprocess_for
from shared.storage import MISSING_OBJECT_CODES, ObjectStore

SCORING_BATCH = 16


def score_images(
    loaded: LoadedModel,
    images: Sequence[EvaluationImage],
    *,
    settings: Settings,
    store: ObjectStore,
    alive: Callable[[], None] | None = None,
) -> tuple[dict[Any, float], dict[Any, str]]:
    """(score by image id, and for an image that cannot be read now its rejection code).
    `alive` is called after each batch (a long pass tells its watchers it is not stuck)."""
    preprocess = preprocess_for(loaded.model)
    scores: dict[Any, float] = {}
    unreadable: dict[Any, str] = {}
    for start in range(0, len(images), SCORING_BATCH):
        placed = []
        for image in images[start : start + SCORING_BATCH]:
            try:
                data = store.get_bytes(image.object_key)
                pixels = read_pixels(data, image.media_type, max_pixels=settings.max_image_pixels)
            except ImageRejected as err:
                unreadable[image.image_id] = err.code.value
                continue
            except S3Error as err:
                if err.code not in MISSING_OBJECT_CODES:
                    raise
                unreadable[image.image_id] = "missing_object"
                continue
            placed.append(
                (image.image_id, pixels, preprocess.place(pixels, Laterality(image.laterality)))
            )
        if placed:
            batch = preprocess.make_inputs([(p, g) for _, p, g in placed], loaded.device)
            scores.update(
                zip((i for i, _, _ in placed), loaded.predictor(batch.inputs), strict=True)
            )
        if alive is not None:
            alive()
    return scores, unreadable
